"""The whole system on this machine, no cluster: kmock API -> operator -> two sidecars -> Envoy.

Every part is a real process except the API server: `lastguard operator` reads
JWTPolicies from kmock's HTTP API (tests/support/kube.py, in the test's event
loop), streams snapshots over gRPC to two `lastguard sidecar` processes (app=orders
and app=billing, each with its own snapshot file), and one Envoy has a listener
per sidecar in front of the echo app. Policies carry inline JWKS, so no key
server is involved.

What it pins:
- a policy change written to the API is enforced through Envoy by the selected
  sidecar within a second, and reaches no other sidecar;
- the operator writes the policy's status (Ready, observedGeneration);
- with the operator SIGKILLed, sidecars keep enforcing; a sidecar restarted
  meanwhile enforces its stored snapshot at once; when the operator returns the
  sidecars reconnect and get what changed while it was away, and later changes.

Every wait is bounded (`eventually`); requests through Envoy never block the loop
the API server runs in, and neither do process starts (threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import kmock
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lastguard.sidecar.devissuer import DevIssuer
from tests.support import envoy as envoy_support
from tests.support import envoy_config
from tests.support.crd import status_problems
from tests.support.kube import JWTPOLICIES, ApiServer
from tests.support.operator import eventually
from tests.support.sidecar import HOST, SidecarProcess, free_port, health_status
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e

NS = "shop"
ISSUER = "https://idp.shop.test"
#: The bound the issue sets on change-to-enforcement through Envoy.
PROPAGATION_LIMIT = 1.0
#: A sidecar reconnects with full-jitter backoff capped at 30 s (lastguard.sidecar.policy_client).
RECONNECT_WAIT = 35.0
#: A policy's status.sidecars when the one sidecar it selects enforces it.
ONE_OF_ONE = {"current": 1, "total": 1}

STORED = "enforcing the stored policy snapshot until the policy server answers"
CONNECTED = "connected to the policy server"
STREAM_ENDED = "policy server stream ended; keeping current policy and reconnecting"


# --- policies and tokens ---------------------------------------------------------


def spec(idp: DevIssuer, app: str, audience: str) -> dict[str, Any]:
    """For the pods labelled app=`app`: tokens from the dev issuer for `audience`."""
    return {
        "selector": {"matchLabels": {"app": app}},
        "issuers": [{"issuer": ISSUER, "jwks": json.dumps(idp.jwks()), "audiences": [audience]}],
    }


def jwt_policy(idp: DevIssuer, app: str, audience: str) -> dict[str, Any]:
    """The JWTPolicy named `app`, selecting the pods labelled app=`app`."""
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": app, "namespace": NS},
        "spec": spec(idp, app, audience),
    }


# --- the operator process ----------------------------------------------------------


class OperatorProcess:
    """`python -m lastguard.sidecar.cli operator` against `kube_url`, on fixed ports.

    The ports stay the same across `kill()` and `start()`, so sidecars reconnect to
    the restarted operator at the address they know. Logs (JSON lines) go to `log_path`.
    """

    def __init__(self, kube_url: str, workdir: Path) -> None:
        self.kube_url = kube_url
        self.port = free_port()
        self.health_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "operator.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "lastguard.sidecar.cli", "operator",
            "--kube-server", self.kube_url, "--insecure",
            "--listen", f"{HOST}:{self.port}",
            "--health-listen", f"{HOST}:{self.health_port}",
            "--namespace", NS,
            # Leader election on, as deployed; the same pod name after a restart, as in
            # a StatefulSet, so the new process renews its own Lease at once.
            "--pod-name", "lastguard-operator-0", "--lease-namespace", "lastguard-system",
            "--status-interval", "0.1",
        ]  # fmt: skip

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Starts the process and returns once /readyz says it serves sidecars."""
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

        async def ready() -> bool:
            assert self.alive(), f"operator exited:\n{self.log_tail()}"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://{HOST}:{self.health_port}/readyz") as response:
                    return response.status == 200
            return False

        await eventually(ready, timeout=30)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful stop, the streams just break."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_records(self) -> list[dict[str, Any]]:
        return _json_lines(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no operator log)"


# --- sidecar processes in operator mode ----------------------------------------------


