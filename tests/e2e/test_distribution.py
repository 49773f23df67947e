"""Policy distribution end to end: operator index -> gRPC stream -> sidecars -> decisions.

A real `PolicyIndex` feeds a real `DistributionServer` on 127.0.0.1 (plaintext or
TLS with a generated CA); real `Sidecar`s read their identity from downward
API folders, stream their snapshots, and are asked through their own ext_authz
Check. Policies carry inline JWKS, so no key server is involved. Waits are
bounded and driven by the server's change notifications or by log records,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from lastguard.operator import distribution
from lastguard.operator.distribution import DistributionServer, SidecarState
from lastguard.operator.distribution_tls import TlsFiles
from lastguard.operator.index import PolicyIndex, Snapshot
from lastguard.proto.distribution.v1alpha1 import distribution_pb2 as dpb
from lastguard.proto.distribution.v1alpha1 import distribution_pb2_grpc as dpb_grpc
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from lastguard.sidecar import cli
from lastguard.sidecar.devissuer import DevIssuer
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.server import SERVICE_NAME, Sidecar, SidecarConfig
from tests.support import certs

pytestmark = pytest.mark.e2e

NS = "shop"
ISSUER = "https://idp.shop.test"
WAIT = 10.0  # every wait's upper bound; the events come in milliseconds
SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


# --- policies -----------------------------------------------------------------


@pytest.fixture(scope="module")
def idp() -> DevIssuer:
    return DevIssuer(ISSUER)


def jwt_policy(
    idp: DevIssuer, name: str, audience: str, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "issuers": [{"issuer": ISSUER, "jwks": json.dumps(idp.jwks()), "audiences": [audience]}]
    }
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {
            "name": name,
            "namespace": NS,
            "generation": 1,
            "uid": f"uid-{name}",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": spec,
    }


# --- the operator side ----------------------------------------------------------


class Operator:
    """A DistributionServer over `index`, served on 127.0.0.1."""

    def __init__(self, index: PolicyIndex, tls: TlsFiles | None = None) -> None:
        self.index = index
        self.tls = tls
        #: When set, every snapshot passes through it (to send what the index never would).
        self.mangle: Callable[[Snapshot], Snapshot] | None = None
        self.server = DistributionServer(self._snapshot_for)
        self.grpc: grpc.aio.Server | None = None

    def _snapshot_for(self, workload: Workload) -> Snapshot:
        snapshot = self.index.snapshot_for(workload)
        return self.mangle(snapshot) if self.mangle else snapshot

    async def start(self, port: int = 0) -> Operator:
        self.grpc = await distribution.serve(self.server, f"127.0.0.1:{port}", self.tls)
        return self

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=None)
            self.grpc = None

    def apply(self, *objects: dict[str, Any]) -> None:
        """What the controller does on a watch event: update the index, then notify."""
        for obj in objects:
            self.index.upsert(obj)
        self.server.notify()

    def state(self, pod: str) -> SidecarState | None:
        return next((s for s in self.server.sidecars() if s.pod_name == pod), None)

    def current(self, *pods: str) -> bool:
        return all((s := self.state(p)) is not None and s.current for p in pods)

    async def until(self, predicate: Callable[[], bool]) -> None:
        await self.server.wait_for(predicate, WAIT)


# --- the sidecar side -----------------------------------------------------------


def write_pod_info(folder: Path, name: str, labels: dict[str, str]) -> Path:
    """A downward API folder as the kubelet writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "namespace").write_text(NS)
    (folder / "name").write_text(name)
    (folder / "labels").write_text("\n".join(f'{k}="{v}"' for k, v in sorted(labels.items())))
    return folder


def check_request(headers: dict[str, str], path: str = "/orders") -> pb.CheckRequest:
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", path
    http.headers.update(headers)
    return request


class Pod:
    """A running Sidecar and a gRPC client for its Check and health services."""

    def __init__(self, sidecar: Sidecar, idp: DevIssuer) -> None:
        self.sidecar = sidecar
        self.idp = idp
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
        self.auth = pb_grpc.AuthorizationStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    @property
    def client(self) -> Any:
        assert self.sidecar.policy_client is not None
        return self.sidecar.policy_client

    async def status(self, audience: str | None) -> int:
        """The HTTP status Envoy would answer for a token with this audience (None: no token)."""
        headers = {}
        if audience is not None:
            headers["authorization"] = f"Bearer {self.idp.mint({'aud': audience})}"
        reply = await self.auth.Check(check_request(headers), timeout=5)
        return 200 if reply.status.code == 0 else reply.denied_response.status.code

    async def health(self) -> str:
        reply = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def stop(self) -> None:
        await self.channel.close()
        await self.sidecar.stop()


