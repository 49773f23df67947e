"""Leader election on a coordination.k8s.io/v1 Lease, the way client-go does it.

Only the leader writes status and Events; every replica watches and serves
sidecars. The rules:

- A candidate takes the Lease when it does not exist (create), when it is its
  own already (renew), when it was released (no holder), or when the holder
  has not changed it for the Lease's duration, measured on *this* replica's
  clock from when it last saw the record change. Clocks of different replicas
  never meet, so skew between them does not matter.
- Every write carries the resourceVersion it read (optimistic concurrency): a
  409 means another replica wrote first, and this one is not the leader.
- The leader renews every `renew_seconds`. It steps down at once on a 409, and
  when it could not renew for `renew_deadline_seconds` (less than the Lease
  duration), so it has stopped writing before another replica may take over.
- On shutdown the leader releases the Lease (no holder), so that a successor
  does not have to wait for it to expire.

Time is injected: `clock` (monotonic seconds) decides expiry and deadlines;
`wall` stamps acquireTime and renewTime, which are for people reading the Lease.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Gauge

from lastguard.operator import kube

log = logging.getLogger("lastguard.operator.leader")

IS_LEADER = Gauge("lastguard_operator_leader", "1 while this replica holds the leader Lease.")


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    namespace: str
    name: str
    identity: str
    lease_seconds: int = 15
    renew_seconds: float = 5.0
    renew_deadline_seconds: float = 10.0
    #: How often a candidate (or a leader after a failed renewal) tries again.
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not self.renew_seconds < self.renew_deadline_seconds < self.lease_seconds:
            raise ValueError("need renew_seconds < renew_deadline_seconds < lease_seconds")
        if not self.identity:
            raise ValueError("the identity must not be empty")


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class LeaderElector:
    def __init__(
        self,
        api: kube.KubeApi,
        config: ElectionConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime.datetime] = _utcnow,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self._clock = clock
        self._wall = wall
        self._on_change = on_change
        self._leader = False
        self._observed: tuple[object, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    @property
    def is_leader(self) -> bool:
        return self._leader

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Campaigns and renews until cancelled; then releases the Lease if it holds it."""
        try:
            while True:
                await self.step()
                await sleep(
                    self.config.renew_seconds if self._leader else self.config.retry_seconds
                )
        finally:
            if self._leader:
                await asyncio.shield(self.release())

    async def step(self) -> bool:
        """One attempt to acquire or renew the Lease. Returns whether this replica leads."""
        config = self.config
        now = self._clock()
        try:
            lease = await self.api.get_lease(config.namespace, config.name)
            if lease is None:
                fresh = kube.Lease(
                    holder=config.identity,
                    duration_seconds=config.lease_seconds,
                    acquire_time=self._wall(),
                    renew_time=self._wall(),
                )
                written = await self.api.create_lease(config.namespace, config.name, fresh)
            else:
                self._observe(lease, now)
                if self._held_by_another(lease, now):
                    self._set(False, f"{lease.holder} holds the lease")
                    return False
                written = await self.api.replace_lease(
                    config.namespace, config.name, self._taken(lease)
                )
        except kube.Conflict:
            self._set(False, "another replica wrote the lease first")
            return False
        except kube.ApiError as exc:
            if self._leader and now - self._renewed_at >= config.renew_deadline_seconds:
                self._set(False, f"could not renew for {config.renew_deadline_seconds:g}s: {exc}")
            else:
                log.warning("leader election: %s", exc)
            return self._leader
        self._observe(written, now)
        self._renewed_at = now
        self._set(True, "acquired the lease")
        return True

    async def release(self) -> None:
        """Gives the Lease up (best effort) and stops leading."""
        was_leader = self._leader
        self._set(False, "released the lease")
        if not was_leader:
            return
        config = self.config
        try:
            lease = await self.api.get_lease(config.namespace, config.name)
            if lease is not None and lease.holder == config.identity:
                await self.api.replace_lease(
                    config.namespace,
                    config.name,
                    lease.with_changes(holder=None, duration_seconds=1, renew_time=self._wall()),
                )
        except kube.ApiError as exc:
            log.warning("leader election: could not release the lease: %s", exc)

    def _held_by_another(self, lease: kube.Lease, now: float) -> bool:
        if not lease.holder or lease.holder == self.config.identity:
            return False
        return now < self._observed_at + lease.duration_seconds

    def _taken(self, lease: kube.Lease) -> kube.Lease:
        mine = lease.holder == self.config.identity
        return lease.with_changes(
            holder=self.config.identity,
            duration_seconds=self.config.lease_seconds,
            acquire_time=lease.acquire_time if mine else self._wall(),
            renew_time=self._wall(),
            transitions=lease.transitions if mine else lease.transitions + 1,
        )

    def _observe(self, lease: kube.Lease, now: float) -> None:
        record = (lease.holder, lease.renew_time, lease.acquire_time, lease.transitions)
        if record != self._observed:
            self._observed = record
            self._observed_at = now

    def _set(self, leader: bool, why: str) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        IS_LEADER.set(1 if leader else 0)
        log.info(
            "leader election: %s (%s)",
            "leading" if leader else "not leading",
            why,
            extra={"fields": {"lease": f"{self.config.namespace}/{self.config.name}"}},
        )
        if self._on_change is not None:
            self._on_change(leader)
