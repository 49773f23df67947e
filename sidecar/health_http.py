"""Plain-HTTP liveness and readiness for Kubernetes probes.

Kubernetes probes connect to the pod IP, while Check stays on loopback (only
the local Envoy may ask it). This small server answers `GET /healthz` (200
while the process runs) and `GET /readyz` (200 once a policy set is loaded,
503 before), so probes need no access to the ext_authz port.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


async def serve(listen: str, ready: Callable[[], bool]) -> web.AppRunner:
    """Starts the probe server on host:port; returns the runner (`await runner.cleanup()`)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="policies not loaded\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()  # noqa: S104
    return runner
