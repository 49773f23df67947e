"""The operator's loop: watch events into the index, keys fetched, status written.

Three flows, none waiting on another:
- Watch events (`on_event`, called by the adapter in the event loop) update the
  `PolicyIndex` and the record of what is on each object (resourceVersion,
  generation, status), call `on_change` when a snapshot may have changed (the
  distribution server's `notify`), and keep the operator's `KeyRegistry` to the
  issuers of the enforced policies. Nothing here does I/O, so a slow API
  server or JWKS endpoint never delays a snapshot.
- Resyncs: a full list of our own replaces the index (`PolicyIndex.replace_all`)
  at start, every `resync_interval`, and soon after the watch relisted (kopf
  does not report deletions it missed in a watch gap). Keys with an event
  newer than the list are left alone, so a resync never undoes a newer event.
- Status (leader only): every `status_interval`, or at once after a change, the
  desired status of each policy (`status.desired_status`) is compared with the
  one on the object; only a difference is written, as a merge patch carrying
  the object's resourceVersion, in its own task. A 409 re-reads the object and
  tries again; a 5xx or a timeout backs off per policy; the next pass retries
  until what is on the object is what is desired. After a write that changed a
  state (`status.state_changes`), an Event says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from lastguard.operator import kube, status
from lastguard.operator.index import Entry, PolicyIndex, PolicyKey, policy_key
from lastguard.sidecar.jwks_cache import KeyRegistry, KeyStatus

log = logging.getLogger("lastguard.operator")

WATCH_EVENTS = Counter(
    "lastguard_operator_watch_events_total",
    "JWTPolicy watch events by type (LISTED, ADDED, MODIFIED, DELETED).",
    ["type"],
)
STATUS_WRITES = Counter(
    "lastguard_operator_status_writes_total",
    "Status patches by result (ok, conflict, unavailable, rejected, not_found).",
    ["result"],
)
EVENTS_POSTED = Counter(
    "lastguard_operator_events_total", "Kubernetes Events posted by result (ok, error).", ["result"]
)
RESYNCS = Counter(
    "lastguard_operator_resyncs_total", "Full lists by result (ok, error).", ["result"]
)
POLICIES = Gauge(
    "lastguard_operator_policies", "JWTPolicies known, by state (valid, invalid).", ["state"]
)

SidecarCounts = Callable[[PolicyKey], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class Observed:
    """What is on the object, as last seen (watch event, list, patch answer or re-read)."""

    resource_version: str | None
    generation: int | None
    uid: str | None
    status: Mapping[str, Any] | None

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Observed:
        meta = obj.get("metadata") or {}
        generation = meta.get("generation")
        found = obj.get("status")
        return cls(
            resource_version=meta.get("resourceVersion"),
            generation=generation if isinstance(generation, int) else None,
            uid=meta.get("uid"),
            status=found if isinstance(found, Mapping) else None,
        )


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Waits until `event` is set or `seconds` pass.

    Not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that
    arrives as the event is set, and a loop around it would then never end.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Controller:
    def __init__(
        self,
        api: kube.KubeApi,
        registry: KeyRegistry,
        *,
        index: PolicyIndex | None = None,
        on_change: Callable[[], None] = lambda: None,
        sidecars: SidecarCounts | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        identity: str = "",
        now: Callable[[], datetime.datetime] = _utcnow,
        clock: Callable[[], float] = time.monotonic,
        status_interval: float = 2.0,
        resync_interval: float = 300.0,
        relist_delay: float = 0.5,
        write_backoff: Sequence[float] = (0.5, 1, 2, 4, 8, 16, 30),
        max_concurrent_writes: int = 8,
    ) -> None:
        self.api = api
        self.registry = registry
        self.index = index if index is not None else PolicyIndex()
        #: Set once the first full list is in the index.
        self.synced = asyncio.Event()
        self._on_change = on_change
        self._sidecars = sidecars
        self._is_leader = is_leader
        self._identity = identity
        self._now = now
        self._clock = clock
        self._status_interval = status_interval
        self._resync_interval = resync_interval
        self._relist_delay = relist_delay
        self._write_backoff = tuple(write_backoff) or (1.0,)
        self._write_slots = asyncio.Semaphore(max_concurrent_writes)

        self._observed: dict[PolicyKey, Observed] = {}
        self._seq = 0
        self._touched: dict[PolicyKey, int] = {}
        self._notified_revision = -1
        self._wake = asyncio.Event()
        self._resync_wanted = asyncio.Event()
        self._writing: dict[PolicyKey, asyncio.Task[None]] = {}
        self._failures: dict[PolicyKey, int] = {}
        self._retry_at: dict[PolicyKey, float] = {}
        self._conflicts: tuple[int, dict[PolicyKey, status.ConflictInfo]] = (-1, {})

    # --- running ---

    async def run(self) -> None:
        """Watches, resyncs, refreshes keys and writes status until cancelled."""
        try:
            async with asyncio.TaskGroup() as tasks:
                # Created before the watch starts kopf, which then leaves them alone.
                tasks.create_task(self._resync_loop(), name="lastguard-resync")
                tasks.create_task(self._status_loop(), name="lastguard-status")
                tasks.create_task(self.registry.run(), name="lastguard-keys")
                tasks.create_task(self._watch(), name="lastguard-watch")
        finally:
            await self._stop_writes()

    async def _watch(self) -> None:
        await self.api.watch_policies(self.on_event)
        raise RuntimeError("the JWTPolicy watch ended")  # it never should: stop the operator

    def leadership_changed(self, leader: bool) -> None:
        """The elector's callback: a new leader reconciles at once."""
        if leader:
            self._retry_at.clear()
            self._wake.set()

    def status_inputs_changed(self) -> None:
        """Something a status shows changed outside the index (e.g. sidecar counts)."""
        self._wake.set()

    # --- watch events ---

    def on_event(self, event: kube.WatchEvent) -> None:
        WATCH_EVENTS.labels(type=event.type).inc()
        obj = event.object
        key = policy_key(obj)
        uid = (obj.get("metadata") or {}).get("uid")
        known = self.index.entries.get(key)
        replaced = known is not None and None not in (known.uid, uid) and known.uid != uid
        self._seq += 1
        self._touched[key] = self._seq
        if event.type == "DELETED":
            if replaced:
                # A late event about an older object of this name: the list will tell.
                self._resync_wanted.set()
                return
            self.index.delete(*key)
            self._observed.pop(key, None)
        else:
            self.index.upsert(obj)
            self._observed[key] = Observed.of(obj)
            if replaced:
                self._resync_wanted.set()
        if event.type == "LISTED":
            self._resync_wanted.set()  # kopf (re)listed: deletions in a watch gap are unseen
        self._changed()

    def _changed(self) -> None:
        if self.index.revision != self._notified_revision:
            self._notified_revision = self.index.revision
            self._sync_keys()
            self._on_change()
        valid = sum(1 for e in self.index.entries.values() if e.valid)
        POLICIES.labels(state="valid").set(valid)
        POLICIES.labels(state="invalid").set(len(self.index.entries) - valid)
        self._wake.set()

    def _sync_keys(self) -> None:
        issuers = [i for p in self.index.good_policies() for i in p.issuers]
        for issuer in issuers:
            self.registry.source_for(issuer)
        self.registry.retain(issuers)
        self.registry.refresh_due()

    # --- resyncs ---

    async def resync(self) -> None:
        """Replaces the index with a full list, leaving alone keys with a newer event."""
        mark = self._seq
        try:
            objs = await self.api.list_policies()
        except kube.ApiError:
            RESYNCS.labels(result="error").inc()
            raise
        RESYNCS.labels(result="ok").inc()
        newer = {key for key, seq in self._touched.items() if seq > mark}
        listed = {policy_key(obj): obj for obj in objs}
        self.index.replace_all(objs, keep=newer)
        for key in list(self._observed):
            if key not in listed and key not in newer:
                del self._observed[key]
        for key, obj in listed.items():
            if key not in newer:
                self._observed[key] = Observed.of(obj)
        # Older marks cannot matter to any later list.
        self._touched = {key: seq for key, seq in self._touched.items() if seq > mark}
        self._changed()
        self.synced.set()

    async def _resync_loop(self) -> None:
        failures = 0
        while True:
            self._resync_wanted.clear()  # a request arriving during this list stays set
            try:
                await self.resync()
            except kube.ApiError as exc:
                failures += 1
                delay = self._write_backoff[min(failures, len(self._write_backoff)) - 1]
                log.warning(
                    "resync failed (%d in a row), retrying in %gs: %s", failures, delay, exc
                )
                await asyncio.sleep(delay)
                continue
            failures = 0
            await _wait(self._resync_wanted, self._resync_interval)
            await asyncio.sleep(self._relist_delay)  # let a relist burst finish first

    # --- status ---

    async def _status_loop(self) -> None:
        while True:
            await _wait(self._wake, self._status_interval)
            self._wake.clear()
            self.reconcile()

    def reconcile(self) -> int:
        """Starts a status write for every policy whose status is not what it should be.

        Returns how many writes it started. Does nothing unless this replica leads.
        """
        if not self._is_leader():
            return 0
        conflicts = self.conflicts()
        now = self._clock()
        started = 0
        for key, entry in sorted(self.index.entries.items()):
            observed = self._observed.get(key)
            if observed is None or key in self._writing or now < self._retry_at.get(key, 0.0):
                continue
            desired = self.desired(entry, observed, conflicts.get(key))
            if status.merge_patch(observed.status, desired) == {}:
                self._failures.pop(key, None)
                continue
            task = asyncio.get_running_loop().create_task(
                self._write(key), name=f"lastguard-status {key[0]}/{key[1]}"
            )
            self._writing[key] = task
            task.add_done_callback(functools.partial(self._written, key))
            started += 1
        return started

    async def writes_done(self) -> None:
        """Waits for the status writes under way (and the Events they post)."""
        while self._writing:
            await asyncio.gather(*self._writing.values(), return_exceptions=True)

    def _written(self, key: PolicyKey, task: asyncio.Task[None]) -> None:
        if self._writing.get(key) is task:
            del self._writing[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("status writer for %s/%s failed", *key, exc_info=task.exception())

    def conflicts(self) -> dict[PolicyKey, status.ConflictInfo]:
        """Conflicts between enforced policies; recomputed only when those change."""
        revision, found = self._conflicts
        if revision != self.index.revision:
            found = status.conflicts(self.index)
            self._conflicts = (self.index.revision, found)
        return found

    def desired(
        self, entry: Entry, observed: Observed, conflict: status.ConflictInfo | None
    ) -> dict[str, Any]:
        keys: dict[str, KeyStatus] = {}
        if entry.good is not None:
            keys = {i.issuer: self.registry.source_for(i).status() for i in entry.good.issuers}
        return status.desired_status(
            entry,
            keys=keys,
            conflict=conflict,
            sidecars=self._sidecars(entry.key) if self._sidecars is not None else None,
            previous=observed.status,
            now=self._now(),
        )

    async def _write(self, key: PolicyKey) -> None:
        async with self._write_slots:
            for _ in range(3):  # re-reads after a 409, then the next pass tries again
                if not await self._write_once(key):
                    return
            self._back_off(key)

    async def _write_once(self, key: PolicyKey) -> bool:
        """One patch attempt; True when it should be retried at once (after a 409)."""
        entry = self.index.entries.get(key)
        observed = self._observed.get(key)
        if entry is None or observed is None or not self._is_leader():
            return False
        if entry.generation != observed.generation:
            return False  # the object changed under us; the watch brings the new generation
        desired = self.desired(entry, observed, self.conflicts().get(key))
        patch = status.merge_patch(observed.status, desired)
        if not patch:
            return False
        namespace, name = key
        try:
            written = await self.api.patch_policy_status(
                namespace, name, patch, resource_version=observed.resource_version
            )
        except kube.Conflict:
            STATUS_WRITES.labels(result="conflict").inc()
            try:
                fresh = await self.api.get_policy(namespace, name)
            except kube.ApiError as exc:
                return self._failed(key, "unavailable", exc)
            if fresh is None:
                return False
            if self._observed.get(key) is observed:  # no newer event meanwhile
                self._observed[key] = Observed.of(fresh)
            return True
        except kube.NotFound:
            STATUS_WRITES.labels(result="not_found").inc()
            return False  # deleted; the watch will say so
        except kube.Rejected as exc:
            log.error("status of %s/%s refused: %s", namespace, name, exc)
            return self._failed(key, "rejected", exc)
        except kube.ApiError as exc:
            return self._failed(key, "unavailable", exc)
        STATUS_WRITES.labels(result="ok").inc()
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)
        if self._observed.get(key) is observed:
            self._observed[key] = Observed.of(written)
        for change in status.state_changes(observed.status, desired):
            await self._post_event(entry, change)
        return False

    def _failed(self, key: PolicyKey, result: str, exc: Exception) -> bool:
        STATUS_WRITES.labels(result=result).inc()
        delay = self._back_off(key)
        log.warning("status of %s/%s not written, retrying in %gs: %s", *key, delay, exc)
        return False

    def _back_off(self, key: PolicyKey) -> float:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = self._write_backoff[min(failures, len(self._write_backoff)) - 1]
        self._retry_at[key] = self._clock() + delay
        return delay

    async def _post_event(self, entry: Entry, change: status.StateChange) -> None:
        record = kube.EventRecord(
            namespace=entry.key[0],
            name=entry.key[1],
            uid=entry.uid,
            type=change.type,
            reason=change.reason,
            message=change.message,
            time=self._now(),
            instance=self._identity,
        )
        try:
            await self.api.create_event(record)
        except kube.ApiError as exc:
            EVENTS_POSTED.labels(result="error").inc()
            log.warning("event %s for %s/%s not posted: %s", change.reason, *entry.key, exc)
        else:
            EVENTS_POSTED.labels(result="ok").inc()

    async def _stop_writes(self) -> None:
        tasks = list(self._writing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