class Fleet:
    """Operators and pods of one test, all stopped at teardown."""

    def __init__(self, tmp_path: Path, idp: DevIssuer) -> None:
        self.tmp_path = tmp_path
        self.idp = idp
        self.index = PolicyIndex()
        self.tls = certs.write_server_tls(tmp_path / "tls")
        self.operators: list[Operator] = []
        self.pods: list[Pod] = []

    async def operator(self, port: int = 0, tls: bool = False) -> Operator:
        files = TlsFiles(cert=self.tls.cert, key=self.tls.key) if tls else None
        operator = Operator(self.index, files)
        self.operators.append(operator)
        return await operator.start(port)

    def sidecar(
        self, name: str, labels: dict[str, str], port: int, ca: Path | None = None
    ) -> Sidecar:
        return Sidecar(
            SidecarConfig(
                policy_server=f"127.0.0.1:{port}",
                policy_server_ca=ca,
                policy_server_insecure=ca is None,
                pod_info_dir=write_pod_info(self.tmp_path / "pods" / name, name, labels),
                snapshot_file=self.tmp_path / "snapshots" / name / "snapshot.json",
                policy_server_backoff_initial=0.05,
                policy_server_backoff_max=0.5,
                listen="127.0.0.1:0",
                grace_seconds=0.2,
            )
        )

    async def pod(
        self, name: str, labels: dict[str, str], port: int, ca: Path | None = None
    ) -> Pod:
        sidecar = self.sidecar(name, labels, port, ca)
        await sidecar.start()
        pod = Pod(sidecar, self.idp)
        self.pods.append(pod)
        return pod

    async def stop_pod(self, pod: Pod) -> None:
        self.pods.remove(pod)
        await pod.stop()

    async def close(self) -> None:
        for pod in self.pods:
            await pod.stop()
        for operator in self.operators:
            await operator.stop()


@pytest.fixture
async def fleet(tmp_path: Path, idp: DevIssuer) -> AsyncIterator[Fleet]:
    fleet = Fleet(tmp_path, idp)
    try:
        yield fleet
    finally:
        await fleet.close()


