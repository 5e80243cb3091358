"""The audit log: one hash-chained JSON line per mutating call, to its own sink.

Every call with a method other than GET and HEAD gets a line, refused or forwarded: time,
client, route, method, path (never the query), the status the client got and Publer's,
the refusal code if any, the `job_id` or post ids Publer responded with (when the response
body was small JSON), and the request id. Lines pass through the same redaction as the logs,
before they are hashed, so a secret never reaches the sink.

The chain (`proxy.auditchain`) shows altered, removed and reordered lines; its head (line
count and last hash) is published out of the writer's reach after every line: to Redis
(`audit.redis_url`, else `rate_limit.redis_url`), to the metric
`publer_proxy_audit_lines`, and as an `audit_head` event in the proxy's own log.
`publer-proxy audit verify FILE` checks a file against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
import structlog

from proxy import redisclient
from proxy.auditchain import GENESIS, Head, line_hash, seal
from proxy.metrics import Metrics
from proxy.redact import SecretRegistry
from proxy.scopes import READ_METHODS
from proxy.settings import AuditSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

STREAMS = ("stdout", "stderr")
# Publer's ids are object ids and numbers; anything else in a response is not recorded.
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_IDS = 100
_TAIL_BYTES = 64 * 1024


def head_key(settings: AuditSettings) -> str:
    """The Redis key of the chain head: configured, else this host and the sink."""
    if settings.head_key:
        return settings.head_key
    where = settings.sink if settings.sink in STREAMS else str(Path(settings.sink).resolve())
    return f"publer-proxy:audit:{socket.gethostname()}:{where}"


def response_ids(body: bytes | None) -> dict[str, Any]:
    """`job_id` and `post_ids` from a small JSON response body of Publer's, when it has them."""
    if not body or body[:1] not in (b"{", b"["):
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    found: dict[str, Any] = {}
    job = data.get("job_id")
    if isinstance(job, str) and _ID_RE.match(job):
        found["job_id"] = job
    candidates: list[object] = [data.get("id")]
    for many in ("deleted_ids", "post_ids"):
        listed = data.get(many)
        if isinstance(listed, list):
            candidates += listed
    for holder in (data.get("post"), *(data.get("posts") or [])):
        if isinstance(holder, dict):
            candidates.append(holder.get("id"))
    ids = [c for c in candidates if isinstance(c, str) and _ID_RE.match(c)]
    if ids:
        found["post_ids"] = list(dict.fromkeys(ids))[:MAX_IDS]
    return found


def _last_line(path: Path) -> bytes | None:
    """The last complete audit line of an existing file, to continue its chain."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _TAIL_BYTES))
            tail = file.read()
    except FileNotFoundError:
        return None
    for raw in reversed(tail.splitlines()):
        if b'"event":"audit"' in raw:
            return raw
    return None


class AuditSinkError(Exception):
    """The audit sink cannot be used; the proxy does not start without it."""


def _open_chain(path: Path) -> tuple[Head, BinaryIO]:
    """The head of an existing file's chain, and the file opened to append to it."""
    head = Head(0, GENESIS)
    last = _last_line(path)
    if last is not None:
        seq = orjson.loads(last).get("seq")
        if isinstance(seq, int):
            head = Head(seq, line_hash(last))
    try:
        # Appending, unbuffered: each line is one write(2), whole, in order.
        file = path.open("ab", buffering=0)
    except OSError as exc:
        raise AuditSinkError(
            f"audit.sink {path} cannot be opened for appending ({exc.strerror});"
            " check the directory exists and the proxy's user may write there"
        ) from None
    try:
        # Two writers would interleave two chains into one broken one.
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        raise AuditSinkError(
            f"audit.sink {path} is being written by another proxy process;"
            " give each process its own audit file"
        ) from None
    return head, file


