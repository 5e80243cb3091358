"""The keys the proxy holds: read from their sources, refreshed, aged out.

Every source (Vault, AWS Secrets Manager, Azure Key Vault, a file, the environment) gets
the same life. The request path only ever reads `current()`, which never waits on a
source. A background task per credential re-reads it every `refresh_seconds` (sooner
when a file source sees its file change); after a failure it waits with a backoff that
counts the calls one read makes (the SDK's retries) and grows past `refresh_seconds`, so
a failing source is asked less often than a healthy one, never more, and never sooner
than a source's Retry-After allows unless the key would expire first. Another task keeps
the Vault token alive when a credential is in Vault. A new value or version is a
rotation, logged with both masked keys. A key stays usable while its last good read is
at most `refresh_seconds + max_stale_seconds` old and its version's own expiry (when the
source has one) has not passed, so an outage of a source costs nothing until then, and
nothing is ever forwarded without a key. A source that finds the held version disabled
or expired withdraws it at once (`key_withdrawn`) instead of letting it serve stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

import structlog
from anyio import to_thread
from prometheus_client import Counter

from proxy.config.settings import AnyCredential, KeyLifeSettings, VaultSettings
from proxy.keys.sources import make_source
from proxy.keys.sources.base import (
    BACKOFF_MAX_SECONDS,
    KeySource,
    SecretRead,
    SourceError,
    backoff_seconds,
    read_backoff_seconds,
)
from proxy.masking.secrets import mask
from proxy.rules.refusals import CredentialUnavailable

if TYPE_CHECKING:
    from proxy.keys.sources.vault import VaultSession
    from proxy.masking.secrets import SecretRegistry

    # The process's metrics, handed in: annotations only, so keys never load records.
    from proxy.records.metrics import Metrics

log = structlog.get_logger(__name__)

State = Literal["fresh", "stale", "expired", "missing"]
ROTATION_WARNING_PERIOD = 24 * 3600.0
# A 401 storm after the re-read found no new key must not turn into a source read storm.
REREAD_MIN_INTERVAL = 1.0


@dataclass(frozen=True)
class HeldKey:
    """A key read from its source, with what the logs and metrics say about it."""

    value: str = field(repr=False)
    version: int | str | None
    created_time: datetime | None
    read_at: float  # time.monotonic() of the read
    not_after: datetime | None = None  # the version's own expiry, when its source says

    def past_expiry(self) -> bool:
        """True once the version's own expiry time (not the proxy's staleness) has passed."""
        return self.not_after is not None and datetime.now(UTC) >= self.not_after

    @property
    def masked(self) -> str:
        """The key as logs may show it."""
        return mask(self.value) or "***"


@dataclass
class Staged:
    """A new set of credentials, read and ready to be committed by `CredentialStore.commit`.

    `problems` names each added or moved credential whose key could not be read; a reload
    with problems is not applied.
    """

    slots: dict[str, _Slot]
    added: list[str]
    removed: list[str]
    problems: list[str]


@dataclass
class _Slot:
    name: str
    settings: KeyLifeSettings
    source: KeySource
    key: HeldKey | None = None
    last_error: str | None = None
    last_attempt_failed: bool = False
    reread: asyncio.Task[HeldKey] | None = None
    reread_at: float = -math.inf
    warned_rotation_at: float = -math.inf
    next_read_at: float | None = None  # time.monotonic() the refresh reads again
    refused_version: int | str | None = None  # the last version refused as no API key
    retry_at: float = -math.inf  # a source that said "retry after" is not asked before


def vault_session_maker(
    settings: VaultSettings, secrets: SecretRegistry, given: VaultSession | None = None
) -> tuple[Callable[[], VaultSession], Callable[[], VaultSession | None]]:
    """(make, made): the one Vault session, made on first use only, so that hvac is not
    even imported when no credential is in Vault."""
    made: list[VaultSession] = [given] if given is not None else []

    def make() -> VaultSession:
        if not made:
            from proxy.keys.sources.vault import VaultSession

            made.append(VaultSession(settings, secrets))
        return made[0]

    return make, lambda: made[0] if made else None


class CredentialStore:
    """Holds one key per credential that a route uses, and keeps them current."""

    def __init__(
        self,
        credentials: Mapping[str, AnyCredential],
        metrics: Metrics,
        *,
        secrets: SecretRegistry,
        vault_settings: VaultSettings,
        vault: VaultSession | None = None,
    ) -> None:
        """Make each credential's source (an environment source takes its variable out of
        the environment here); `vault` is a ready session to use instead of a new one."""
        self._secrets = secrets
        self._make_vault, self._made_vault = vault_session_maker(vault_settings, secrets, vault)
        self._slots = {name: self._new_slot(name, cred) for name, cred in credentials.items()}
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._token_task: asyncio.Task[None] | None = None
        self._started = False
        # The label sets of the per-credential counters, to remove a credential's series
        # when a reload removes the credential.
        self._counted: set[tuple[Counter, tuple[str, ...]]] = set()
        self._refreshers: dict[str, tuple[_Slot, asyncio.Task[None]]] = {}
        self._logged_in = False

    def _new_slot(self, name: str, credential: AnyCredential) -> _Slot:
        return _Slot(name, credential, make_source(credential, self._secrets, self._make_vault))

    @property
    def _session(self) -> VaultSession | None:
        """The Vault session, when a credential in service is in Vault."""
        if any(slot.source.kind == "vault" for slot in self._slots.values()):
            return self._made_vault()
        return None

    def close(self) -> None:
        """Release every source's connections."""
        for slot in self._slots.values():
            slot.source.close()
        session = self._made_vault()
        if session is not None:
            session.close()

    def sources(self) -> dict[str, KeySource]:
        """Each credential's source."""
        return {name: slot.source for name, slot in self._slots.items()}

    async def start(self, initial_timeout: float = 10.0) -> None:
        """Read every key once (logging in to Vault first when one holds keys), waiting at
        most `initial_timeout` seconds, then keep them fresh in the background.

        A failure here is not fatal: the proxy serves 503 for that credential and keeps
        trying, so a proxy started before its source comes up heals by itself.
        """
        try:
            await asyncio.wait_for(self._first_reads(), initial_timeout)
        except TimeoutError:
            log.warning("key_initial_read_timeout", seconds=initial_timeout)
        self._started = True
        self._start_token_upkeep()
        for slot in self._slots.values():
            self._start_refresh(slot)

    def _start_token_upkeep(self) -> None:
        if self._session is not None and self._token_task is None:
            self._token_task = asyncio.create_task(self._maintain_token(), name="vault-token")
            self._tasks.append(self._token_task)

    def _start_refresh(self, slot: _Slot) -> None:
        task = asyncio.create_task(self._refresh_loop(slot), name=f"refresh-{slot.name}")
        self._refreshers[slot.name] = (slot, task)

    async def stop(self) -> None:
        """Cancel the background tasks."""
        tasks = self._tasks + [task for _, task in self._refreshers.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._refreshers.clear()
        self._token_task = None

    async def stage(
        self, credentials: Mapping[str, AnyCredential], seconds: float = 10.0
    ) -> Staged:
        """Prepare a new set of credentials without touching the one in use.

        A credential whose settings did not change keeps its slot (key and refresh task);
        one whose place (source and where in it) did not change keeps its source and key
        under the new settings; every other one gets a new source and is read now, so that
        the first request after `commit` finds its key held.
        """
        slots: dict[str, _Slot] = {}
        to_read: list[_Slot] = []
        for name, settings in credentials.items():
            old = self._slots.get(name)
            if old is not None and old.settings == settings:
                slots[name] = old
            elif old is not None and _location(old.settings) == _location(settings):
                slots[name] = _Slot(name, settings, old.source, key=old.key)
            else:
                slots[name] = self._new_slot(name, settings)
                to_read.append(slots[name])
        if to_read:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(self._read(slot) for slot in to_read)), seconds
                )
        problems = [
            f"credentials.{slot.name}: the key could not be read from {slot.source.kind}"
            f" {slot.source.where}"
            f" ({slot.last_error or f'no answer within {seconds:g} s'}); check where the"
            " credential points, and that the proxy may read it there"
            for slot in to_read
            if slot.key is None
        ]
        staged = Staged(
            slots=slots,
            added=[name for name in slots if name not in self._slots],
            removed=[name for name in self._slots if name not in slots],
            problems=problems,
        )
        if problems:
            _close_sources(slot for slot in to_read)
        return staged

    def commit(self, staged: Staged) -> None:
        """Serve the staged credentials: start refreshing new slots, stop the old ones'."""
        kept = {id(slot.source) for slot in staged.slots.values()}
        _close_sources(s for s in self._slots.values() if id(s.source) not in kept)
        self._slots = staged.slots
        for name, (slot, task) in list(self._refreshers.items()):
            if staged.slots.get(name) is not slot:
                task.cancel()
                del self._refreshers[name]
        for name in staged.removed:
            metrics = self._metrics
            for gauge in (metrics.key_age, metrics.key_read_age, metrics.budget_left):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
            for counter, labels in list(self._counted):
                if labels[0] == name:
                    with contextlib.suppress(KeyError):
                        counter.remove(*labels)
                    self._counted.discard((counter, labels))
        if self._started:  # new slots are refreshed from now on
            self._start_token_upkeep()
            for name, slot in staged.slots.items():
                if name not in self._refreshers:
                    self._start_refresh(slot)

    async def _first_reads(self) -> None:
        logged_in = self._session is None or await self._login()
        slots = [s for s in self._slots.values() if logged_in or s.source.kind != "vault"]
        await asyncio.gather(*(self._read(slot) for slot in slots))

    def _vault_slots(self) -> list[_Slot]:
        return [slot for slot in self._slots.values() if slot.source.kind == "vault"]

    async def _login(self) -> bool:
        session = self._made_vault()
        assert session is not None  # made with the first Vault source
        try:
            await to_thread.run_sync(session.login)
        except SourceError as exc:
            self._metrics.vault_operations.labels("login", exc.kind).inc()
            log.warning(
                "vault_login_failed",
                reason=exc.reason,
                server_said=exc.detail,
                auth=session.auth_summary,
            )
            for slot in self._vault_slots():
                slot.last_error = exc.reason
                slot.last_attempt_failed = True
            return False
        self._metrics.vault_operations.labels("login", "ok").inc()
        log.info("vault_logged_in", auth=session.auth_summary)
        self._logged_in = True
        return True

    async def _read(self, slot: _Slot) -> HeldKey | None:
        source = slot.source
        if source.kind == "vault" and not self._logged_in and not await self._login():
            return None
        try:
            read: SecretRead = await to_thread.run_sync(source.read)
        except SourceError as exc:
            self._count_read(slot, exc.kind)
            slot.last_error = exc.reason
            slot.last_attempt_failed = True
            refused = {}
            if exc.kind == "invalid":
                slot.refused_version = exc.version
                # The key held before stays in use: say which one, and which was refused.
                refused = {
                    "refused_version": exc.version,
                    "key": slot.key.masked if slot.key else None,
                    "key_version": slot.key.version if slot.key else None,
                }
            if exc.retry_after is not None:
                slot.retry_at = time.monotonic() + exc.retry_after
            if exc.drop_key and slot.key is not None:
                # A version its owner disabled or that expired is not served stale.
                log.warning(
                    "key_withdrawn",
                    credential=slot.name,
                    source=source.kind,
                    key=slot.key.masked,
                    key_version=slot.key.version,
                    reason=exc.reason,
                )
                slot.key = None
            log.warning(
                "key_read_failed",
                credential=slot.name,
                source=source.kind,
                where=source.where,
                reason=exc.reason,
                server_said=exc.detail,
                state=_state(slot),
                **refused,
            )
            return None
        self._count_read(slot, "ok")
        held = HeldKey(
            read.value, read.version, read.created_time, time.monotonic(), read.not_after
        )
        slot.refused_version = None
        # Every source's every read, whatever it finds: what an operator debugging a
        # source (AWS, a file) looks for first.
        log.debug(
            "key_read",
            credential=slot.name,
            source=source.kind,
            where=source.where,
            key=held.masked,
            key_version=held.version,
        )
        previous = slot.key
        slot.key, slot.last_error, slot.last_attempt_failed = held, None, False
        slot.retry_at = -math.inf  # answering again: its earlier "wait" is over
        if previous is None:
            log.info(
                "key_loaded",
                credential=slot.name,
                source=source.kind,
                where=source.where,
                key=held.masked,
                key_version=held.version,
            )
        elif previous.value == held.value and previous.version == held.version:
            log.debug(
                "key_refreshed", credential=slot.name, key=held.masked, key_version=held.version
            )
        else:
            self._count(self._metrics.key_rotations, slot.name, source.kind)
            log.info(
                "key_rotated",
                credential=slot.name,
                source=source.kind,
                old_key=previous.masked,
                old_version=previous.version,
                key=held.masked,
                key_version=held.version,
            )
        self._warn_if_old(slot, held)
        return held

    def _count(self, counter: Counter, *labels: str) -> None:
        counter.labels(*labels).inc()
        self._counted.add((counter, labels))

    def _count_read(self, slot: _Slot, outcome: str) -> None:
        self._count(self._metrics.key_reads, slot.name, slot.source.kind, outcome)
        if slot.source.kind == "vault":
            self._metrics.vault_operations.labels("read", outcome).inc()

    def _warn_if_old(self, slot: _Slot, held: HeldKey) -> None:
        age = self.key_age_days(held)
        now = time.monotonic()
        if (
            age is not None
            and age > slot.settings.rotate_after_days
            and now - slot.warned_rotation_at >= ROTATION_WARNING_PERIOD
        ):
            slot.warned_rotation_at = now
            log.warning(
                "key_rotation_due",
                credential=slot.name,
                key=held.masked,
                key_version=held.version,
                age_days=round(age, 1),
                rotate_after_days=slot.settings.rotate_after_days,
            )

    @staticmethod
    def key_age_days(held: HeldKey) -> float | None:
        """Days since the key's version was written; None when its source does not say."""
        if held.created_time is None:
            return None
        return (datetime.now(UTC) - held.created_time).total_seconds() / 86400

    async def _refresh_loop(self, slot: _Slot) -> None:
        failures = 0
        while True:
            if slot.last_attempt_failed or slot.key is None:
                failures += 1
                delay = read_backoff_seconds(
                    failures,
                    slot.settings.refresh_seconds,
                    slot.source.calls_per_read,
                    usable_for=_usable_for(slot),
                )
                delay = _honour_retry_after(slot, delay)
            else:
                failures = 0
                delay = self.jitter(slot.settings.refresh_seconds)
            slot.next_read_at = time.monotonic() + delay
            await self._until_due(slot.source, delay)
            await self._read(slot)

    @staticmethod
    async def _until_due(source: KeySource, delay: float) -> None:
        """Sleep `delay` seconds, or less when a source that can tell sees a change."""
        poll = source.poll_seconds
        if poll is None:
            await asyncio.sleep(delay)
            return
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(poll, left))
            if await to_thread.run_sync(source.changed):
                return

    async def _maintain_token(self) -> None:
        session = self._made_vault()
        assert session is not None
        failures = 0
        while True:
            if not self._logged_in:
                failures += 1
                await asyncio.sleep(backoff_seconds(failures))
                await self._login()
                continue
            due = session.token_maintenance_due_in()
            await asyncio.sleep(min(due, 3600.0))
            if due > 3600.0:
                continue
            try:
                await to_thread.run_sync(session.maintain_token)
            except SourceError as exc:
                failures += 1
                self._metrics.vault_operations.labels("renew", exc.kind).inc()
                log.warning(
                    "vault_token_maintenance_failed", reason=exc.reason, server_said=exc.detail
                )
                await asyncio.sleep(backoff_seconds(failures))
            else:
                failures = 0
                self._metrics.vault_operations.labels("renew", "ok").inc()

    def state(self, name: str) -> State:
        """fresh, stale (usable, last refresh failed or overdue), expired, or missing."""
        return _state(self._slots[name])

    def current(self, name: str) -> HeldKey:
        """The usable key of a credential, or CredentialUnavailable; never waits on a source."""
        slot = self._slot(name)
        state = _state(slot)
        if slot.key is not None and slot.key.past_expiry():
            raise CredentialUnavailable(
                name,
                f"version {slot.key.version} of the key in {slot.source.kind} is past its"
                " expiry time, and no newer valid version could be read"
                + (f" ({slot.last_error})" if slot.last_error else ""),
            )
        if slot.key is None or state in ("missing", "expired"):
            reason = slot.last_error or f"not read from {slot.source.kind} yet"
            if state == "expired":
                reason = f"the last good key is older than max_stale_seconds ({reason})"
            raise CredentialUnavailable(name, reason)
        return slot.key

    async def reread(self, name: str, rejected: HeldKey) -> HeldKey:
        """After Publer rejected `rejected`, re-read the key once for everyone.

        Requests that saw the same rejected key share one read of the source, run as a task of its
        own so that a client going away cannot cancel it for the others; a request that
        comes after the key already changed gets the new key without another read.
        Raises CredentialUnavailable when no usable key is left after the read.
        """
        slot = self._slot(name)
        if slot.key is not None and slot.key.value != rejected.value:
            return slot.key
        now = time.monotonic()
        if slot.last_attempt_failed and slot.next_read_at is not None and now < slot.next_read_at:
            # The source is failing and backing off: a rejected key does not ask it sooner.
            return self.current(name)
        task = slot.reread
        recent = now - slot.reread_at < REREAD_MIN_INTERVAL
        if task is None or (task.done() and not recent):
            task = slot.reread = asyncio.create_task(self._reread(slot))
        return await asyncio.shield(task)

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:  # a request that started before a reload removed the credential
            raise CredentialUnavailable(name, "the credential was removed by a config reload")
        return slot

    async def _reread(self, slot: _Slot) -> HeldKey:
        if time.monotonic() < slot.retry_at:  # the source asked for a pause: keep it
            return self.current(slot.name)
        try:
            await self._read(slot)
        finally:
            slot.reread_at = time.monotonic()
        return self.current(slot.name)

    def status(self) -> dict[str, dict[str, object]]:
        """Per-credential state for /readyz and `check --online`; never a key.

        `{name: {"state", "key" (masked), "key_version", "last_read_seconds_ago",
        "key_age_days", "rotation_due", "reason", "refused_version",
        "next_read_in_seconds"}}`, each field
        present when known (the next read is due when the refresh or its backoff says).
        """
        out: dict[str, dict[str, object]] = {}
        now = time.monotonic()
        for name, slot in self._slots.items():
            entry: dict[str, object] = {
                "state": _state(slot),
                "source": slot.source.kind,
                "where": slot.source.where,
            }
            if slot.key is not None:
                entry["key"] = slot.key.masked
                entry["key_version"] = slot.key.version
                entry["last_read_seconds_ago"] = round(now - slot.key.read_at, 1)
                age = self.key_age_days(slot.key)
                if age is not None:
                    entry["key_age_days"] = round(age, 2)
                    entry["rotation_due"] = age > slot.settings.rotate_after_days
            if slot.last_error:
                entry["reason"] = slot.last_error
            if slot.refused_version is not None:
                entry["refused_version"] = slot.refused_version
            if slot.next_read_at is not None:
                entry["next_read_in_seconds"] = round(max(slot.next_read_at - now, 0.0), 1)
            out[name] = entry
        return out

    def update_metrics(self) -> None:
        """Refresh the key-age gauges, just before a scrape."""
        now = time.monotonic()
        for name, slot in self._slots.items():
            if slot.key is None:
                continue
            self._metrics.key_read_age.labels(name).set(now - slot.key.read_at)
            age = self.key_age_days(slot.key)
            self._metrics.key_age.labels(name).set(
                age * 86400 if age is not None else now - slot.key.read_at
            )

    def ready(self) -> bool:
        """True when every credential holds a usable key (fresh or stale in bounds)."""
        return all(_state(slot) in ("fresh", "stale") for slot in self._slots.values())

    @staticmethod
    def jitter(seconds: float) -> float:
        """`seconds` plus or minus 10%, so replicas do not hit their source in step."""
        return seconds * random.uniform(0.9, 1.1)