class PolicyServerSidecar(SidecarProcess):
    """The sidecar CLI with `--policy-server` instead of `--policy-file`.

    (SidecarProcess always passes --policy-file, which the CLI refuses together with
    --policy-server.) Its snapshot file lives in its workdir, so `restart()` on the
    same port finds the snapshot the previous process stored.
    """

    def __init__(self, operator_port: int, app: str, workdir: Path) -> None:
        super().__init__(
            workdir / "unused.yaml", labels={"app": app}, namespace=NS, metrics=True,
            workdir=workdir,
        )  # fmt: skip
        self.app = app
        self.operator_port = operator_port
        self.snapshot_file = workdir / "snapshot.json"

    @property
    def command(self) -> list[str]:
        assert self.metrics_port is not None and self.namespace is not None
        argv = [
            sys.executable, "-m", "lastguard.sidecar.cli", "--log-level", self.log_level,
            "sidecar",
            "--policy-server", f"{HOST}:{self.operator_port}", "--policy-server-insecure",
            "--snapshot-file", str(self.snapshot_file),
            "--namespace", self.namespace,
            "--listen", f"{HOST}:{self.requested_port}",
            "--metrics-listen", f"{HOST}:{self.metrics_port}",
        ]  # fmt: skip
        for key, value in sorted(self.labels.items()):
            argv += ["--label", f"{key}={value}"]
        return argv

    def messages(self, since: int = 0) -> list[str]:
        """The log messages from record number `since` on (the log spans restarts)."""
        return [r.get("msg", "") for r in self.log_records()[since:]]

    def stored_version(self) -> str:
        version: str = json.loads(self.snapshot_file.read_text())["version"]
        return version


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
    return out


# --- the world ---------------------------------------------------------------------


@dataclass
class World:
    api: ApiServer
    operator: OperatorProcess
    orders: PolicyServerSidecar
    billing: PolicyServerSidecar
    envoy: envoy_support.EnvoyProcess
    idp: DevIssuer
    http: aiohttp.ClientSession
    _tokens: dict[str, str] = field(default_factory=dict)

    def token(self, audience: str) -> str:
        # Minted once per audience: a verified-token cache must not let a token
        # outlive the policy that accepted it.
        if audience not in self._tokens:
            self._tokens[audience] = self.idp.mint({"aud": audience})
        return self._tokens[audience]

    async def status(self, listener: str, audience: str | None, path: str = "/orders/1") -> int:
        """The status Envoy's `listener` answers for a token for `audience` (None: no token)."""
        headers = {} if audience is None else {"authorization": f"Bearer {self.token(audience)}"}
        async with self.http.get(self.envoy.url(listener, path), headers=headers) as response:
            await response.read()
            return response.status

    async def allows(self, listener: str, audience: str) -> bool:
        return await self.status(listener, audience) == 200

    async def answers(self, listener: str, *audiences: str | None) -> list[int]:
        return [await self.status(listener, audience) for audience in audiences]

    async def snapshots_received(self, sidecar: PolicyServerSidecar) -> int:
        """Snapshots the sidecar took from its stream (applied, unchanged or rejected)."""
        url = f"http://{HOST}:{sidecar.metrics_port}/metrics"
        async with self.http.get(url) as response:
            text = await response.text()
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "lastguard_policy_snapshots_total"
            )
        )

    def policy(self, name: str) -> dict[str, Any]:
        return self.api.object(JWTPOLICIES, NS, name)

    async def set_audience(self, app: str, audience: str) -> None:
        """Changes policy `app` in the API (as kubectl would) to accept `audience` only."""
        await self.api.patch(JWTPOLICIES, NS, app, {"spec": spec(self.idp, app, audience)})

    async def change_and_time(self, app: str, audience: str, bound: float = 5.0) -> float:
        """`set_audience`, then the seconds until Envoy's `app` listener enforces it.

        Enforced means a token for the new audience gets through; polled every 10 ms.
        """
        started = time.monotonic()
        await self.set_audience(app, audience)
        while time.monotonic() - started < bound:
            if await self.allows(app, audience):
                return time.monotonic() - started
            await asyncio.sleep(0.01)
        raise AssertionError(f"{app} did not enforce aud {audience} within {bound} s")


class Reported(NamedTuple):
    """What a policy's status says, next to the generation it should be about."""

    ready: str | None
    observed_generation: int | None
    generation: int
    sidecars: dict[str, int] | None


