"""Streams each connected sidecar the policy snapshot of its workload (gRPC). An I/O edge.

Protocol: proto/src/lastguard/proto/distribution/v1alpha1/distribution.proto.

Each connected sidecar has one `_Stream`: its workload (from its Hello), the
snapshot currently due to it, what was last sent, and what it acknowledged.
The controller calls `notify()` after every change to the index; `notify()`
recomputes every stream's due snapshot (once per distinct workload) and wakes
the streams whose version changed. It never waits on a sidecar: each stream's
writer sends only the latest due snapshot, and only when its version differs
from what that stream last sent, so a slow sidecar gets fewer snapshots (never
a stale one) and never delays the others.

Propagation is measured per `notify()`: from the call to the last answer (Ack,
applied or rejected) from the sidecars whose snapshot it changed.

`serve` binds the server, with TLS from `distribution_tls` when given.

Invariant: every method runs on the server's event loop (call `notify()` there).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Gauge, Histogram

from lastguard.operator import distribution_tls
from lastguard.operator.index import PolicyKey, Snapshot
from lastguard.proto.distribution.v1alpha1 import distribution_pb2 as pb
from lastguard.proto.distribution.v1alpha1 import distribution_pb2_grpc as pb_grpc
from lastguard.sidecar import podinfo
from lastguard.sidecar.policy.select import Workload

log = logging.getLogger("lastguard.operator.distribution")

CONNECTED = Gauge("lastguard_operator_connected_sidecars", "Sidecars with an open policy stream.")
SNAPSHOTS_SENT = Counter(
    "lastguard_operator_snapshots_sent_total", "Policy snapshots sent to sidecars."
)
ACKS = Counter(
    "lastguard_operator_acks_total",
    "Sidecars' answers to policy snapshots, by result (applied, rejected).",
    ["result"],
)
PROPAGATION = Histogram(
    "lastguard_operator_propagation_seconds",
    "From a policy change (notify) to the last answer of the sidecars whose snapshot it changed.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)

#: A sidecar that connects must say who it is within this time.
HELLO_TIMEOUT_SECONDS = 30.0
#: Unanswered rollouts kept for measuring; older ones (a sidecar that never acks) are dropped.
MAX_OPEN_ROLLOUTS = 256

SERVER_OPTIONS = (
    # Ping a silent sidecar every 30 s and drop it when 10 s pass without an answer,
    # so a vanished pod stops counting as connected.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Streams carry no data for hours; pings must go on regardless.
    ("grpc.http2.max_pings_without_data", 0),
    # Sidecars ping every 30 s too (lastguard.sidecar.policy_client); allow it.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
)


@dataclass(frozen=True, slots=True)
class SidecarState:
    """One connected sidecar as the operator sees it (a copy; it does not change)."""

    stream_id: int
    pod_name: str
    workload: Workload
    sidecar_version: str
    peer: str
    #: Wall-clock time (Unix seconds) the stream opened.
    connected_at: float
    #: The version due to this sidecar now.
    due_version: str
    #: The version last sent (None before the first send).
    sent_version: str | None
    #: The version of the sidecar's last Ack, whether applied or not (None before any).
    acked_version: str | None
    applied: bool | None
    #: Why the last acknowledged snapshot was rejected.
    error: str | None

    @property
    def current(self) -> bool:
        """Whether the sidecar enforces the snapshot due to it."""
        return bool(self.applied) and self.acked_version == self.due_version


@dataclass(eq=False)
class _Stream:
    id: int
    workload: Workload
    pod_name: str
    sidecar_version: str
    peer: str
    connected_at: float
    due: Snapshot
    #: Set when `due` changed or the stream is ending; the writer clears it.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_version: str | None = None
    acked_version: str | None = None
    applied: bool | None = None
    error: str | None = None
    #: Set by the reader: the sidecar closed its side, or broke the protocol (the reason).
    ended: bool = False
    protocol_error: str | None = None

    def state(self) -> SidecarState:
        return SidecarState(
            stream_id=self.id,
            pod_name=self.pod_name,
            workload=self.workload,
            sidecar_version=self.sidecar_version,
            peer=self.peer,
            connected_at=self.connected_at,
            due_version=self.due.version,
            sent_version=self.sent_version,
            acked_version=self.acked_version,
            applied=self.applied,
            error=self.error,
        )


@dataclass(eq=False)
class _Rollout:
    """The streams one notify() changed, each with the version it must answer."""

    started: float
    pending: dict[int, str] = field(default_factory=dict)
    answered: int = 0


class InvalidHello(ValueError):
    """A stream's first message is not a usable Hello."""


