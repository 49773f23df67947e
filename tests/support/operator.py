"""Running the operator's controller against tests.support.kube.ApiServer, and bounded waits.

`OperatorProcess` runs the real `lastguard operator` command against it.
`replica(api)` starts one operator replica in-process the way `lastguard.operator.main`
wires it (ClusterApi: kopf watch + official client, a KeyRegistry on the wall
clock, the Controller) with short intervals, and stops it at exit. `eventually`
re-checks a condition until it holds or a deadline passes: no bare sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lastguard.operator import cluster_api, controller, kube
from lastguard.sidecar import fetch, jwks_cache
from tests.support.kube import ApiServer

T = TypeVar("T")

#: Controller timings for tests: quick passes, quick retries.
FAST = {
    "status_interval": 0.05,
    "resync_interval": 30.0,
    "relist_delay": 0.05,
    "write_backoff": (0.05, 0.1, 0.2, 0.4),
}


async def eventually(
    check: Callable[[], T | Awaitable[T]], timeout: float = 10.0, interval: float = 0.05
) -> T:
    """Calls `check` until it returns a truthy value (returned) or raises no AssertionError.

    After `timeout` seconds the last AssertionError (or a falsy result) fails the test.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result or result is None:
                return result  # type: ignore[return-value]
            failure: AssertionError = AssertionError(f"still {result!r} after {timeout}s")
        except AssertionError as exc:
            failure = exc
        if time.monotonic() >= deadline:
            raise failure
        await asyncio.sleep(interval)


class RecordingApi(cluster_api.ClusterApi):
    """ClusterApi that keeps what the controller saw and did, for assertions."""

    def __init__(self, connection: kube.Connection) -> None:
        super().__init__(connection)
        self.events: list[kube.WatchEvent] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.before_patch: Callable[[str, str], Awaitable[None]] | None = None

    async def watch_policies(self, on_event: kube.EventSink) -> None:
        def record(event: kube.WatchEvent) -> None:
            self.events.append(event)
            on_event(event)

        await super().watch_policies(record)

    async def patch_policy_status(
        self, namespace: str, name: str, patch: Any, *, resource_version: str | None
    ) -> dict[str, Any]:
        self.patches.append((namespace, name, dict(patch)))
        if self.before_patch is not None:
            await self.before_patch(namespace, name)
        return await super().patch_policy_status(
            namespace, name, patch, resource_version=resource_version
        )

    def event_types(self, name: str) -> list[str]:
        return [e.type for e in self.events if e.object["metadata"]["name"] == name]


@dataclass
class Replica:
    api: RecordingApi
    controller: controller.Controller
    registry: jwks_cache.KeyRegistry
    notified: list[int] = field(default_factory=list)

    def entry_names(self) -> list[str]:
        return sorted(name for _, name in self.controller.index.entries)


@contextlib.asynccontextmanager
async def replica(
    server: ApiServer,
    *,
    namespaces: tuple[str, ...] = (),
    is_leader: Callable[[], bool] = lambda: True,
    identity: str = "replica-1",
    **overrides: Any,
) -> AsyncIterator[Replica]:
    api = RecordingApi(
        kube.Connection(server=str(server.url).rstrip("/"), insecure=True, namespaces=namespaces)
    )
    fetcher = fetch.HttpFetcher()
    registry = jwks_cache.KeyRegistry(fetcher, clock=time.time)
    notified: list[int] = []
    ctl = controller.Controller(
        api,
        registry,
        on_change=lambda: notified.append(ctl.index.revision),
        is_leader=is_leader,
        identity=identity,
        **{**FAST, **overrides},
    )
    task = asyncio.create_task(ctl.run(), name=f"test {identity}")
    try:
        yield Replica(api, ctl, registry, notified)
    finally:
        # Idle JWKS connections first: their server side (a TestIssuer in this loop) is
        # a task kopf would wait for when it stops (see lastguard.operator.cluster_api).
        await fetcher.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.close()
        await fetcher.close()
        api.close()


class OperatorProcess:
    """The real `lastguard operator` command as a subprocess, against a test API server.

    Always passes `--kube-server URL --insecure --listen 127.0.0.1:0 --pod-name operator-0
    --lease-namespace ops`; `args` add or override the rest.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, kube_url: str, *args: str) -> OperatorProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lastguard.sidecar.cli", "operator",
            "--kube-server", kube_url.rstrip("/"), "--insecure", "--listen", "127.0.0.1:0",
            "--pod-name", "operator-0", "--lease-namespace", "ops", *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        return cls(process)

    async def stop(self, timeout: float = 20) -> tuple[int, str]:
        """SIGTERM, then the exit code and everything the process printed."""
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout)
        return code, await self.output()

    async def kill(self) -> None:
        """Makes sure the process is gone (a no-op once it has exited)."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def output(self) -> str:
        stdout = self.process.stdout
        return (await stdout.read()).decode(errors="replace") if stdout else ""
