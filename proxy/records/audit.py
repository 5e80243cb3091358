"""The audit log: one hash-chained JSON line per mutating call, to its own sink.

Every call with a method other than GET and HEAD gets a line, refused or forwarded: time,
client, route, method, path (never the query), the status the client got and Publer's,
the refusal code if any, the `job_id` or post ids Publer responded with (when the response
body was small JSON), and the request id. Lines pass through the same redaction as the logs,
before they are hashed, so a secret never reaches the sink.

The chain (`proxy.records.audit_chain`) shows altered, removed and reordered lines; its head (line
count and last hash) is published out of the writer's reach after every line: to Redis
(`audit.redis_url`, else `rate_limit.redis_url`), to the metric
`publer_proxy_audit_lines`, and as an `audit_head` event in the proxy's own log.
`publer-proxy audit verify FILE...` checks a file and its rotated files against it.

The file follows logrotate's and nginx's conventions: renamed away, it is reopened on
SIGHUP (or noticed before the next line); emptied in place (copytruncate), the chain goes
on in it. Either way, and after a restart that finds a new file, the new file's first line
links to the last head (kept beside the file, or published), so the files stay one
chain. A last line cut short by a crash is set aside at start, in the chain, not fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gzip
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
import structlog

from proxy.budget import redis_client as redisclient
from proxy.config.settings import AuditSettings
from proxy.masking.secrets import SecretRegistry
from proxy.records.audit_chain import GENESIS, Head, line_hash, link_record, seal, torn_record
from proxy.records.metrics import Metrics
from proxy.rules.scopes import READ_METHODS

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


@dataclass(frozen=True)
class _Tail:
    """What the end of an existing audit file holds."""

    last: bytes | None  # the last complete audit line
    torn: tuple[int, int] | None  # a last line cut short: its file line number and bytes


def _read_tail(path: Path) -> _Tail:
    """The last complete audit line of a file, and its last line if a crash cut it short."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _TAIL_BYTES))
            tail = file.read()
            torn = None
            if tail and not tail.endswith(b"\n"):
                torn = _torn_line(file, size)
                tail = tail[: max(0, len(tail) - torn[1])]
    except FileNotFoundError:
        return _Tail(None, None)
    for raw in reversed(tail.splitlines()):
        if b'"event":"audit"' not in raw:
            continue
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # a line set aside before
        if isinstance(record, dict) and isinstance(record.get("seq"), int):
            return _Tail(raw, torn)
    return _Tail(None, torn)


def _torn_line(file: BinaryIO, size: int) -> tuple[int, int]:
    """The line number and length of a file's last line, which has no line end."""
    file.seek(0)
    lines, last_end, offset = 0, 0, 0
    for chunk in iter(lambda: file.read(1 << 20), b""):
        found = chunk.count(b"\n")
        if found:
            lines += found
            last_end = offset + chunk.rindex(b"\n") + 1
        offset += len(chunk)
    return lines + 1, size - last_end


class AuditSinkError(Exception):
    """The audit sink cannot be used; the proxy does not start without it."""


def _state_path(path: Path) -> Path:
    """Where the last head is kept beside the sink, for a file rotated while stopped.
    Hidden, so that a glob of the rotated files (`audit.log*`) does not take it."""
    return path.with_name(f".{path.name}.head")


def _read_state(path: Path) -> Head | None:
    try:
        return Head.parse(_state_path(path).read_text())
    except (OSError, ValueError):
        return None