def workload_of(message: pb.SidecarMessage) -> Workload:
    """The workload a first message announces; raises InvalidHello. Pure."""
    if message.WhichOneof("message") != "hello":
        raise InvalidHello("the first message must be a Hello")
    hello = message.hello
    labels = dict(hello.labels)
    problems = podinfo.workload_problems(hello.namespace, labels)
    if problems:
        raise InvalidHello("invalid Hello: " + "; ".join(problems))
    return Workload.of(hello.namespace, labels)


def _policy_keys(snapshot: Snapshot) -> frozenset[PolicyKey]:
    """The policies a snapshot holds (documents that are not policy objects hold none)."""
    keys = set()
    for document in snapshot.documents:
        try:
            obj = json.loads(document)
        except ValueError:
            continue
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        if isinstance(meta, dict):
            keys.add((str(meta.get("namespace", "default")), str(meta.get("name", ""))))
    return frozenset(keys)


class DistributionServer(pb_grpc.PolicyDistributionServicer):  # type: ignore[misc]
    def __init__(
        self,
        snapshot_for: Callable[[Workload], Snapshot],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        hello_timeout: float = HELLO_TIMEOUT_SECONDS,
    ) -> None:
        """`on_change` is called after any sidecar connects, acks or leaves (e.g. to
        rewrite policy status counts); it must not block."""
        self._snapshot_for = snapshot_for
        self._clock = clock
        self._on_change = on_change
        self._hello_timeout = hello_timeout
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._rollouts: list[_Rollout] = []
        self._keys_by_version: dict[str, frozenset[PolicyKey]] = {}
        self._change = asyncio.Event()
        #: The port `serve` bound (useful with port 0).
        self.port: int | None = None
        #: The most recent propagation time measured, in seconds.
        self.last_propagation: float | None = None

    # --- queries ------------------------------------------------------------

    def sidecars(self) -> list[SidecarState]:
        streams = sorted(
            self._streams.values(), key=lambda s: (s.workload.namespace, s.pod_name, s.id)
        )
        return [s.state() for s in streams]

    def counts_for(self, key: PolicyKey) -> tuple[int, int]:
        """(current, total) pods: of the pods whose due snapshot contains the policy, how
        many enforce that snapshot (acked it as applied).

        A sidecar run with `--workers N` has N streams under one pod name: the pod
        counts once, and as current only when every one of its streams is.
        """
        pods: dict[tuple[str, str] | int, bool] = {}
        for stream in self._streams.values():
            if key not in self._keys_of(stream.due):
                continue
            pod = (stream.workload.namespace, stream.pod_name) if stream.pod_name else stream.id
            current = bool(stream.applied) and stream.acked_version == stream.due.version
            pods[pod] = pods.get(pod, True) and current
        return sum(pods.values()), len(pods)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Returns once `predicate()` holds, re-checked after every sidecar change;
        raises TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._change.wait()

    def _keys_of(self, snapshot: Snapshot) -> frozenset[PolicyKey]:
        keys = self._keys_by_version.get(snapshot.version)
        if keys is None:
            if len(self._keys_by_version) > 4096:
                self._keys_by_version.clear()
            keys = self._keys_by_version[snapshot.version] = _policy_keys(snapshot)
        return keys

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()
        if self._on_change is not None:
            self._on_change()

    # --- index changes ------------------------------------------------------

    def notify(self) -> None:
        """The index changed: recompute every stream's snapshot and wake those that differ."""
        rollout = _Rollout(started=self._clock())
        by_workload: dict[Workload, Snapshot] = {}
        for stream in self._streams.values():
            snapshot = by_workload.get(stream.workload)
            if snapshot is None:
                snapshot = by_workload[stream.workload] = self._snapshot_for(stream.workload)
            if snapshot.version == stream.due.version:
                continue
            stream.due = snapshot
            stream.wake.set()
            if stream.applied and stream.acked_version == snapshot.version:
                self._resolve(stream, snapshot.version)  # back to what it already enforces
            else:
                rollout.pending[stream.id] = snapshot.version
        if rollout.pending:
            self._rollouts.append(rollout)
            if len(self._rollouts) > MAX_OPEN_ROLLOUTS:
                del self._rollouts[0]
        self._changed()

    def _resolve(self, stream: _Stream, version: str) -> None:
        """The stream answered `version`: settle the rollouts waiting for it.

        An answer to the version due now settles every rollout waiting on this
        stream (that version includes all earlier changes); an answer to an older
        version settles only the rollouts that asked for exactly that one.
        """
        now = self._clock()
        for rollout in list(self._rollouts):
            expected = rollout.pending.get(stream.id)
            if expected is None or (expected != version and version != stream.due.version):
                continue
            del rollout.pending[stream.id]
            rollout.answered += 1
            if not rollout.pending:
                self._finish(rollout, now)

    def _finish(self, rollout: _Rollout, now: float) -> None:
        self._rollouts.remove(rollout)
        if not rollout.answered:
            return  # every sidecar it changed left before answering
        seconds = now - rollout.started
        self.last_propagation = seconds
        PROPAGATION.observe(seconds)
        log.info(
            "policy change propagated",
            extra={"fields": {"seconds": round(seconds, 4), "sidecars": rollout.answered}},
        )

    # --- one stream ---------------------------------------------------------

    async def Stream(
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.SidecarMessage, pb.PolicySnapshot],
    ) -> None:
        try:
            first = await asyncio.wait_for(context.read(), self._hello_timeout)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no Hello within {self._hello_timeout:g} s"
            )
            return
        if first is grpc.aio.EOF:
            return
        try:
            workload = workload_of(first)
        except InvalidHello as exc:
            log.warning(
                "refused a sidecar stream",
                extra={"fields": {"peer": context.peer(), "error": str(exc)}},
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        stream = _Stream(
            id=next(self._ids),
            workload=workload,
            pod_name=first.hello.pod_name,
            sidecar_version=first.hello.sidecar_version,
            peer=context.peer(),
            connected_at=time.time(),
            due=self._snapshot_for(workload),
        )
        stream.wake.set()  # send the current snapshot at once
        self._connect(stream)
        reader = asyncio.create_task(self._read_acks(stream, context))
        try:
            await self._send(stream, context)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._disconnect(stream)
        if stream.protocol_error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, stream.protocol_error)

    async def _send(
        self,
        stream: _Stream,
        context: grpc.aio.ServicerContext[pb.SidecarMessage, pb.PolicySnapshot],
    ) -> None:
        """Sends the due snapshot whenever it differs from the last one sent, until the
        sidecar ends its side (cancellation, e.g. a broken connection, ends it too)."""
        while True:
            await stream.wake.wait()
            stream.wake.clear()
            if stream.ended:
                return
            due = stream.due
            if due.version == stream.sent_version:
                continue
            message = pb.PolicySnapshot(version=due.version, documents=due.documents)
            message.sent_at.GetCurrentTime()
            await context.write(message)
            stream.sent_version = due.version
            SNAPSHOTS_SENT.inc()
            self._changed()

    async def _read_acks(
        self,
        stream: _Stream,
        context: grpc.aio.ServicerContext[pb.SidecarMessage, pb.PolicySnapshot],
    ) -> None:
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    return
                if message.WhichOneof("message") != "ack":
                    stream.protocol_error = "after the Hello, a sidecar sends only Acks"
                    return
                self._record_ack(stream, message.ack)
        except grpc.RpcError:
            return  # the connection broke; the handler is being cancelled anyway
        finally:
            stream.ended = True
            stream.wake.set()

    def _record_ack(self, stream: _Stream, ack: pb.Ack) -> None:
        stream.acked_version = ack.version
        stream.applied = ack.applied
        stream.error = None if ack.applied else (ack.error or "rejected without a reason")
        ACKS.labels("applied" if ack.applied else "rejected").inc()
        if not ack.applied:
            log.warning(
                "a sidecar rejected its policy snapshot and keeps its previous policy",
                extra={
                    "fields": {
                        **self._fields(stream),
                        "version": ack.version,
                        "error": stream.error,
                    }
                },
            )
        self._resolve(stream, ack.version)
        self._changed()

    def _fields(self, stream: _Stream) -> dict[str, object]:
        return {
            "pod": stream.pod_name,
            "namespace": stream.workload.namespace,
            "peer": stream.peer,
            "sidecar_version": stream.sidecar_version,
        }

    def _connect(self, stream: _Stream) -> None:
        self._streams[stream.id] = stream
        CONNECTED.inc()
        log.info("sidecar connected", extra={"fields": self._fields(stream)})
        self._changed()

    def _disconnect(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        CONNECTED.dec()
        now = self._clock()
        for rollout in list(self._rollouts):
            if rollout.pending.pop(stream.id, None) is not None and not rollout.pending:
                self._finish(rollout, now)
        log.info("sidecar disconnected", extra={"fields": self._fields(stream)})
        self._changed()


async def serve(
    server: DistributionServer, address: str, tls: distribution_tls.TlsFiles | None
) -> grpc.aio.Server:
    """Binds `server` on `address` (TLS when `tls` is given, else plaintext) and starts it.

    The bound port is in `server.port`. Stop the returned server to end every stream;
    sidecars keep their policy and reconnect.
    """
    grpc_server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_PolicyDistributionServicer_to_server(server, grpc_server)
    if tls is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, distribution_tls.reloading_credentials(tls))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await grpc_server.start()
    server.port = port
    log.info(
        "policy distribution listening",
        extra={
            "fields": {"address": f"{address.rpartition(':')[0]}:{port}", "tls": tls is not None}
        },
    )
    return grpc_server
