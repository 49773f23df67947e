"""The sidecar process: gRPC ext_authz + health, metrics, policy and key upkeep.

Lifecycle: `Sidecar.start()` binds every listener and starts the background
tasks (policy file watch, key refresh); `serve_forever()` waits; `stop()`
drains in-flight Checks for a grace period, then cancels the tasks and closes
the HTTP client. gRPC health answers NOT_SERVING until a policy set is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter, start_http_server

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from lastguard.sidecar import metrics
from lastguard.sidecar.authenticator import Authenticator
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.fetch import HttpFetcher
from lastguard.sidecar.jwks_cache import KeyRegistry
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.reload import PolicyFile
from lastguard.sidecar.response import to_check_response
from lastguard.sidecar.store import PolicyStore
from lastguard.sidecar.token_cache import TokenCache

log = logging.getLogger("lastguard.server")

SERVICE_NAME = "envoy.service.auth.v3.Authorization"


@dataclass(frozen=True)
class SidecarConfig:
    """Built once from flags; immutable."""

    policy_file: Path
    listen: str = "127.0.0.1:9191"
    metrics_listen: str | None = None
    workload: Workload | None = None
    default_namespace: str = "default"
    realm: str = "lastguard"
    allow_without_policy: bool = False
    log_claims: bool = False
    reload_interval: float = 1.0
    grace_seconds: float = 5.0
    token_cache_entries: int = 100_000
    token_cache_bytes: int = 64 * 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's Check: always answers with a decision, never with a gRPC error."""

    def __init__(self, authorizer: Authorizer, realm: str) -> None:
        self.authorizer = authorizer
        self.realm = realm
        self._counters: dict[tuple[bool, str], Counter] = {}

    def _count(self, decision: Decision) -> None:
        key = (decision.allowed, decision.reason)
        counter = self._counters.get(key)
        if counter is None:
            counter = metrics.DECISIONS.labels(
                "allow" if decision.allowed else "deny", decision.reason
            )
            self._counters[key] = counter
        counter.inc()

    async def Check(
        self,
        request: pb.CheckRequest,
        context: grpc.aio.ServicerContext[pb.CheckRequest, pb.CheckResponse],
    ) -> pb.CheckResponse:
        started = time.perf_counter()
        http = request.attributes.request.http
        decision = await self.authorizer.check(http.method, http.path, http.headers)
        response = to_check_response(decision, self.realm)
        self._count(decision)
        metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
        return response


class Sidecar:
    def __init__(
        self, config: SidecarConfig, *, key_clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`key_clock` drives key refresh schedules (tests advance it instead of sleeping)."""
        self.config = config
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
        self.store = PolicyStore(self.authorizer, self.registry, config.workload)
        self.policy_file = PolicyFile(config.policy_file, self.store, config.default_namespace)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: object | None = None

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
        pb_grpc.add_AuthorizationServicer_to_server(
            AuthorizationService(self.authorizer, self.config.realm), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_serving(False)
        if self.config.metrics_listen:
            host, _, port = self.config.metrics_listen.rpartition(":")
            self._metrics_server = start_http_server(int(port), addr=host or "0.0.0.0")  # noqa: S104
        self.policy_file.load()
        if self.store.loaded:
            await self._set_serving(True)
        await self.server.start()
        self._tasks = [
            asyncio.create_task(self._watch_policy()),
            asyncio.create_task(self.registry.run()),
        ]
        log.info(
            "lastguard sidecar listening",
            extra={"fields": {"grpc": f"{self.config.listen.rpartition(':')[0]}:{self.port}"}},
        )

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval)
            was_loaded = self.store.loaded
            self.policy_file.load()
            if self.store.loaded and not was_loaded:
                await self._set_serving(True)

    async def serve_forever(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()

    async def stop(self) -> None:
        if self.server is not None:
            await self._set_serving(False)
            await self.server.stop(self.config.grace_seconds)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close()
        await self.fetcher.close()
        if self._metrics_server is not None:
            server = self._metrics_server[0] if isinstance(self._metrics_server, tuple) else None
            if server is not None:
                server.shutdown()