class AuditLog:
    """The audit sink of one proxy process: `record` writes, `start`/`close` around it."""

    def __init__(
        self,
        settings: AuditSettings | None,
        secrets: SecretRegistry,
        metrics: Metrics,
        redis_url: str | None = None,
    ) -> None:
        self._settings = settings
        self._secrets = secrets
        self._metrics = metrics
        self._redis_url = (settings.redis_url if settings else None) or redis_url
        self._write: Callable[[bytes], None] | None = None
        self._close: Callable[[], None] = lambda: None
        self._head = Head(0, GENESIS)
        self._redis: Redis | None = None
        self._changed = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._redis_failing = False

    @property
    def head(self) -> Head:
        """The chain's head: lines written to this sink, and the last one's hash."""
        return self._head

    def open(self) -> None:
        """Open the sink and continue the chain of an existing file, before serving;
        raises AuditSinkError (a sentence) when the sink cannot be used."""
        settings = self._settings
        if settings is None:
            return
        if settings.sink in STREAMS:
            stream = sys.stdout if settings.sink == "stdout" else sys.stderr

            def write(line: bytes) -> None:
                # Through the text stream the logs use, so lines never interleave.
                stream.write(line.decode("utf-8"))
                stream.flush()

            self._write = write
            return
        self._head, file = _open_chain(Path(settings.sink))

        def append(line: bytes) -> None:
            file.write(line)

        self._write, self._close = append, file.close

    async def start(self) -> None:
        """Compare the file with the head published before, and start publishing."""
        settings = self._settings
        if settings is None:
            return
        self._metrics.audit_lines.set(self._head.lines)
        if self._redis_url:
            self._redis = redisclient.connect(self._redis_url)
            await self._compare_published(head_key(settings))
            self._publisher = asyncio.create_task(self._publish(head_key(settings)))
        log.info(
            "audit_started",
            sink=settings.sink,
            head=str(self._head),
            head_key=head_key(settings) if self._redis else None,
        )

    async def _compare_published(self, key: str) -> None:
        from redis.exceptions import RedisError

        assert self._redis is not None
        try:
            published = await _load_head(self._redis, key)
        except RedisError as exc:
            log.warning("audit_head_unpublished", error=type(exc).__name__)
            return
        if published is not None and published != str(self._head):
            # The file does not end where it ended when the head was published: lines
            # were removed or altered while the proxy was not running. Say so loudly.
            log.error(
                "audit_head_mismatch",
                published=published,
                file=str(self._head),
                head_key=key,
            )

    def record(
        self,
        *,
        request_id: str,
        route: str | None,
        client: str,
        method: str,
        path: str,
        status: int,
        upstream_status: int | None,
        decision: str,
        response_body: bytes | None,
        accounts: tuple[str, ...] | None = None,
    ) -> None:
        """Write the audit line of one call, if it is a mutating one; `accounts`: the social
        accounts it acted on, when the proxy could read them (None: not known)."""
        if self._write is None or method in READ_METHODS:
            return
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "client": client,
            "route": route,
            "method": method,
            "path": path,
            "status": status,
            "upstream_status": upstream_status,
            "decision": decision,
            **({"accounts": list(accounts)} if accounts is not None else {}),
            **(response_ids(response_body) if upstream_status is not None else {}),
        }
        line = seal(record, self._head.lines + 1, self._head.hash)
        line = self._secrets.redact(line.decode("utf-8")).encode("utf-8")
        self._write(line + b"\n")
        self._head = Head(self._head.lines + 1, line_hash(line))
        self._metrics.audit_lines.set(self._head.lines)
        log.info("audit_head", head=str(self._head))
        self._changed.set()

    async def _publish(self, key: str) -> None:
        from redis.exceptions import RedisError

        assert self._redis is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            head = self._head
            try:
                await _store_head(self._redis, key, head)
            except RedisError as exc:
                if not self._redis_failing:
                    log.warning("audit_head_unpublished", error=type(exc).__name__)
                self._redis_failing = True
                await asyncio.sleep(1.0)
                self._changed.set()  # try again with whatever the head is then
                continue
            if self._redis_failing:
                log.info("audit_head_published_again", head=str(head))
            self._redis_failing = False

    async def close(self) -> None:
        """Publish the last head, close the sink."""
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        if self._redis is not None and self._settings is not None:
            from redis.exceptions import RedisError

            key = head_key(self._settings)
            head = self._head
            with contextlib.suppress(RedisError):
                await _store_head(self._redis, key, head)
            await self._redis.aclose()
        self._close()
        self._write = None


async def _store_head(redis: Redis, key: str, head: Head) -> None:
    await redis.hset(key, mapping={"head": str(head), "lines": head.lines})


async def _load_head(redis: Redis, key: str) -> str | None:
    value = await redis.hget(key, "head")
    return value.decode() if isinstance(value, bytes) else value


async def published_head(redis_url: str, key: str) -> Head | None:
    """The head a proxy published to Redis under `key`, or None if there is none."""
    client = redisclient.connect(redis_url, timeout=5.0)
    try:
        text = await _load_head(client, key)
    finally:
        await client.aclose()
    return Head.parse(text) if text is not None else None


def verify_file(
    path: Path,
    *,
    head: str | None = None,
    redis_url: str | None = None,
    key: str | None = None,
    settings: AuditSettings | None = None,
) -> tuple[int, list[str]]:
    """`audit verify`: the exit status (0 intact, 1 tampered, 2 cannot tell) and the lines
    to print. The head comes from `head` (LINES:HASH), else from Redis when a URL is known
    (given, or the config's), else the chain alone is checked."""
    from redis.exceptions import RedisError

    from proxy.auditchain import verify

    published: Head | None = None
    redis_url = redis_url or (settings.redis_url if settings else None)
    try:
        if head is not None:
            published = Head.parse(head)
        elif redis_url:
            key = key or head_key(settings or AuditSettings(sink=str(path)))
            published = asyncio.run(published_head(redis_url, key))
            if published is None:
                return 2, [f"{path}: no head is published in Redis under {key!r}"]
    except ValueError as exc:
        return 2, [f"--head: {exc}"]
    except RedisError as exc:
        return 2, [f"cannot read the published head from Redis ({type(exc).__name__})"]
    if not path.is_file():
        return 2, [f"{path}: no such file"]

    def read() -> list[bytes]:
        with path.open("rb") as file:
            return file.readlines()

    try:
        report = verify(read, published)
    except OSError as exc:
        return 2, [f"{path}: cannot be read ({exc.strerror})"]
    if report.problem is not None:
        return 1, [f"{path}: line {report.line_number}: {report.problem}"]
    lines = [f"{path}: intact: {report.lines} audit lines, head {report.head}"]
    if report.note:
        lines.append(f"note: {report.note}")
    if published is None:
        lines.append(
            "note: without the published head, removed last lines cannot be seen;"
            " pass --head LINES:HASH or --redis-url"
        )
    return 0, lines