def reported(world: World, name: str) -> Reported:
    obj = world.policy(name)
    status = obj.get("status") or {}
    assert status_problems(status) == [], status  # what the CRD's schema accepts
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    return Reported(
        ready.get("status"),
        status.get("observedGeneration"),
        obj["metadata"]["generation"],
        status.get("sidecars"),
    )


@pytest.fixture(scope="module")
def idp() -> DevIssuer:
    return DevIssuer(ISSUER)


@pytest.fixture
async def world(
    request: pytest.FixtureRequest, tmp_path: Path, idp: DevIssuer, upstream: UpstreamApp
) -> AsyncIterator[World]:
    started: list[Any] = []
    failed_before, in_test = request.session.testsfailed, False
    async with ApiServer() as api, kmock.Server(api), aiohttp.ClientSession() as http:
        await api.create(JWTPOLICIES, jwt_policy(idp, "orders", "orders"))
        await api.create(JWTPOLICIES, jwt_policy(idp, "billing", "billing"))
        operator = OperatorProcess(str(api.url).rstrip("/"), tmp_path / "operator")
        orders = PolicyServerSidecar(operator.port, "orders", tmp_path / "orders")
        billing = PolicyServerSidecar(operator.port, "billing", tmp_path / "billing")
        envoy: envoy_support.EnvoyProcess | None = None
        started += [operator, orders, billing]
        try:
            await operator.start(http)
            # Ready means SERVING: each sidecar has applied the snapshot of its workload.
            await asyncio.gather(asyncio.to_thread(orders.start), asyncio.to_thread(billing.start))
            listeners = [
                envoy_config.ext_authz_listener(
                    sidecar.app,
                    authz_port=sidecar.port,
                    upstream_port=upstream.port,
                    authz_cluster=f"lastguard-{sidecar.app}",
                )
                for sidecar in (orders, billing)
            ]
            envoy = envoy_support.EnvoyProcess(listeners, workdir=tmp_path / "envoy")
            started.append(envoy)
            await asyncio.to_thread(envoy.start)
            in_test = True
            yield World(api, operator, orders, billing, envoy, idp, http)
        finally:
            for part in reversed(started):
                await asyncio.to_thread(part.stop)
            # The call phase's failure is counted before teardown runs.
            if not in_test or request.session.testsfailed > failed_before:
                print("\n--- operator log ---\n" + operator.log_tail())
                for sidecar in (orders, billing):
                    print(f"--- {sidecar.app} sidecar log ---\n{sidecar.log_tail()}")
                if envoy is not None:
                    print("--- envoy log ---\n" + envoy.log_tail())


# --- the tests ---------------------------------------------------------------------


async def test_a_policy_change_reaches_only_the_selected_sidecar_within_a_second(
    world: World,
) -> None:
    # Each listener enforces the policy that selects its sidecar.
    assert await world.answers("orders", "orders", "billing", None) == [200, 401, 401]
    assert await world.answers("billing", "billing", "orders", None) == [200, 401, 401]
    orders_seen = await world.snapshots_received(world.orders)
    billing_seen = await world.snapshots_received(world.billing)
    billing_version = world.billing.stored_version()
    orders_version = world.orders.stored_version()

    took = await world.change_and_time("orders", "orders-v2")
    print(f"\norders: API write -> enforced through Envoy in {took * 1000:.0f} ms")
    assert took < PROPAGATION_LIMIT
    assert await world.answers("orders", "orders-v2", "orders", None) == [200, 401, 401]
    assert world.orders.stored_version() != orders_version
    # billing is not selected: nothing sent to it, nothing changed in what it enforces.
    assert await world.answers("billing", "billing", "orders-v2", None) == [200, 401, 401]
    assert await world.snapshots_received(world.orders) == orders_seen + 1
    assert await world.snapshots_received(world.billing) == billing_seen
    assert world.billing.stored_version() == billing_version

    # The operator reports the change as enforced by the one sidecar it selects.
    await eventually(lambda: reported(world, "orders") == Reported("True", 2, 2, ONE_OF_ONE))
    await eventually(lambda: reported(world, "billing") == Reported("True", 1, 1, ONE_OF_ONE))

    # And the other way round. Streams are ordered: had the orders change sent billing
    # anything, billing would have taken it before this change, and counted two.
    took = await world.change_and_time("billing", "billing-v2")
    print(f"billing: API write -> enforced through Envoy in {took * 1000:.0f} ms")
    assert took < PROPAGATION_LIMIT
    assert await world.answers("billing", "billing-v2", "billing", None) == [200, 401, 401]
    assert await world.answers("orders", "orders-v2", "billing-v2") == [200, 401]
    assert await world.snapshots_received(world.billing) == billing_seen + 1
    assert await world.snapshots_received(world.orders) == orders_seen + 1

    propagated = [
        r for r in world.operator.log_records() if r.get("msg") == "policy change propagated"
    ]
    assert [r["sidecars"] for r in propagated] == [1, 1]
    print(f"operator-measured propagation: {[r['seconds'] for r in propagated]} s")


