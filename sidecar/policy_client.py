"""Receives this workload's policies from the operator's PolicyDistribution stream.

Protocol: proto/src/lastguard/proto/distribution/v1alpha1/distribution.proto.
`PolicyClient.run()` keeps one stream open: it sends a Hello with the workload,
then applies each snapshot to the `PolicyStore` and acknowledges it. A
snapshot the sidecar cannot parse or compile is acknowledged as rejected and
the current policy stays, exactly as with an invalid policy file.

Each applied snapshot is also written to `snapshot_file` (atomically, mode
0600). `load_snapshot_file()` reads it back at start, so a restarted sidecar
enforces its last policy at once, even while the operator is unreachable.

When the stream breaks, the client reconnects with exponential backoff and full
jitter (a fresh channel per attempt, so only this backoff governs retries); the
backoff resets once a stream has stayed up for `stable_after` seconds. Nothing
here raises out of `run()` except cancellation: the sidecar keeps enforcing
what it has, and until the store holds a first policy set it denies with 503
and reports NOT_SERVING (see `lastguard.sidecar.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from lastguard.proto.distribution.v1alpha1 import distribution_pb2 as pb
from lastguard.proto.distribution.v1alpha1 import distribution_pb2_grpc as pb_grpc
from lastguard.sidecar import metrics
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy.model import JWTPolicy
from lastguard.sidecar.policy.parse import parse_all
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.store import PolicyStore

log = logging.getLogger("lastguard.policy_client")

#: Where a pod keeps its last applied snapshot (mount an emptyDir there: it survives
#: container restarts, which is when it matters).
DEFAULT_SNAPSHOT_FILE = Path("/var/run/lastguard/snapshot.json")

#: Keepalive pings notice a dead operator (no RST, e.g. a vanished node) within ~40 s.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Snapshots carry inline JWKS and PEM keys; 4 MiB (gRPC's default) is too tight.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
#: Rejection reasons are cut to this length in an Ack (the log has them all).
MAX_ACK_ERROR = 4096


def _sidecar_version() -> str:
    try:
        return importlib.metadata.version("lastguard")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def policies_from(documents: Sequence[str], default_namespace: str) -> list[JWTPolicy]:
    """Parses a snapshot's JSON documents; all-or-nothing, every problem reported."""
    objects: list[Any] = []
    problems: list[str] = []
    for i, document in enumerate(documents):
        try:
            objects.append(json.loads(document))
        except (ValueError, RecursionError) as exc:
            problems.append(f"document {i}: not a JSON document: {exc}")
    if problems:
        raise PolicyError(problems)
    return parse_all(objects, default_namespace)


