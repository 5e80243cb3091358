"""Live config changes: SIGHUP, or a change of the config file, without dropping a request.

A reload builds a whole new generation of the config (routes, clients, scopes, credentials,
budget) beside the one serving, then swaps one reference, `Live.current`. Each request
reads that reference once, when it starts, and keeps its generation to the end: requests
in flight finish on the config they started with, new ones get the new config, and no
request ever sees half of each.

- A config that fails any check `serve` would make is logged with every problem, and the
  running config keeps serving, untouched.
- Keys that take effect only at start (`RESTART_ONLY`) refuse the whole reload, naming
  each changed key, so the config that runs is always the file as written.
- Credentials the new config adds (or moves to another Vault path) are read before the
  swap; a reload whose new key cannot be read is refused. Credentials it removes stop
  being refreshed after the swap; unchanged ones keep their key and their refresh.
- A budget with unchanged limits is kept (its windows are what was spent); a changed one
  replaces it, and the old one is closed once the requests that hold it are done.

With `reload.watch: true` the config file's directory is watched (watchfiles: inotify on
Linux). A file that arrives whole, by rename (an editor's or a deploy's atomic write, or
the `..data` link through which Kubernetes swaps a mounted ConfigMap), is reloaded at once.
A file written in place is reloaded only once it is complete: no process holds it open
for writing (when the kernel can tell, through a lease probe) and its size, time and
digest stayed the same for `reload.settle_seconds` (editors and `cat >` write in
several pieces, with pauses between them). A file caught half-written, even one that
happens to be valid YAML, is never applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import signal
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from anyio import to_thread
from starlette.types import Receive, Scope, Send

from proxy.budget.shares import SharePlan
from proxy.budget.stores import Budget, MemoryBudget, make_budget
from proxy.config.settings import ConfigError, RateLimitSettings, Settings
from proxy.edge import signals
from proxy.hop.forwarder import Forwarder
from proxy.hop.services import Services
from proxy.loading import LoadedConfig, load_config
from proxy.rules.policy import build_routes

log = structlog.get_logger(__name__)

RESTART_ONLY = {
    "listen": "the proxy opens its listening socket once, at start",
    "logging": "the log pipeline is set up once, at start",
    "vault": "the Vault session (address, TLS, login) is made once, at start",
    "upstream": "the connection pool to Publer is made once, at start",
    "audit": "the audit sink is opened and its chain continued once, at start",
    "forward_proxy": "the forward-proxy listener and its CA are made once, at start",
}
# Kubernetes updates a mounted ConfigMap by re-pointing this link in the file's directory.
KUBERNETES_DATA_LINK = "..data"
WATCH_STEP_MS = 100  # a change is acted on once the directory is quiet this long
WATCH_RETRY_SECONDS = 5.0

Result = Literal["applied", "unchanged", "invalid", "refused"]


@dataclass
class Generation:
    """One loaded config and everything made from it; `inflight` counts its requests."""

    number: int
    config: LoadedConfig
    services: Services
    forwarder: Forwarder
    inflight: int = 0
    drained: asyncio.Event | None = None  # set when retired and its last request is done


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload attempt did, for the log, /readyz and the status page."""

    at: datetime
    trigger: str
    result: Result
    sha256: str | None
    problems: tuple[str, ...] = ()
    number: int = 0  # reload attempts since start, this one included

    def summary(self) -> dict[str, Any]:
        """The outcome without its problems (for /readyz, which anyone may read)."""
        return {
            "number": self.number,
            "at": self.at.isoformat(timespec="milliseconds"),
            "trigger": self.trigger,
            "result": self.result,
            "sha256": self.sha256,
        }


class Live:
    """The generation that serves new requests; itself the forwarding ASGI app."""

    def __init__(self, generation: Generation) -> None:
        self.current = generation
        self.last_reload: ReloadOutcome | None = None

    @property
    def services(self) -> Services:
        """The services of the generation that serves new requests."""
        return self.current.services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self.current  # read once: the request keeps this config to its end
        generation.inflight += 1
        try:
            await generation.forwarder(scope, receive, send)
        finally:
            generation.inflight -= 1
            if not generation.inflight and generation.drained is not None:
                generation.drained.set()

    def describe(self) -> dict[str, Any]:
        """The loaded config's digest and load time, and the last reload's outcome."""
        generation = self.current
        found: dict[str, Any] = {
            "sha256": generation.config.sha256,
            "loaded_at": generation.config.loaded_at.isoformat(timespec="seconds"),
            "generation": generation.number,
        }
        if self.last_reload is not None:
            found["last_reload"] = self.last_reload.summary()
        return found


def restart_only_changes(old: Settings, new: Settings) -> list[str]:
    """One line per changed key that only takes effect at start, naming the key."""
    problems = []
    for section, why in RESTART_ONLY.items():
        before, after = (
            None if part is None else part.model_dump(mode="json")
            for part in (getattr(old, section), getattr(new, section))
        )
        for key in _changed_keys(before, after, section):
            problems.append(
                f"{key}: cannot change while the proxy runs ({why}); restart the proxy to"
                " apply it, or put the old value back and reload"
            )
    return problems