async def test_without_the_operator_sidecars_enforce_and_a_restarted_one_uses_its_snapshot(
    world: World,
) -> None:
    await world.change_and_time("orders", "orders-v2")
    stored = world.orders.stored_version()
    ended = {s.app: s.messages().count(STREAM_ENDED) for s in (world.orders, world.billing)}

    world.operator.kill()
    # Both sidecars noticed: what follows is enforcement without an operator.
    await eventually(
        lambda: all(
            s.messages().count(STREAM_ENDED) > ended[s.app] for s in (world.orders, world.billing)
        )
    )
    assert await world.answers("orders", "orders-v2", "orders", None) == [200, 401, 401]
    assert await world.answers("billing", "billing", "orders-v2", None) == [200, 401, 401]
    for sidecar in (world.orders, world.billing):
        assert await asyncio.to_thread(health_status, sidecar.port) == "SERVING"

    # The orders sidecar crashes and comes back while the operator is still down.
    before_restart = len(world.orders.log_records())
    world.orders.kill()
    assert await world.status("orders", "orders-v2") == 503  # Envoy: ext_authz unreachable
    started = time.monotonic()
    await asyncio.to_thread(world.orders.restart)  # returns once SERVING
    print(f"\nrestarted sidecar SERVING from its snapshot in {time.monotonic() - started:.2f} s")
    restarted_log = world.orders.log_records()[before_restart:]
    loaded = [r for r in restarted_log if r.get("msg") == STORED]
    assert [r["version"] for r in loaded] == [stored]
    assert CONNECTED not in world.orders.messages(before_restart)
    assert await world.answers("orders", "orders-v2", "orders", None) == [200, 401, 401]

    # A change made while the operator is away cannot reach billing yet...
    await world.set_audience("billing", "billing-v2")
    assert await world.answers("billing", "billing", "billing-v2") == [200, 401]

    # ...and does once the operator is back; both sidecars reconnect (with backoff).
    await world.operator.start(world.http)
    await eventually(lambda: world.allows("billing", "billing-v2"), timeout=RECONNECT_WAIT)
    assert await world.answers("billing", "billing-v2", "billing", None) == [200, 401, 401]
    await eventually(
        lambda: CONNECTED in world.orders.messages(before_restart), timeout=RECONNECT_WAIT
    )
    serving = last_logged(world.operator.log_records(), "policy distribution listening")
    for sidecar in (world.billing, world.orders):
        reconnected = last_logged(sidecar.log_records(), CONNECTED) - serving
        print(f"{sidecar.app} reconnected {reconnected:.2f} s after the operator served again")
    await eventually(lambda: reported(world, "orders") == Reported("True", 2, 2, ONE_OF_ONE))
    await eventually(lambda: reported(world, "billing") == Reported("True", 2, 2, ONE_OF_ONE))

    # Later changes flow through the new streams, as fast as before.
    took = await world.change_and_time("orders", "orders-v3")
    print(f"orders after the operator's restart: enforced in {took * 1000:.0f} ms")
    assert took < PROPAGATION_LIMIT
    assert await world.answers("orders", "orders-v3", "orders-v2") == [200, 401]
    assert await world.answers("billing", "billing-v2", "orders-v3") == [200, 401]


def last_logged(records: list[dict[str, Any]], message: str) -> float:
    """When `message` was last logged, in Unix seconds (log records carry wall-clock ts)."""
    ts = next(r["ts"] for r in reversed(records) if r.get("msg") == message)
    return datetime.datetime.fromisoformat(ts).timestamp()
