"""`lastguard operator`: flags, wiring and lifecycle of the operator process.

The CLI adds `flags.add_operator_arguments(parser)` and calls `run(args)`. Flags become one frozen
`OperatorConfig`; `Operator` wires the Kubernetes adapter (`cluster_api.ClusterApi`:
kopf for the watch, the official client for the rest), the controller, the
distribution server, leader election, health and metrics endpoints, and with
`--publish-ca-bundle` the CA bundle publisher (`ca_publisher`, leader only).

Start order: metrics, health, then the CA publisher, the elector and the
controller (whose watch starts kopf); the distribution (gRPC) starts serving
sidecars once the first full list is in the index, so that no sidecar ever gets
a snapshot that misses policies which exist. Stop order: the distribution
first (sidecars keep their policy and reconnect to another replica), the
health endpoint, the CA publisher (before the Lease goes), the elector (the
Lease is released), the controller (kopf last: when it stops it waits for,
then cancels, every task created after it started), the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import start_http_server

from lastguard.operator import (
    ca_publisher,
    cluster_api,
    controller,
    distribution_tls,
    kube,
    leader,
)
from lastguard.operator.index import PolicyIndex
from lastguard.sidecar import fetch, jwks_cache

log = logging.getLogger("lastguard.operator")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: A Kubernetes object name such as a ConfigMap's (a DNS-1123 subdomain).
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()  # empty: all
    listen: str = "0.0.0.0:15010"  # sidecars in every pod connect here
    tls: distribution_tls.TlsFiles | None = None  # None: plaintext (--insecure)
    metrics_listen: str | None = None
    health_listen: str | None = None
    leader_election: bool = True
    lease_name: str = "lastguard-operator"
    lease_namespace: str = "default"
    identity: str = "lastguard-operator"
    kube_server: str | None = None
    resync_interval: float = 300.0
    status_interval: float = 2.0
    grace_seconds: float = 5.0
    #: The PEM CA bundle to publish as a ConfigMap in every namespace with injection
    #: enabled; None: publish nothing.
    ca_bundle: Path | None = None
    ca_configmap: str = "lastguard-ca"
    ca_publish_interval: float = 10.0


# --- flags -------------------------------------------------------------------------------


def _default_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


def config_from(args: argparse.Namespace) -> OperatorConfig:
    if args.insecure and (args.tls_cert or args.tls_key):
        raise SystemExit("--insecure and --tls-cert/--tls-key exclude each other")
    tls = None
    if not args.insecure:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("give --tls-cert and --tls-key, or --insecure for local development")
        tls = distribution_tls.TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    if not _DNS_SUBDOMAIN.fullmatch(args.ca_configmap_name):
        raise SystemExit(f"--ca-configmap-name {args.ca_configmap_name!r} is not a ConfigMap name")
    return OperatorConfig(
        namespaces=tuple(dict.fromkeys(args.namespaces)),
        listen=args.listen,
        tls=tls,
        metrics_listen=args.metrics_listen,
        health_listen=args.health_listen,
        leader_election=args.leader_election,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace or _default_namespace(),
        identity=args.pod_name or os.environ.get("POD_NAME") or socket.gethostname(),
        kube_server=args.kube_server,
        resync_interval=args.resync_interval,
        status_interval=args.status_interval,
        ca_bundle=args.publish_ca_bundle,
        ca_configmap=args.ca_configmap_name,
        ca_publish_interval=args.ca_publish_interval,
    )


# --- the process -------------------------------------------------------------------------


class Operator:
    """All the operator's parts, started and stopped together."""

    def __init__(self, config: OperatorConfig, *, api: kube.KubeApi | None = None) -> None:
        # Imported here: the distribution server pulls in grpc and the generated protos.
        from lastguard.operator import distribution

        self.config = config
        self.api: kube.KubeApi = api or cluster_api.ClusterApi(
            kube.Connection(
                server=config.kube_server,
                insecure=config.kube_server is not None,
                namespaces=config.namespaces,
            )
        )
        self.index = PolicyIndex()
        self._fetcher = fetch.HttpFetcher(user_agent="lastguard-operator")
        # Wall clock: key fetch times end up in status as lastFetchTime.
        self.registry = jwks_cache.KeyRegistry(self._fetcher, clock=time.time)
        self.distribution = distribution.DistributionServer(
            snapshot_for=self.index.snapshot_for,
            on_change=lambda: self.controller.status_inputs_changed(),
        )
        self.elector: leader.LeaderElector | None = None
        if config.leader_election:
            self.elector = leader.LeaderElector(
                self.api,
                leader.ElectionConfig(
                    namespace=config.lease_namespace,
                    name=config.lease_name,
                    identity=config.identity,
                ),
                on_change=self._leadership_changed,
            )
        elector = self.elector
        is_leader = (lambda: elector.is_leader) if elector is not None else (lambda: True)
        self.ca_publisher: ca_publisher.CaPublisher | None = None
        if config.ca_bundle is not None:
            self.ca_publisher = ca_publisher.CaPublisher(
                self.api,
                config.ca_bundle,
                target=ca_publisher.Target(name=config.ca_configmap),
                is_leader=is_leader,
                identity=config.identity,
                interval=config.ca_publish_interval,
            )
        self.controller = controller.Controller(
            self.api,
            self.registry,
            index=self.index,
            on_change=self.distribution.notify,
            sidecars=self.distribution.counts_for,
            is_leader=is_leader,
            identity=config.identity,
            status_interval=config.status_interval,
            resync_interval=config.resync_interval,
        )
        self._grpc: Any = None
        self._health: web.AppRunner | None = None
        self._metrics: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def _leadership_changed(self, leading: bool) -> None:
        self.controller.leadership_changed(leading)
        if self.ca_publisher is not None:
            self.ca_publisher.leadership_changed(leading)

    @property
    def ready(self) -> bool:
        return self.controller.synced.is_set() and self._grpc is not None

    async def start(self) -> None:
        config = self.config
        if config.metrics_listen:
            host, port = _split(config.metrics_listen)
            self._metrics = start_http_server(port, addr=host)
        if config.health_listen:
            self._health = await self._serve_health(config.health_listen)
        # These exist before the controller's watch starts kopf, which then leaves them alone.
        self._tasks.append(asyncio.create_task(self._serve_sidecars(), name="lastguard-serve"))
        if self.ca_publisher is not None:  # stopped before the elector releases the Lease
            self._tasks.append(
                asyncio.create_task(self.ca_publisher.run(), name="lastguard-ca-publisher")
            )
        if self.elector is not None:
            self._tasks.append(asyncio.create_task(self.elector.run(), name="lastguard-leader"))
        self._tasks.append(asyncio.create_task(self.controller.run(), name="lastguard-controller"))
        log.info(
            "operator started",
            extra={
                "fields": {
                    "namespaces": list(config.namespaces) or "all",
                    "identity": config.identity,
                    "leader_election": config.leader_election,
                    "ca_bundle": str(config.ca_bundle) if config.ca_bundle else None,
                }
            },
        )

    async def _serve_sidecars(self) -> None:
        """Serves sidecars once the index holds a full list, until the server stops.

        Before that, a snapshot could miss policies that exist, and a sidecar would
        enforce less than it should: better it keeps its last policy meanwhile.
        """
        from lastguard.operator import distribution

        await self.controller.synced.wait()
        self._grpc = await distribution.serve(
            self.distribution, self.config.listen, self.config.tls
        )
        await self._grpc.wait_for_termination()

    async def wait(self) -> BaseException | None:
        """Returns when a part stops on its own (a failure), with its exception."""
        if not self._tasks:
            return None
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        task = done.pop()
        if task.cancelled():
            return asyncio.CancelledError()
        return task.exception() or RuntimeError(f"{task.get_name()} stopped")

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.config.grace_seconds)
        # Before kopf stops: it waits for (then cancels) tasks created after it started,
        # such as the health server's connections.
        if self._health is not None:
            await self._health.cleanup()
        # The CA publisher, the elector (Lease released), then the controller.
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.registry.close()
        await self._fetcher.close()
        close = getattr(self.api, "close", None)
        if close is not None:
            close()
        if self._metrics is not None:
            server = self._metrics[0] if isinstance(self._metrics, tuple) else None
            if server is not None:
                server.shutdown()
        log.info("operator stopped")

    async def _serve_health(self, address: str) -> web.AppRunner:
        async def healthz(_: web.Request) -> web.Response:
            alive = all(not t.done() for t in self._tasks)
            return web.json_response({"alive": alive}, status=200 if alive else 503)

        async def readyz(_: web.Request) -> web.Response:
            body = {
                "synced": self.controller.synced.is_set(),
                "leader": self.elector.is_leader if self.elector else True,
                "policies": len(self.index.entries),
            }
            return web.json_response(body, status=200 if self.ready else 503)

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = _split(address)
        await web.TCPSite(runner, host, port).start()
        return runner


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)  # noqa: S104


async def run(args: argparse.Namespace) -> int:
    """Runs the operator until SIGTERM or SIGINT (exit 0) or until a part fails (exit 1)."""
    config = config_from(args)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("kopf").setLevel(logging.WARNING)
    operator = Operator(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def take_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)

    take_signals()
    await operator.start()
    failed = asyncio.ensure_future(operator.wait())
    stop = asyncio.ensure_future(stopping.wait())
    # kopf installs its own SIGTERM/SIGINT handlers when it starts: take them back. (A
    # signal that kopf catches first stops the watch, which stops the operator too.)
    kopf_started = getattr(operator.api, "watch_started", None)
    if isinstance(kopf_started, asyncio.Event):
        started = asyncio.ensure_future(kopf_started.wait())
        await asyncio.wait({failed, stop, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        take_signals()
    await asyncio.wait({failed, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    error = failed.result() if failed.done() else None
    failed.cancel()
    if error is not None:
        log.error("operator part failed, stopping: %r", error)
    await operator.stop()
    return 1 if error is not None else 0