def write_atomically(path: Path, text: str) -> None:
    """Replaces `path` with `text` in one rename; readers never see a partial file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:  # mkstemp: mode 0600
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise


class PolicyClient:
    def __init__(
        self,
        address: str,
        workload: Workload,
        pod_name: str,
        store: PolicyStore,
        snapshot_file: Path | None = None,
        tls_ca: Path | None = None,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`tls_ca` None means plaintext (local development only).

        `clock`, `rng` (uniform in [0, 1)) and `sleep` drive the backoff; tests may
        replace them.
        """
        self.address = address
        self.workload = workload
        self.pod_name = pod_name
        self.store = store
        self.snapshot_file = snapshot_file
        self.tls_ca = tls_ca
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self._clock = clock
        self._rng = rng
        self._sleep = sleep
        #: The snapshot version the store enforces (from the stream or the stored file).
        self.version: str | None = None
        #: True while a stream is open and has delivered a snapshot.
        self.connected = False
        #: Failed or ended streams since the client started.
        self.failures = 0

    # --- the stored snapshot ------------------------------------------------

    def load_snapshot_file(self) -> bool:
        """Applies the stored snapshot, if there is a usable one. True when applied."""
        path = self.snapshot_file
        if path is None:
            return False
        fields: dict[str, object] = {"file": str(path)}
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            version, documents = stored["version"], stored["documents"]
            if not isinstance(version, str) or not isinstance(documents, list):
                raise TypeError("version must be a string and documents a list")
            if not all(isinstance(d, str) for d in documents):
                raise TypeError("documents must be strings")
            self.store.apply(policies_from(documents, self.workload.namespace))
        except FileNotFoundError:
            log.info(
                "no stored policy snapshot; waiting for the policy server", extra={"fields": fields}
            )
            return False
        except PolicyError as exc:
            log.error(
                "stored policy snapshot is invalid; waiting for the policy server",
                extra={"fields": {**fields, "problems": exc.problems}},
            )
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "stored policy snapshot is unreadable; waiting for the policy server",
                extra={"fields": {**fields, "error": f"{type(exc).__name__}: {exc}"}},
            )
            return False
        self.version = version
        log.info(
            "enforcing the stored policy snapshot until the policy server answers",
            extra={"fields": {**fields, "version": version}},
        )
        return True

    def _store_snapshot(self, snapshot: pb.PolicySnapshot) -> None:
        if self.snapshot_file is None:
            return
        text = json.dumps({"version": snapshot.version, "documents": list(snapshot.documents)})
        try:
            write_atomically(self.snapshot_file, text)
        except OSError as exc:
            # The policy is applied; only a restart without the operator would miss it.
            log.error(
                "cannot store the policy snapshot",
                extra={"fields": {"file": str(self.snapshot_file), "error": str(exc)}},
            )

    # --- one snapshot -------------------------------------------------------

    def apply(self, snapshot: pb.PolicySnapshot) -> pb.Ack:
        """Applies one snapshot to the store and says how it went. Never raises."""
        version = snapshot.version
        if version and version == self.version:
            metrics.POLICY_SNAPSHOTS.labels("unchanged").inc()
            return pb.Ack(version=version, applied=True)
        fields = {"version": version, "documents": len(snapshot.documents)}
        try:
            self.store.apply(policies_from(snapshot.documents, self.workload.namespace))
        except PolicyError as exc:
            problems = exc.problems
        except Exception as exc:  # a bug must not take enforcement down; deny the update
            log.exception("applying a policy snapshot failed", extra={"fields": fields})
            problems = [f"internal error: {type(exc).__name__}"]
        else:
            self.version = version
            metrics.POLICY_SNAPSHOTS.labels("applied").inc()
            self._store_snapshot(snapshot)
            return pb.Ack(version=version, applied=True)
        metrics.POLICY_SNAPSHOTS.labels("rejected").inc()
        log.error(
            "policy snapshot rejected; keeping current policy",
            extra={"fields": {**fields, "problems": problems}},
        )
        return pb.Ack(version=version, applied=False, error="; ".join(problems)[:MAX_ACK_ERROR])

    # --- the stream ---------------------------------------------------------

    def _hello(self) -> pb.Hello:
        return pb.Hello(
            namespace=self.workload.namespace,
            labels=dict(self.workload.labels),
            pod_name=self.pod_name,
            sidecar_version=_sidecar_version(),
        )

    def _channel(self) -> grpc.aio.Channel:
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        # Read per attempt: a rotated CA bundle is picked up at the next reconnect.
        credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_ca.read_bytes())
        return grpc.aio.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            metrics.POLICY_SERVER_CONNECTED.set(1 if connected else 0)
            if connected:
                log.info(
                    "connected to the policy server", extra={"fields": {"address": self.address}}
                )

    async def _stream_once(self) -> str:
        """One stream until it ends. Returns why it ended (a stream error raises)."""
        async with self._channel() as channel:
            call = pb_grpc.PolicyDistributionStub(channel).Stream()
            try:
                await call.write(pb.SidecarMessage(hello=self._hello()))
                while True:
                    snapshot = await call.read()
                    if snapshot is grpc.aio.EOF:
                        break
                    self._set_connected(True)
                    await call.write(pb.SidecarMessage(ack=self.apply(snapshot)))
            except asyncio.InvalidStateError:
                pass  # the call ended under a write; its status below says why
            code = await call.code()
            details = await call.details()
            return f"{code.name}: {details}" if details else code.name

    def _delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**attempt))."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt, 30))
        return self._rng() * ceiling

    async def run(self) -> None:
        """Streams and reconnects until cancelled. Never raises anything else."""
        attempt = 0
        while True:
            started = self._clock()
            try:
                reason = await self._stream_once()
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
            except OSError as exc:  # e.g. the CA file
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                log.exception("policy stream failed unexpectedly")
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._set_connected(False)
            self.failures += 1
            if self._clock() - started >= self.stable_after:
                attempt = 0
            delay = self._delay(attempt)
            attempt += 1
            log.warning(
                "policy server stream ended; keeping current policy and reconnecting",
                extra={
                    "fields": {
                        "address": self.address,
                        "reason": reason,
                        "retry_in_seconds": round(delay, 3),
                        "enforcing": self.version,
                    }
                },
            )
            await self._sleep(delay)