def _changed_keys(before: Any, after: Any, where: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(before.keys() | after.keys()):
            found += _changed_keys(before.get(key), after.get(key), f"{where}.{key}")
        return found
    return [where] if before != after else []


def _same_limits(old: RateLimitSettings, new: RateLimitSettings) -> bool:
    # max_wait_seconds is read per request; only these need another budget.
    return (old.requests, old.per_seconds, old.redis_url) == (
        new.requests,
        new.per_seconds,
        new.redis_url,
    )


def budget_for(current: Budget, old: RateLimitSettings, new: RateLimitSettings) -> Budget:
    """The budget a new config spends from: the same one while its limits are unchanged;
    otherwise a new one that, in memory, carries on the old one's windows."""
    if _same_limits(old, new):
        return current
    budget = make_budget(new)
    if isinstance(budget, MemoryBudget) and isinstance(current, MemoryBudget):
        budget.adopt(current)
    return budget


def next_services(current: Services, config: LoadedConfig) -> Services:
    """The services of a new config: what the config decides is made anew; the
    credential store, the upstream pool, the metrics and the refusal counts are shared."""
    settings = config.settings
    return replace(
        current,
        settings=settings,
        routes=build_routes(settings.routes),
        scope_map=config.scope_map,
        budget=budget_for(current.budget, current.settings.rate_limit, settings.rate_limit),
        shares=SharePlan.of(settings.routes),
    )


@dataclass
class Reloader:
    """Reloads the config file on SIGHUP and, when configured, when the file changes."""

    live: Live
    path: Path
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _retiring: dict[asyncio.Task[None], Budget] = field(default_factory=dict)
    _watcher: asyncio.Task[None] | None = None
    _watch_stop: asyncio.Event = field(default_factory=asyncio.Event)
    _hangup: bool = False
    _attempts: int = 0
    _settling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take SIGHUP (unless it stops this program, as in `dev`), watch the file if
        configured, and catch up with a SIGHUP or a file change that came while the proxy
        was starting."""
        loop = asyncio.get_running_loop()
        hangup_during_start = False
        if signals.hangup_reloads():
            hangup_during_start = signals.register_reload(
                lambda: loop.call_soon_threadsafe(self._on_hangup)
            )
            self._hangup = True
        self._sync_watcher(self.live.current.config.settings)
        if hangup_during_start:
            await self.reload("SIGHUP")
        elif await to_thread.run_sync(self._file_digest) != self.live.current.config.sha256:
            await self.reload("changed during start", only_if_changed=True)

    async def stop(self) -> None:
        """Stop taking signals (a SIGHUP from now on is only remembered) and watching;
        close budgets still waiting for their requests (the server has finished every
        request by now)."""
        if self._hangup:
            signals.register_reload(None)
        self._watch_stop.set()
        tasks = [*self._tasks, *self._retiring]
        if self._watcher is not None:
            tasks.append(self._watcher)
        if self._settling is not None:
            tasks.append(self._settling)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for budget in self._retiring.values():
            await budget.close()
        self._retiring.clear()

    def _on_hangup(self) -> None:
        # A hangup also says "logs were rotated", as for nginx: the audit file is reopened.
        self.live.current.services.audit.reopen()
        self._spawn(self.reload("SIGHUP"))

    def _spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _file_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    async def reload(self, trigger: str, *, only_if_changed: bool = False) -> ReloadOutcome:
        """Load the file and, when it passes every check, serve it; one reload at a time."""
        async with self._lock:
            try:
                outcome = await self._reload(trigger, only_if_changed)
            except Exception as exc:  # a bug must not end the process that serves
                log.exception("config_reload_crashed", trigger=trigger)
                problem = f"the reload failed unexpectedly ({type(exc).__name__}); report it"
                outcome = _rejected(trigger, "refused", None, [problem])
        if outcome.result != "unchanged":
            self._attempts += 1
            outcome = replace(outcome, number=self._attempts)
            self.live.last_reload = outcome
            self.live.current.services.metrics.config_reloads.labels(outcome.result).inc()
        return outcome

    async def _reload(self, trigger: str, only_if_changed: bool) -> ReloadOutcome:
        current = self.live.current
        try:
            config = await to_thread.run_sync(load_config, self.path)
        except ConfigError as exc:
            problems = list(exc.problems)
            if exc.partial is not None:  # name the keys a restart needs, among the valid ones
                problems += [
                    line
                    for line in restart_only_changes(current.config.settings, exc.partial)
                    if line.split(":")[0].split(".")[0] in exc.valid_keys
                ]
            return _rejected(trigger, "invalid", None, problems)
        for value in config.settings.secret_values():  # before anything is logged
            current.services.secrets.add(value)
        if only_if_changed and config.sha256 == current.config.sha256:
            return ReloadOutcome(config.loaded_at, trigger, "unchanged", config.sha256)
        problems = restart_only_changes(current.config.settings, config.settings)
        if problems:
            return _rejected(trigger, "refused", config.sha256, problems)
        store = current.services.credentials
        staged = await store.stage(config.settings.credentials_in_use())
        if staged.problems:
            return _rejected(trigger, "refused", config.sha256, staged.problems)
        services = next_services(current.services, config)
        # The swap: from here on, new requests get the new generation.
        self.live.current = Generation(current.number + 1, config, services, Forwarder(services))
        store.commit(staged)
        if services.budget is not current.services.budget:
            self._retire(current, current.services.budget)
        self._sync_watcher(config.settings)
        old_routes = {r.name for r in current.config.settings.routes}
        new_routes = {r.name for r in config.settings.routes}
        log.info(
            "config_reloaded",
            trigger=trigger,
            sha256=config.sha256,
            generation=current.number + 1,
            routes_added=sorted(new_routes - old_routes),
            routes_removed=sorted(old_routes - new_routes),
            credentials_added=staged.added,
            credentials_removed=staged.removed,
            in_flight_on_previous=current.inflight,
        )
        return ReloadOutcome(config.loaded_at, trigger, "applied", config.sha256)

    def _retire(self, generation: Generation, budget: Budget) -> None:
        generation.drained = asyncio.Event()
        if not generation.inflight:
            generation.drained.set()

        async def drain(drained: asyncio.Event) -> None:
            await drained.wait()
            await budget.close()

        task = asyncio.create_task(drain(generation.drained))
        self._retiring[task] = budget
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def _sync_watcher(self, settings: Settings) -> None:
        running = self._watcher is not None and not self._watcher.done()
        if settings.reload.watch and not running:
            self._watch_stop = asyncio.Event()
            self._watcher = asyncio.create_task(self._watch(self._watch_stop))
            log.info("config_watch_started", path=str(self.path))
        elif not settings.reload.watch and running:
            self._watch_stop.set()
            log.info("config_watch_stopped", path=str(self.path))

    async def _watch(self, stop: asyncio.Event) -> None:
        # Imported here: only a proxy that watches its file pays for the library.
        from watchfiles import Change, awatch

        directory = self.path.absolute().parent
        names = {self.path.name, KUBERNETES_DATA_LINK}
        while not stop.is_set():
            try:
                async for changes in awatch(
                    directory,
                    watch_filter=lambda _change, changed: Path(changed).name in names,
                    step=WATCH_STEP_MS,
                    stop_event=stop,
                    recursive=False,
                ):
                    # Only names arriving (a rename onto them) and nothing written: whole.
                    arrived = all(change == Change.added for change, _ in changes)
                    if self._settling is not None:
                        self._settling.cancel()
                    self._settling = asyncio.create_task(self._apply_when_complete(arrived))
            except (OSError, RuntimeError) as exc:
                log.warning(
                    "config_watch_failed",
                    path=str(directory),
                    error=type(exc).__name__,
                    retry_seconds=WATCH_RETRY_SECONDS,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WATCH_RETRY_SECONDS)

    async def _apply_when_complete(self, arrived: bool) -> None:
        """Reload once the file is complete: at once when it arrived by rename and nobody
        writes it, else once it stayed unchanged for `reload.settle_seconds` with no writer."""
        if not arrived or _open_for_writing(self.path):
            settled = None
            while True:
                seen = await to_thread.run_sync(self._signature)
                if seen == settled and not _open_for_writing(self.path):
                    break
                settled = seen
                await asyncio.sleep(self.live.current.config.settings.reload.settle_seconds)
        self._spawn(self.reload("file change", only_if_changed=True))

    def _signature(self) -> tuple[int, int, int, str | None] | None:
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_ino, status.st_size, status.st_mtime_ns, self._file_digest()


def _open_for_writing(path: Path) -> bool:
    """Whether some process has the file open for writing, as far as the kernel says: a
    read lease cannot be taken on such a file (fcntl(2), F_SETLEASE). Where a lease is
    not allowed (a file this process does not own, leases off, not the main thread) this
    says False and the settle time alone decides."""
    try:
        # A writer opening the file while the lease is held breaks it, and the kernel
        # tells the holder with SIGIO, whose default action ends the process.
        previous = signal.signal(signal.SIGIO, signal.SIG_IGN)
    except ValueError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        signal.signal(signal.SIGIO, previous)
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


def _rejected(
    trigger: str, result: Result, sha256: str | None, problems: list[str]
) -> ReloadOutcome:
    log.error(
        "config_reload_rejected",
        trigger=trigger,
        result=result,
        sha256=sha256,
        problems=problems,
        detail="the running config is unchanged and keeps serving",
    )
    return ReloadOutcome(datetime.now(UTC), trigger, result, sha256, tuple(problems))