def _state(slot: _Slot) -> State:
    if slot.key is None:
        return "missing"
    if slot.key.past_expiry():
        return "expired"
    age = time.monotonic() - slot.key.read_at
    if age > slot.settings.refresh_seconds + slot.settings.max_stale_seconds:
        return "expired"
    if slot.last_attempt_failed or age > slot.settings.refresh_seconds * 2:
        return "stale"
    return "fresh"


def _usable_for(slot: _Slot) -> float | None:
    """Seconds the held key stays usable, or None when none is."""
    if slot.key is None:
        return None
    left = slot.key.read_at + slot.settings.refresh_seconds + slot.settings.max_stale_seconds
    left -= time.monotonic()
    return left if left > 0 else None


def _honour_retry_after(slot: _Slot, delay: float) -> float:
    """The delay before the next read: at least what the source asked for with its
    Retry-After, but never past the moment the held key stops being usable, so a long
    Retry-After cannot turn a stale key into an expired one unasked."""
    wait = slot.retry_at - time.monotonic()
    if wait <= delay:
        return delay
    wait = min(wait, BACKOFF_MAX_SECONDS)
    if slot.key is not None:
        usable = slot.settings.refresh_seconds + slot.settings.max_stale_seconds
        left = usable - (time.monotonic() - slot.key.read_at)
        wait = min(wait, max(left - 1.0, delay))
    return wait


def _location(settings: KeyLifeSettings) -> dict[str, object]:
    """Where a credential's key is read: its settings but how often and how long."""
    return settings.model_dump(exclude=set(KeyLifeSettings.model_fields))


def _close_sources(slots: Iterable[_Slot]) -> None:
    for slot in slots:
        slot.source.close()
