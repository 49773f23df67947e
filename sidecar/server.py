"""The sidecar process: gRPC ext_authz + health, metrics, policy and key upkeep.

Policies come from one source: a local file (`policy_file`, polled) or the
operator (`policy_server`, streamed by `PolicyClient`). The workload is given
(`workload`) or read from a downward API volume (`pod_info_dir`).

Lifecycle: `Sidecar.start()` loads what is local (the policy file, or the
snapshot stored from the operator's last update), binds every listener and
starts the background tasks (the policy source, key refresh, readiness);
`stop()` drains in-flight Checks for a grace period,
then cancels the tasks and closes the HTTP client. gRPC health answers
NOT_SERVING until the store holds a policy set (`PolicyStore.on_ready`), and
every Check is denied with 503 until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.sidecar import gc_tuning, health_http, podinfo
from lastguard.sidecar.authenticator import Authenticator
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.fetch import HttpFetcher
from lastguard.sidecar.http_server import HttpAuthzServer
from lastguard.sidecar.jwks_cache import KeyRegistry
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.policy_client import PolicyClient
from lastguard.sidecar.recording import CheckRecorder
from lastguard.sidecar.reload import PolicyFile
from lastguard.sidecar.response import render
from lastguard.sidecar.store import PolicyStore
from lastguard.sidecar.token_cache import TokenCache

log = logging.getLogger("lastguard.server")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"


@dataclass(frozen=True)
class SidecarConfig:
    """Built once from flags; immutable.

    Exactly one of `policy_file` and `policy_server` is set. With `policy_server`,
    the workload is required (`workload` or `pod_info_dir`, not both), and so is a
    transport choice: `policy_server_ca` (TLS) or `policy_server_insecure`.
    `snapshot_file` None keeps the operator's snapshots in memory only.
    """

    policy_file: Path | None = None
    policy_server: str | None = None
    policy_server_ca: Path | None = None
    policy_server_insecure: bool = False
    snapshot_file: Path | None = None
    policy_server_backoff_initial: float = 0.5
    policy_server_backoff_max: float = 30.0
    pod_info_dir: Path | None = None
    pod_name: str = ""
    listen: str = "127.0.0.1:9191"
    #: Also answer Envoy's HTTP ext_authz protocol here (see http_server); None: gRPC only.
    http_listen: str | None = None
    metrics_listen: str | None = None
    #: HTTP /healthz and /readyz for Kubernetes probes (Check itself stays on `listen`).
    health_listen: str | None = None
    #: Seconds between scheduled full garbage collections (see gc_tuning); 0: Python's
    #: default collector settings.
    gc_full_interval: float = 0.0
    #: Touched once a policy set is loaded, removed at stop: how a `--workers` supervisor
    #: learns this worker is ready.
    ready_file: Path | None = None
    workload: Workload | None = None
    default_namespace: str = "default"
    realm: str = "lastguard"
    allow_without_policy: bool = False
    log_claims: bool = False
    reload_interval: float = 1.0
    grace_seconds: float = 5.0
    token_cache_entries: int = 100_000
    token_cache_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if (self.policy_file is None) == (self.policy_server is None):
            raise ValueError("set exactly one of policy_file and policy_server")
        if self.pod_info_dir is not None and self.workload is not None:
            raise ValueError("set at most one of pod_info_dir and workload")
        if self.policy_server is None:
            return
        if self.pod_info_dir is None and self.workload is None:
            raise ValueError("policy_server needs the workload: pod_info_dir or workload")
        if (self.policy_server_ca is None) != self.policy_server_insecure:
            raise ValueError("policy_server needs exactly one of policy_server_ca and insecure")


def _serialize(response: bytes | pb.CheckResponse) -> bytes:
    """Responses are usually pre-serialized (see `response.render`); pass those through."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class AuthorizationService:
    """Envoy's Check: always answers with a decision, never with a gRPC error."""

    def __init__(self, authorizer: Authorizer, realm: str, recorder: CheckRecorder) -> None:
        self.authorizer = authorizer
        self.realm = realm
        self.recorder = recorder

    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, bytes] | None,
    ) -> bytes:
        started = time.perf_counter()
        http = request.attributes.request.http
        decision = await self.authorizer.check(http.method, http.path, http.headers)
        response = render(decision, self.realm)
        self.recorder.record(decision, started)
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC registration of Check, with the bytes pass-through serializer."""
        check = grpc.unary_unary_rpc_method_handler(
            self.Check,
            request_deserializer=pb.CheckRequest.FromString,
            response_serializer=_serialize,
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": check})


class Sidecar:
    def __init__(
        self, config: SidecarConfig, *, key_clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`key_clock` drives key refresh schedules (tests advance it instead of sleeping).

        Raises `podinfo.PodInfoError` when `pod_info_dir` does not describe a pod.
        """
        self.config = config
        pod = podinfo.read(config.pod_info_dir) if config.pod_info_dir else None
        self.workload = pod.workload if pod else config.workload
        pod_name = pod.pod_name if pod else config.pod_name
        default_namespace = pod.workload.namespace if pod else config.default_namespace
        self.fetcher = HttpFetcher()
        self.registry = KeyRegistry(self.fetcher, key_clock)
        cache = TokenCache(
            max_entries=config.token_cache_entries, max_bytes=config.token_cache_bytes
        )
        self.authorizer = Authorizer(
            Authenticator(cache),
            allow_without_policy=config.allow_without_policy,
            log_claims=config.log_claims,
        )
        self.health = health.aio.HealthServicer()
        self._ready = asyncio.Event()
        self.store = PolicyStore(
            self.authorizer, self.registry, self.workload, on_ready=self._ready.set
        )
        self.policy_file: PolicyFile | None = None
        self.policy_client: PolicyClient | None = None
        if config.policy_file is not None:
            self.policy_file = PolicyFile(config.policy_file, self.store, default_namespace)
        else:
            assert config.policy_server is not None and self.workload is not None
            self.policy_client = PolicyClient(
                config.policy_server,
                self.workload,
                pod_name,
                self.store,
                snapshot_file=config.snapshot_file,
                tls_ca=config.policy_server_ca,
                backoff_initial=config.policy_server_backoff_initial,
                backoff_max=config.policy_server_backoff_max,
            )
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.recorder = CheckRecorder()
        self.http: HttpAuthzServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: object | None = None
        self._health_server: asyncio.Server | None = None

    async def _set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        self.server = grpc.aio.server()
        service = AuthorizationService(self.authorizer, self.config.realm, self.recorder)
        self.server.add_generic_rpc_handlers((service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_serving(False)
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            self._metrics_server = start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104
        if self.config.health_listen:
            self._health_server = await health_http.serve(
                self.config.health_listen, lambda: self.store.loaded
            )
        self._load_local()
        readiness = asyncio.create_task(self._serving_when_ready())
        self._tasks = [readiness]
        if self.store.loaded:
            await readiness  # SERVING before the port opens: no window of 503s
        await self.server.start()
        if self.config.http_listen:
            self.http = HttpAuthzServer(self.authorizer, self.config.realm, self.recorder)
            await self.http.start(self.config.http_listen)
        self._tasks += [
            asyncio.create_task(self._keep_policy_current()),
            asyncio.create_task(self.registry.run()),
        ]
        if self.config.gc_full_interval > 0:
            gc_tuning.configure()
            self._tasks.append(
                asyncio.create_task(gc_tuning.collect_periodically(self.config.gc_full_interval))
            )
        host = self.config.listen.rpartition(":")[0]
        fields = {"grpc": f"{host}:{self.port}"}
        if self.http is not None and self.config.http_listen:
            fields["http"] = f"{self.config.http_listen.rpartition(':')[0]}:{self.http.port}"
        log.info("lastguard sidecar listening", extra={"fields": fields})

    def _load_local(self) -> None:
        """Applies what is on disk now: the policy file, or the stored snapshot."""
        if self.policy_file is not None:
            self.policy_file.load()
        elif self.policy_client is not None:
            self.policy_client.load_snapshot_file()

    async def _keep_policy_current(self) -> None:
        """Polls the policy file, or streams from the policy server, until cancelled."""
        if self.policy_file is not None:
            await self.policy_file.watch(self.config.reload_interval)
        elif self.policy_client is not None:
            await self.policy_client.run()

    async def _serving_when_ready(self) -> None:
        """Health follows the store: SERVING from its first applied policy set on."""
        await self._ready.wait()
        await self._set_serving(True)
        if self.config.ready_file is not None:
            self.config.ready_file.touch()

    async def stop(self) -> None:
        if self.config.ready_file is not None:
            self.config.ready_file.unlink(missing_ok=True)
        if self.server is not None:
            await self._set_serving(False)
            if self.http is not None:
                await asyncio.gather(
                    self.server.stop(self.config.grace_seconds),
                    self.http.stop(self.config.grace_seconds),
                )
            else:
                await self.server.stop(self.config.grace_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close()
        await self.fetcher.close()
        if self._health_server is not None:
            self._health_server.close()
            await self._health_server.wait_closed()
        if self._metrics_server is not None:
            server = self._metrics_server[0] if isinstance(self._metrics_server, tuple) else None
            if server is not None:
                server.shutdown()
