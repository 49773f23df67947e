"""The sidecar process in-process: real gRPC on 127.0.0.1, real HTTP JWKS, a policy file.

Covers what sits between Envoy and the authorizer: Check over gRPC, health,
metrics, hot reload of the policy file, and keeping the old policy when a new
file is invalid.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from lastguard.sidecar import devissuer
from lastguard.sidecar.server import SERVICE_NAME, Sidecar, SidecarConfig

pytestmark = pytest.mark.e2e


def policy_yaml(issuer: str, jwks_uri: str, audience: str = "api") -> str:
    return json.dumps(
        {
            "apiVersion": "lastguard.dev/v1alpha1",
            "kind": "JWTPolicy",
            "metadata": {"name": "api", "namespace": "default"},
            "spec": {
                "issuers": [
                    {
                        "issuer": issuer,
                        "jwksUri": jwks_uri,
                        "audiences": [audience],
                        "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                    }
                ],
                "rules": [{"paths": ["/healthz"], "action": "Allow"}],
            },
        }
    )


def check_request(path: str, headers: dict[str, str], method: str = "GET") -> pb.CheckRequest:
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = method, path
    http.headers.update(headers)
    return request


class Harness:
    def __init__(self, sidecar: Sidecar, issuer: devissuer.DevIssuer, policy_file: Path) -> None:
        self.sidecar, self.issuer, self.policy_file = sidecar, issuer, policy_file
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}")
        self.stub = pb_grpc.AuthorizationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def check(self, path: str, headers: dict[str, str]) -> pb.CheckResponse:
        return await self.stub.Check(check_request(path, headers), timeout=5)

    async def status(self) -> int:
        reply = await self.health.Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
        return int(reply.status)

    async def wait_for(self, predicate: object, timeout: float = 5.0) -> None:
        async def poll() -> None:
            while not await predicate():  # type: ignore[operator]
                await asyncio.sleep(0.05)

        await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    issuer = devissuer.DevIssuer()
    served = await devissuer.serve(issuer, "127.0.0.1", 0)
    policy_file = tmp_path / "policy.yaml"
    sidecar = Sidecar(
        SidecarConfig(policy_file=policy_file, listen="127.0.0.1:0", reload_interval=0.1)
    )
    await sidecar.start()
    h = Harness(sidecar, issuer, policy_file)
    try:
        yield h
    finally:
        await h.channel.close()
        await sidecar.stop()
        await served.close()


async def test_not_serving_and_denying_until_a_policy_loads(harness: Harness) -> None:
    assert await harness.status() == health_pb2.HealthCheckResponse.NOT_SERVING
    response = await harness.check("/", {})
    assert response.denied_response.status.code == 503
    assert response.status.code == 14  # UNAVAILABLE

    harness.policy_file.write_text(policy_yaml(harness.issuer.url, harness.issuer.jwks_uri))

    async def serving() -> bool:
        return await harness.status() == health_pb2.HealthCheckResponse.SERVING

    await harness.wait_for(serving)
    token = harness.issuer.mint({"sub": "alice", "aud": "api"})
    allowed = await harness.check("/api", {"authorization": f"Bearer {token}", "x-user": "admin"})
    assert allowed.status.code == 0
    assert [(h.header.key, h.header.value) for h in allowed.ok_response.headers] == [
        ("x-user", "alice")
    ]
    assert list(allowed.ok_response.headers_to_remove) == ["authorization"]
    assert (
        allowed.dynamic_metadata.fields["claims"].struct_value.fields["sub"].string_value == "alice"
    )

    denied = await harness.check("/api", {})
    assert denied.denied_response.status.code == 401
    challenge = {h.header.key: h.header.value for h in denied.denied_response.headers}
    assert challenge["www-authenticate"] == 'Bearer realm="lastguard"'
    assert json.loads(denied.denied_response.body)["error"] == "unauthorized"


async def test_hot_reload_and_invalid_file_keeps_old_policy(harness: Harness) -> None:
    issuer = harness.issuer
    harness.policy_file.write_text(policy_yaml(issuer.url, issuer.jwks_uri, audience="api"))
    harness.sidecar.policy_file.load()
    token_b = issuer.mint({"sub": "bob", "aud": "billing"})
    assert (
        await harness.check("/x", {"authorization": f"Bearer {token_b}"})
    ).denied_response.status.code == 401

    harness.policy_file.write_text(policy_yaml(issuer.url, issuer.jwks_uri, audience="billing"))

    async def reloaded() -> bool:
        reply = await harness.check("/x", {"authorization": f"Bearer {token_b}"})
        return reply.status.code == 0

    await harness.wait_for(reloaded)

    harness.policy_file.write_text("spec: [this is not a policy")
    await asyncio.sleep(0.4)  # several reload intervals: the bad file is seen and refused
    assert (await harness.check("/x", {"authorization": f"Bearer {token_b}"})).status.code == 0


async def test_garbage_requests_are_denied_not_errors(harness: Harness) -> None:
    harness.policy_file.write_text(policy_yaml(harness.issuer.url, harness.issuer.jwks_uri))
    harness.sidecar.policy_file.load()
    cases = [
        {"authorization": "Bearer " + "A" * 100_000},
        {"authorization": "Bearer \x00\x01"},
        {"authorization": "Bearer a.b.c"},
        {"authorization": "Bearer e30.e30.e30"},
        {"authorization": "Bearer " + "e30." * 3},
        {"authorization": "Bearer ..."},
    ]
    for headers in cases:
        reply = await harness.check("/x", headers)
        assert reply.denied_response.status.code == 401, headers
    # An empty CheckRequest (no http attributes at all) is a denial too.
    reply = await harness.stub.Check(pb.CheckRequest(), timeout=5)
    assert reply.denied_response.status.code == 401


async def test_metrics_endpoint(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sidecar = Sidecar(
        SidecarConfig(
            policy_file=tmp_path / "none.yaml",
            listen="127.0.0.1:0",
            metrics_listen=f"127.0.0.1:{port}",
        )
    )
    await sidecar.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            await pb_grpc.AuthorizationStub(channel).Check(check_request("/", {}), timeout=5)
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
    finally:
        await sidecar.stop()
    assert 'lastguard_decisions_total{reason="not_ready",result="deny"}' in body
    assert "lastguard_check_duration_seconds_bucket" in body


async def test_http_probes_follow_policy_loading(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy_file = tmp_path / "policy.yaml"
    sidecar = Sidecar(
        SidecarConfig(
            policy_file=policy_file,
            listen="127.0.0.1:0",
            health_listen=f"127.0.0.1:{port}",
            reload_interval=0.1,
        )
    )

    def get(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    await sidecar.start()
    try:
        assert await asyncio.to_thread(get, "/healthz") == 200
        assert await asyncio.to_thread(get, "/readyz") == 503
        issuer = devissuer.DevIssuer("https://idp.example")
        policy_file.write_text(policy_yaml(issuer.url, "https://idp.example/jwks"))

        async def ready() -> None:
            while await asyncio.to_thread(get, "/readyz") != 200:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(ready(), 5)
    finally:
        await sidecar.stop()