def _open_file(path: Path) -> BinaryIO:
    """The sink opened to append to, and locked to this process."""
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
    return file


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class _FileSink:
    """An audit file that follows its path: renamed away (and SIGHUP, or noticed before
    the next write) it is reopened at the path; truncated in place (copytruncate) the
    chain goes on in the emptied file. Either way the new file's first line links to the
    head the previous file ended at."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.head = Head(0, GENESIS)
        self._file: BinaryIO | None = None
        self._inode = 0
        self._size = 0  # bytes the file holds as far as this process knows
        self._state: int | None = None
        self.start_head = self.head

    def open(self) -> None:
        tail = _read_tail(self.path)
        file = _open_file(self.path)
        self._adopt(file)
        try:
            self._state = os.open(_state_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("audit_head_not_kept", path=str(_state_path(self.path)), error=exc.strerror)
        if tail.last is not None:
            seq = orjson.loads(tail.last)["seq"]
            self.head = Head(seq, line_hash(tail.last))
        else:
            self.head = _read_state(self.path) or self.head
            if self.head.lines:
                log.info("audit_chain_continued", sink=str(self.path), after=str(self.head))
        self.start_head = self.head
        if tail.torn is not None:
            number, size = tail.torn
            log.warning(
                "audit_torn_tail",
                sink=str(self.path),
                line=number,
                bytes=size,
                detail="a last line cut short (a crash mid-write) is set aside; the chain"
                " goes on from the last whole line",
            )
            self._raw(b"\n")
            self._append(
                seal(torn_record(_now(), number, size), self.head.lines + 1, self.head.hash)
            )
        elif tail.last is None and self.head.lines:
            self._link()

    def continue_from(self, head: Head) -> None:
        """Link an empty file to `head` (the head published before a rotation)."""
        if self.head.lines == 0 and head.lines:
            self.head = head
            log.info("audit_chain_continued", sink=str(self.path), after=str(head))
            self._link()

    def extends(self, published: str, start: Head) -> bool:
        """Whether the file holds the published head's line, before where it ended."""
        try:
            head = Head.parse(published)
        except ValueError:
            return False
        if not 0 < head.lines < start.lines:
            return False
        try:
            with self.path.open("rb") as file:
                for raw in file:
                    if b'"event":"audit"' not in raw or not raw.endswith(b"\n"):
                        continue
                    raw = raw.rstrip(b"\r\n")
                    with contextlib.suppress(orjson.JSONDecodeError):
                        if orjson.loads(raw).get("seq") == head.lines:
                            return line_hash(raw) == head.hash
        except OSError:
            return False
        return False

    def _adopt(self, file: BinaryIO) -> None:
        self._file = file
        status = os.fstat(file.fileno())
        self._inode, self._size = status.st_ino, status.st_size

    def _link(self) -> None:
        self._append(seal(link_record(_now(), self.head), self.head.lines + 1, self.head.hash))

    def reopen(self, why: str) -> None:
        """Open the path anew (after a rename), linking its chain on; nothing to do when
        the path is still the file being written."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                return
        old = self._file
        try:
            file = _open_file(self.path)
        except AuditSinkError as exc:
            log.error("audit_reopen_failed", sink=str(self.path), error=str(exc))
            return
        if old is not None:
            old.close()
        self._adopt(file)
        log.info("audit_reopened", sink=str(self.path), reason=why, head=str(self.head))
        if self._size == 0 and self.head.lines:
            self._link()

    def check_path(self) -> None:
        """Reopen or relink if the file was renamed, removed or truncated since the last write."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            self.reopen("the file was moved away")
            return
        if status.st_ino != self._inode:
            self.reopen("the file was moved away")
        elif status.st_size < self._size:
            log.info("audit_reopened", sink=str(self.path), reason="the file was truncated")
            self._size = status.st_size
            if status.st_size == 0 and self.head.lines:
                self._link()

    def append(self, line: bytes) -> None:
        """Write one sealed line (call `check_path` before sealing it)."""
        self._append(line)

    def _raw(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._size += len(data)

    def _append(self, line: bytes) -> None:
        self._raw(line + b"\n")
        self.head = Head(self.head.lines + 1, line_hash(line))
        if self._state is not None:
            # In place, fixed length: one write that a crash does not leave half-done.
            os.pwrite(self._state, str(self.head).ljust(100).encode() + b"\n", 0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._state is not None:
            os.close(self._state)
            self._state = None


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
        self._file: _FileSink | None = None
        self._head = Head(0, GENESIS)
        self._start_head = self._head  # where the file ended before this start wrote to it
        self._redis: Redis | None = None
        self._changed = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._redis_failing = False

    @property
    def head(self) -> Head:
        """The chain's head: lines written to this sink, and the last one's hash."""
        return self._file.head if self._file is not None else self._head

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
        self._file = _FileSink(Path(settings.sink))
        self._file.open()
        self._start_head = self._file.start_head

    def reopen(self) -> None:
        """Open the audit file at its path anew (on SIGHUP, after a rotation by rename)."""
        if self._file is not None:
            self._file.reopen("SIGHUP")
            self._published_change()

    async def start(self) -> None:
        """Compare the file with the head published before, and start publishing."""
        settings = self._settings
        if settings is None:
            return
        self._metrics.audit_lines.set(self.head.lines)
        if self._redis_url:
            self._redis = redisclient.connect(self._redis_url)
            await self._compare_published(head_key(settings))
            self._publisher = asyncio.create_task(self._publish(head_key(settings)))
        log.info(
            "audit_started",
            sink=settings.sink,
            head=str(self.head),
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
        if published is None:
            return
        if self._file is not None and self._start_head.lines == 0:
            # A new file (rotated while the proxy was stopped): the chain goes on from
            # the head published before, so the files read in order stay one chain.
            with contextlib.suppress(ValueError):
                self._file.continue_from(Head.parse(published))
                self._published_change()
            return
        if self._file is not None and self._file.extends(published, self._start_head):
            # A crash (or a stop) came between writing lines and publishing the head;
            # the lines after the published head are in the file and linked to it.
            log.info(
                "audit_head_behind",
                published=published,
                file=str(self._start_head),
                head_key=key,
            )
            self._changed.set()
            return
        if published != str(self._start_head):
            # The file does not end where it ended when the head was published: lines
            # were removed or altered while the proxy was not running. Say so loudly.
            log.error(
                "audit_head_mismatch",
                published=published,
                file=str(self._start_head),
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
        if (self._write is None and self._file is None) or method in READ_METHODS:
            return
        if self._file is not None:
            self._file.check_path()  # a rotation links the new file before this line
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
        head = self.head
        line = seal(record, head.lines + 1, head.hash)
        line = self._secrets.redact(line.decode("utf-8")).encode("utf-8")
        if self._file is not None:
            self._file.append(line)
        elif self._write is not None:
            self._write(line + b"\n")
            self._head = Head(head.lines + 1, line_hash(line))
        self._published_change()

    def _published_change(self) -> None:
        self._metrics.audit_lines.set(self.head.lines)
        log.info("audit_head", head=str(self.head))
        self._changed.set()

    async def _publish(self, key: str) -> None:
        from redis.exceptions import RedisError

        assert self._redis is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            head = self.head
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
            head = self.head
            with contextlib.suppress(RedisError):
                await _store_head(self._redis, key, head)
            await self._redis.aclose()
        if self._file is not None:
            self._file.close()
            self._file = None
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


def _read_lines(path: Path) -> list[bytes]:
    """A file's lines with their line ends; a gzip file (logrotate's `compress`) unpacked."""
    with path.open("rb") as file:
        magic = file.read(2)
        file.seek(0)
        if magic == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=file) as unpacked:
                return unpacked.readlines()
        return file.readlines()


def _first_seq(lines: list[bytes]) -> float:
    for raw in lines:
        if b'"audit"' in raw:
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(raw)
                if isinstance(record, dict) and isinstance(record.get("seq"), int):
                    return float(record["seq"])
    return float("inf")  # no audit line yet: the newest file


def _reader(lines: list[bytes]) -> Callable[[], list[bytes]]:
    return lambda: lines


def verify_file(
    paths: Path | list[Path],
    *,
    head: str | None = None,
    redis_url: str | None = None,
    key: str | None = None,
    settings: AuditSettings | None = None,
) -> tuple[int, list[str]]:
    """`audit verify`: the exit status (0 intact, 1 tampered, 2 cannot tell) and the lines
    to print. `paths` are one audit file or its rotated files in any order: they are read
    oldest first, ordered by the first sequence number each holds. The head comes from
    `head` (LINES:HASH), else from Redis when a URL is known (given, or the config's),
    else the chain alone is checked."""
    from redis.exceptions import RedisError

    from proxy.records.audit_chain import verify_files

    files = [paths] if isinstance(paths, Path) else list(paths)
    newest = files[-1]
    published: Head | None = None
    redis_url = redis_url or (settings.redis_url if settings else None)
    try:
        if head is not None:
            published = Head.parse(head)
        elif redis_url:
            key = key or head_key(settings or AuditSettings(sink=str(newest)))
            published = asyncio.run(published_head(redis_url, key))
            if published is None:
                return 2, [f"{newest}: no head is published in Redis under {key!r}"]
    except ValueError as exc:
        return 2, [f"--head: {exc}"]
    except RedisError as exc:
        return 2, [f"cannot read the published head from Redis ({type(exc).__name__})"]
    contents: list[tuple[Path, list[bytes]]] = []
    for path in files:
        if not path.is_file():
            return 2, [f"{path}: no such file"]
        try:
            contents.append((path, _read_lines(path)))
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return 2, [f"{path}: cannot be read ({why})"]
    contents.sort(key=lambda item: _first_seq(item[1]))
    report = verify_files([(str(path), _reader(lines)) for path, lines in contents], published)
    named = ", ".join(str(path) for path, _ in contents)
    notes = [f"note: {note}" for note in (report.note or "").splitlines()]
    if report.problem is not None:
        return 1, [f"{report.file}: line {report.line_number}: {report.problem}", *notes]
    lines = [f"{named}: intact: {report.lines} audit lines, head {report.head}", *notes]
    if published is None:
        lines.append(
            "note: without the published head, removed last lines cannot be seen;"
            " pass --head LINES:HASH or --redis-url"
        )
    return 0, lines