class LogWatch(logging.Handler):
    """Collects one logger's records and wakes waiters on each."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._event.set()

    def fields(self, message: str) -> list[dict[str, Any]]:
        return [r.fields for r in self.records if r.getMessage() == message]  # type: ignore[attr-defined]

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._event.clear()
                await self._event.wait()


@pytest.fixture
def client_log() -> Iterator[LogWatch]:
    logger = logging.getLogger("lastguard.policy_client")
    watch, level = LogWatch(), logger.level
    logger.addHandler(watch)
    logger.setLevel(logging.INFO)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


STREAM_ENDED = "policy server stream ended; keeping current policy and reconnecting"


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- distribution ---------------------------------------------------------------


async def test_each_sidecar_gets_its_workloads_snapshot_and_only_selected_ones_change(
    fleet: Fleet, idp: DevIssuer
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    fleet.index.upsert(jwt_policy(idp, "api", "api", {"app": "api"}))
    operator = await fleet.operator()
    web = await fleet.pod("web-1", {"app": "web"}, operator.port)
    api = await fleet.pod("api-1", {"app": "api", "tier": "backend"}, operator.port)
    await operator.until(lambda: operator.current("web-1", "api-1"))

    web_state, api_state = operator.state("web-1"), operator.state("api-1")
    assert web_state is not None and api_state is not None
    assert web_state.due_version != api_state.due_version
    assert api_state.workload == Workload.of(NS, {"app": "api", "tier": "backend"})
    assert [await web.status("web"), await web.status("api")] == [200, 401]
    assert [await api.status("api"), await api.status("web")] == [200, 401]
    assert await web.health() == await api.health() == SERVING
    assert operator.server.counts_for((NS, "web")) == (1, 1)
    assert operator.server.counts_for((NS, "api")) == (1, 1)
    assert operator.server.counts_for((NS, "absent")) == (0, 0)

    # A change to the web policy reaches the web sidecar and nothing else.
    propagations = metric("lastguard_operator_propagation_seconds_count")
    operator.apply(jwt_policy(idp, "web", "web-v2", {"app": "web"}))
    changed = operator.state("web-1")
    assert changed is not None and changed.due_version != web_state.due_version
    assert operator.server.counts_for((NS, "web")) == (0, 1)  # due, not yet acknowledged
    await operator.until(lambda: operator.current("web-1"))
    assert [await web.status("web-v2"), await web.status("web")] == [200, 401]
    untouched = operator.state("api-1")
    assert untouched is not None
    assert (untouched.due_version, untouched.sent_version, untouched.acked_version) == (
        api_state.due_version,
        api_state.sent_version,
        api_state.acked_version,
    )
    assert api.client.version == api_state.due_version
    assert operator.server.counts_for((NS, "web")) == (1, 1)
    assert metric("lastguard_operator_propagation_seconds_count") == propagations + 1
    assert operator.server.last_propagation is not None
    print(f"\npropagation to one sidecar: {operator.server.last_propagation * 1000:.1f} ms")

    # A namespace-wide policy is a candidate for both: both get a new snapshot (the
    # more specific policies still win), and it counts both sidecars.
    operator.apply(jwt_policy(idp, "shop-default", "anyone"))
    assert operator.server.counts_for((NS, "shop-default")) == (0, 2)
    await operator.until(lambda: operator.current("web-1", "api-1"))
    assert operator.server.counts_for((NS, "shop-default")) == (2, 2)
    assert metric("lastguard_operator_propagation_seconds_count") == propagations + 2
    print(f"propagation to two sidecars: {operator.server.last_propagation * 1000:.1f} ms")
    assert [await web.status("web-v2"), await web.status("anyone")] == [200, 401]

    # The file each sidecar keeps is the snapshot it enforces, private to it.
    stored = web.client.snapshot_file
    assert json.loads(stored.read_text())["version"] == web.client.version
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


async def test_a_policy_deleted_from_the_index_leaves_the_sidecar_with_no_policy(
    fleet: Fleet, idp: DevIssuer
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator()
    web = await fleet.pod("web-1", {"app": "web"}, operator.port)
    await operator.until(lambda: operator.current("web-1"))
    assert await web.status("web") == 200

    fleet.index.delete(NS, "web")
    operator.server.notify()
    await operator.until(lambda: operator.current("web-1"))
    assert await web.status("web") == 403  # no policy selects this workload
    assert await web.health() == SERVING


BAD_DOCUMENTS = [
    pytest.param(
        lambda doc: json.dumps({**doc, "spec": {**doc["spec"], "futureField": True}}),
        "document 0 (web): spec.futureField: unknown field",
        id="field-from-a-newer-operator",
    ),
    pytest.param(lambda doc: "{not json", "document 0: not a JSON document", id="not-json"),
]


@pytest.mark.parametrize(("corrupt", "error"), BAD_DOCUMENTS)
async def test_a_snapshot_the_sidecar_cannot_use_is_rejected_and_the_old_policy_stays(
    fleet: Fleet, idp: DevIssuer, corrupt: Callable[[dict[str, Any]], str], error: str
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator()
    web = await fleet.pod("web-1", {"app": "web"}, operator.port)
    await operator.until(lambda: operator.current("web-1"))
    good = web.client.version
    rejected = metric("lastguard_operator_acks_total", result="rejected")

    operator.mangle = lambda snapshot: Snapshot.of(
        corrupt(json.loads(d)) for d in snapshot.documents
    )
    operator.server.notify()

    def answered() -> bool:
        state = operator.state("web-1")
        return state is not None and state.acked_version == state.due_version

    await operator.until(answered)
    state = operator.state("web-1")
    assert state is not None and state.applied is False and not state.current
    assert state.error is not None and error in state.error
    assert operator.server.counts_for((NS, "web"))[0] == 0  # no sidecar enforces what is due
    assert metric("lastguard_operator_acks_total", result="rejected") == rejected + 1
    assert web.client.version == good
    assert [await web.status("web"), await web.status(None)] == [200, 401]
    assert await web.health() == SERVING
    assert json.loads(web.client.snapshot_file.read_text())["version"] == good

    # Back to the version the sidecar still enforces: current again, nothing re-applied.
    operator.mangle = None
    operator.server.notify()
    await operator.until(lambda: operator.current("web-1"))
    assert web.client.version == good


async def test_sidecars_keep_enforcing_without_the_operator_and_reconnect_when_it_returns(
    fleet: Fleet, idp: DevIssuer
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    fleet.index.upsert(jwt_policy(idp, "api", "api", {"app": "api"}))
    operator = await fleet.operator()
    web = await fleet.pod("web-1", {"app": "web"}, operator.port)
    api = await fleet.pod("api-1", {"app": "api"}, operator.port)
    await operator.until(lambda: operator.current("web-1", "api-1"))

    port = operator.port
    await operator.stop()
    assert [await web.status("web"), await api.status("api")] == [200, 200]
    assert [await web.health(), await api.health()] == [SERVING, SERVING]

    # Changed while the operator was away; the restarted one (same port) brings it.
    fleet.index.upsert(jwt_policy(idp, "web", "web-v2", {"app": "web"}))
    restarted = await fleet.operator(port)
    await restarted.until(lambda: restarted.current("web-1", "api-1"))
    assert [await web.status("web-v2"), await web.status("web")] == [200, 401]
    assert web.client.failures >= 1 and api.client.failures >= 1

    # And further changes flow through the new stream.
    restarted.apply(jwt_policy(idp, "api", "api-v2", {"app": "api"}))
    await restarted.until(lambda: restarted.current("api-1"))
    assert [await api.status("api-v2"), await api.status("api")] == [200, 401]


async def test_a_restarted_sidecar_enforces_its_stored_snapshot_while_the_operator_is_down(
    fleet: Fleet, idp: DevIssuer, client_log: LogWatch
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator()
    web = await fleet.pod("web-1", {"app": "web"}, operator.port)
    await operator.until(lambda: operator.current("web-1"))
    version = web.client.version
    port = operator.port
    await operator.stop()
    await fleet.stop_pod(web)

    sidecar = fleet.sidecar("web-1", {"app": "web"}, port)
    assert not sidecar.store.loaded
    before = await sidecar.authorizer.check("GET", "/orders", {})
    assert (before.allowed, before.status) == (False, 503)

    await sidecar.start()
    restarted = Pod(sidecar, idp)
    fleet.pods.append(restarted)
    assert await restarted.health() == SERVING  # at once, not after a reconnect
    assert [await restarted.status("web"), await restarted.status(None)] == [200, 401]
    assert restarted.client.version == version
    assert not restarted.client.connected
    await client_log.until(lambda: len(client_log.fields(STREAM_ENDED)) >= 1)
    assert client_log.fields(STREAM_ENDED)[-1]["enforcing"] == version

    # When the operator is back, the same version is acknowledged without re-applying.
    unchanged = metric("lastguard_policy_snapshots_total", result="unchanged")
    back = await fleet.operator(port)
    await back.until(lambda: back.current("web-1"))
    assert metric("lastguard_policy_snapshots_total", result="unchanged") == unchanged + 1


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(None, id="no-snapshot-file"),
        pytest.param("{truncated", id="garbled-file"),
        pytest.param(json.dumps({"version": "x", "documents": ["{}"]}), id="invalid-policy"),
    ],
)
async def test_with_no_usable_snapshot_and_no_operator_the_sidecar_denies_with_503(
    fleet: Fleet, client_log: LogWatch, stored: str | None
) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        sidecar = fleet.sidecar("web-1", {"app": "web"}, closed.getsockname()[1])
        assert sidecar.policy_client is not None and sidecar.policy_client.snapshot_file
        if stored is not None:
            sidecar.policy_client.snapshot_file.parent.mkdir(parents=True)
            sidecar.policy_client.snapshot_file.write_text(stored)
        await sidecar.start()
        pod = Pod(sidecar, fleet.idp)
        fleet.pods.append(pod)
        await client_log.until(lambda: len(client_log.fields(STREAM_ENDED)) >= 2)

    assert await pod.health() == NOT_SERVING
    assert await pod.status(None) == 503
    assert await pod.status("web") == 503
    assert all(f["reason"].startswith("UNAVAILABLE") for f in client_log.fields(STREAM_ENDED))


async def test_tls_with_the_right_ca(fleet: Fleet, idp: DevIssuer) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator(tls=True)
    web = await fleet.pod("web-1", {"app": "web"}, operator.port, ca=fleet.tls.ca)
    await operator.until(lambda: operator.current("web-1"))
    assert await web.status("web") == 200
    state = operator.state("web-1")
    assert state is not None and state.peer.startswith("ipv4:127.0.0.1:")


async def test_renewed_certificate_is_served_without_a_restart(
    fleet: Fleet, idp: DevIssuer, tmp_path: Path
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator(tls=True)
    first = await fleet.pod("web-1", {"app": "web"}, operator.port, ca=fleet.tls.ca)
    await operator.until(lambda: operator.current("web-1"))
    assert await first.status("web") == 200

    renewed = certs.write_server_tls(tmp_path / "renewed")  # a new CA and certificate
    fleet.tls.cert.write_bytes(renewed.cert.read_bytes())
    fleet.tls.key.write_bytes(renewed.key.read_bytes())
    second = await fleet.pod("web-2", {"app": "web"}, operator.port, ca=renewed.ca)
    await operator.until(lambda: operator.current("web-2"))
    assert await second.status("web") == 200


@pytest.mark.parametrize("ca", ["wrong_ca", None], ids=["wrong-ca", "plaintext-client"])
async def test_tls_without_the_right_ca_never_becomes_ready(
    fleet: Fleet, idp: DevIssuer, client_log: LogWatch, ca: str | None
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator(tls=True)
    trust = getattr(fleet.tls, ca) if ca else None
    web = await fleet.pod("web-1", {"app": "web"}, operator.port, ca=trust)
    await client_log.until(lambda: len(client_log.fields(STREAM_ENDED)) >= 2)

    assert await web.health() == NOT_SERVING
    assert await web.status("web") == 503
    assert operator.server.sidecars() == []
    reasons = [f["reason"] for f in client_log.fields(STREAM_ENDED)]
    assert all(r.startswith("UNAVAILABLE") for r in reasons), reasons
    print(f"\nlogged: {reasons[-1]}")


# --- the protocol ---------------------------------------------------------------


def hello(namespace: str = NS, pod_name: str = "p", **labels: str) -> dpb.SidecarMessage:
    return dpb.SidecarMessage(
        hello=dpb.Hello(namespace=namespace, labels=labels, pod_name=pod_name)
    )


@pytest.mark.parametrize(
    ("first", "details"),
    [
        pytest.param(hello(""), "namespace: is required", id="no-namespace"),
        pytest.param(hello("Shop"), "'Shop' is not a DNS label", id="namespace-not-a-dns-label"),
        pytest.param(hello(**{"-app": "web"}), "labels: key '-app'", id="bad-label-key"),
        pytest.param(
            dpb.SidecarMessage(ack=dpb.Ack(version="x", applied=True)),
            "the first message must be a Hello",
            id="ack-first",
        ),
        pytest.param(dpb.SidecarMessage(), "the first message must be a Hello", id="empty"),
    ],
)
async def test_an_invalid_hello_is_refused(
    fleet: Fleet, first: dpb.SidecarMessage, details: str
) -> None:
    operator = await fleet.operator()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{operator.port}") as channel:
        call = dpb_grpc.PolicyDistributionStub(channel).Stream()
        await call.write(first)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details in (refused.value.details() or "")
    assert operator.server.sidecars() == []


async def test_a_second_hello_ends_the_stream(fleet: Fleet, idp: DevIssuer) -> None:
    operator = await fleet.operator()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{operator.port}") as channel:
        call = dpb_grpc.PolicyDistributionStub(channel).Stream()
        await call.write(hello(app="web"))
        first = await call.read()
        assert first.documents == [] and first.version and first.sent_at.seconds > 0
        await call.write(hello(app="api"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only Acks" in (ended.value.details() or "")
    await operator.until(lambda: operator.server.sidecars() == [])


async def test_a_sidecar_that_never_answers_does_not_hold_up_the_others(
    fleet: Fleet, idp: DevIssuer
) -> None:
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator()
    api = await fleet.pod("api-1", {"app": "api"}, operator.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{operator.port}") as channel:
        stuck = dpb_grpc.PolicyDistributionStub(channel).Stream()
        await stuck.write(hello(app="web"))  # and never reads nor acks
        await operator.until(lambda: len(operator.server.sidecars()) == 2)
        await operator.until(lambda: operator.current("api-1"))
        propagated = operator.server.last_propagation

        for audience in ("a1", "a2", "a3"):  # the stuck stream falls behind; api keeps up
            operator.apply(jwt_policy(idp, "shop-default", audience))
            await operator.until(lambda: operator.current("api-1"))
        assert operator.server.counts_for((NS, "shop-default")) == (1, 2)
        assert operator.server.last_propagation is propagated  # still waiting for the stuck one

        stuck.cancel()
        # Once it leaves, the rollouts it held finish with the answers they got.
        await operator.until(lambda: len(operator.server.sidecars()) == 1)
    assert operator.server.last_propagation is not propagated
    assert operator.server.counts_for((NS, "shop-default")) == (1, 1)
    assert await api.status("a3") == 200  # no specific policy selects api: the namespace's applies


async def test_a_pods_worker_streams_count_as_one_sidecar(fleet: Fleet, idp: DevIssuer) -> None:
    """`--workers N` opens N streams from one pod: status counts the pod once, and as
    current only when every worker enforces the snapshot."""
    fleet.index.upsert(jwt_policy(idp, "web", "web", {"app": "web"}))
    operator = await fleet.operator()
    await fleet.pod("web-1", {"app": "web"}, operator.port)
    await operator.until(lambda: operator.current("web-1"))
    assert operator.server.counts_for((NS, "web")) == (1, 1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{operator.port}") as channel:
        second = dpb_grpc.PolicyDistributionStub(channel).Stream()
        await second.write(hello(pod_name="web-1", app="web"))  # a second worker, not acking
        await operator.until(lambda: len(operator.server.sidecars()) == 2)
        assert operator.server.counts_for((NS, "web")) == (0, 1)

        sent = await second.read()
        await second.write(dpb.SidecarMessage(ack=dpb.Ack(version=sent.version, applied=True)))
        await operator.until(lambda: operator.server.counts_for((NS, "web")) == (1, 1))
        other = dpb_grpc.PolicyDistributionStub(channel).Stream()
        await other.write(hello(pod_name="web-2", app="web"))  # another pod counts apart
        await operator.until(lambda: operator.server.counts_for((NS, "web")) == (1, 2))
        second.cancel()
        other.cancel()
    await operator.until(lambda: operator.server.counts_for((NS, "web")) == (1, 1))


# --- command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "exactly one of --policy-file FILE and --policy-server", id="no-source"),
        pytest.param(
            ["--policy-file", "p.yaml", "--policy-server", "op:9443"],
            "exactly one of --policy-file FILE and --policy-server",
            id="two-sources",
        ),
        pytest.param(
            ["--policy-server", "op:9443", "--policy-server-insecure"],
            "--policy-server needs this pod's identity",
            id="no-identity",
        ),
        pytest.param(
            ["--policy-server", "op:9443", "--namespace", "shop"],
            "exactly one of --policy-server-ca FILE (TLS) and --policy-server-insecure",
            id="no-transport",
        ),
        pytest.param(
            [
                "--policy-server", "op:9443", "--namespace", "shop",
                "--policy-server-ca", "ca.pem", "--policy-server-insecure",
            ],
            "exactly one of --policy-server-ca FILE (TLS) and --policy-server-insecure",
            id="two-transports",
        ),
        pytest.param(
            ["--policy-server", "op:9443", "--pod-info-dir", "/p", "--namespace", "shop"],
            "--pod-info-dir already gives the namespace and labels",
            id="identity-twice",
        ),
        pytest.param(
            ["--policy-file", "p.yaml", "--policy-server-ca", "ca.pem"],
            "--policy-server-ca only apply with --policy-server",
            id="ca-without-server",
        ),
    ],
)  # fmt: skip
def test_sidecar_flags_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["sidecar", *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_pod_info_volume_is_a_clear_startup_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "lastguard.sidecar.cli", "sidecar",
            "--policy-server", "127.0.0.1:1", "--policy-server-insecure",
            "--pod-info-dir", str(tmp_path / "podinfo"), "--listen", "127.0.0.1:0",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{tmp_path / 'podinfo' / 'namespace'} is missing" in result.stderr
