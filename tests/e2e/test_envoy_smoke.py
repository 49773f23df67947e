"""The real Envoy speaks ext_authz with us the way lastguard assumes it does.

First against a tiny in-test authorization server (allow when `x-allow: yes`),
which pins Envoy's side of the contract: headers set with OVERWRITE reach the
app, removed headers don't, a denial reaches the client as sent, an unreachable
server fails closed with 503, and paths are normalised before the check. Then
the same through the real sidecar, through Envoy's native jwt_authn (the
reference a differential test compares with), and through
manifests/envoy/envoy-sidecar.yaml exactly as shipped, ports aside.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from lastguard.proto.envoy.config.core.v3 import base_pb2
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from lastguard.proto.envoy.type.v3 import http_status_pb2
from lastguard.proto.google.rpc import status_pb2
from tests.support import envoy as envoy_support
from tests.support import envoy_config
from tests.support.envoy import EnvoyProcess, StartEnvoy
from tests.support.issuer import ThreadedTestIssuer
from tests.support.sidecar import (
    PolicyWriter,
    SidecarProcess,
    StartSidecar,
    StartSidecarProcess,
    free_port,
)
from tests.support.upstream import UpstreamApp

ROOT = Path(__file__).resolve().parents[2]
SIDECAR_MANIFEST = ROOT / "manifests" / "envoy" / "envoy-sidecar.yaml"
#: The bootstrap for lastguard's HTTP mode (--http-listen 127.0.0.1:9192).
SIDECAR_HTTP_MANIFEST = ROOT / "manifests" / "envoy" / "envoy-sidecar-http.yaml"
SAMPLES = sorted((ROOT / "manifests" / "samples").glob("*.yaml"))

DENIAL_BODY = {"error": "invalid_token", "error_description": "the test server says no"}


# --- a tiny authorization server ----------------------------------------------


def _overwrite(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class FakeAuthz(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allows when `x-allow: yes` (setting x-user, removing x-remove-me), else denies 401."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        http = request.attributes.request.http
        with self.lock:
            self.seen.append((http.method, http.path, dict(http.headers)))
        if http.headers.get("x-allow") == "yes":
            return pb.CheckResponse(
                status=status_pb2.Status(code=0),
                ok_response=pb.OkHttpResponse(
                    headers=[_overwrite("x-user", "alice")], headers_to_remove=["x-remove-me"]
                ),
            )
        return pb.CheckResponse(
            status=status_pb2.Status(code=16),
            denied_response=pb.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=401),
                headers=[
                    _overwrite("www-authenticate", 'Bearer realm="test", error="invalid_token"'),
                    _overwrite("content-type", "application/json"),
                ],
                body=json.dumps(DENIAL_BODY),
            ),
        )

    def paths(self) -> list[str]:
        with self.lock:
            return [path for _, path, _ in self.seen]


@pytest.fixture(scope="module")
def fake_authz() -> Iterator[tuple[FakeAuthz, int]]:
    service = FakeAuthz()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_AuthorizationServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, port
    server.stop(grace=None)


@pytest.fixture
def authz(fake_authz: tuple[FakeAuthz, int]) -> FakeAuthz:
    service, _ = fake_authz
    with service.lock:
        service.seen.clear()
    return service


@pytest.fixture
def envoy_to_fake(
    start_envoy: StartEnvoy, fake_authz: tuple[FakeAuthz, int], upstream: UpstreamApp
) -> EnvoyProcess:
    _, authz_port = fake_authz
    return start_envoy(
        [envoy_config.ext_authz_listener(authz_port=authz_port, upstream_port=upstream.port)]
    )


# --- Envoy's side of the ext_authz contract -----------------------------------


@pytest.mark.e2e
def test_allowed_request_reaches_the_app_with_headers_overwritten_and_removed(
    envoy_to_fake: EnvoyProcess, authz: FakeAuthz, upstream: UpstreamApp
) -> None:
    status, _, body = envoy_to_fake.request(
        "GET",
        "/orders?id=1",
        [("x-allow", "yes"), ("x-user", "mallory"), ("x-remove-me", "secret"), ("x-keep", "1")],
    )
    seen = json.loads(body)
    assert status == 200
    assert seen["path"] == "/orders?id=1"
    assert seen["headers"]["x-user"] == "alice"  # the client's copy was overwritten, not appended
    assert "x-remove-me" not in seen["headers"]
    assert seen["headers"]["x-keep"] == "1"
    assert authz.seen[0][2]["x-user"] == "mallory"  # the check saw what the client sent


@pytest.mark.e2e
def test_denied_request_gets_the_servers_status_headers_and_body(
    envoy_to_fake: EnvoyProcess, authz: FakeAuthz, upstream: UpstreamApp
) -> None:
    response = envoy_to_fake.request("GET", "/orders", {"x-user": "mallory"})
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="test", error="invalid_token"'
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DENIAL_BODY
    assert upstream.requests == []


@pytest.mark.e2e
def test_unreachable_authorization_server_fails_closed_with_503(
    start_envoy: StartEnvoy, upstream: UpstreamApp
) -> None:
    envoy = start_envoy(
        [envoy_config.ext_authz_listener(authz_port=free_port(), upstream_port=upstream.port)]
    )
    response = envoy.request("GET", "/orders", {"x-allow": "yes"})
    assert response.status == 503
    assert upstream.requests == []


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("sent", "checked"),
    [
        pytest.param("/public/../admin", "/admin", id="dot-dot"),
        pytest.param("/./admin/./users", "/admin/users", id="dot"),
        pytest.param("//admin///users", "/admin/users", id="repeated-slashes"),
        pytest.param("/%61dmin", "/admin", id="percent-encoded-unreserved"),
    ],
)
def test_path_is_normalised_before_the_check(
    envoy_to_fake: EnvoyProcess, authz: FakeAuthz, upstream: UpstreamApp, sent: str, checked: str
) -> None:
    status, _, body = envoy_to_fake.request("GET", sent, {"x-allow": "yes"})
    assert status == 200
    assert authz.paths() == [checked]
    assert json.loads(body)["path"] == checked


@pytest.mark.e2e
def test_escaped_slash_is_redirected_to_the_unescaped_path_without_a_check(
    envoy_to_fake: EnvoyProcess, authz: FakeAuthz, upstream: UpstreamApp
) -> None:
    response = envoy_to_fake.request("GET", "/admin%2Fusers", {"x-allow": "yes"})
    assert response.status == 307
    assert response.headers["location"].endswith("/admin/users")
    assert authz.paths() == []
    assert upstream.requests == []


@pytest.mark.e2e
def test_headers_with_underscores_never_reach_the_check_or_the_app(
    envoy_to_fake: EnvoyProcess, authz: FakeAuthz, upstream: UpstreamApp
) -> None:
    response = envoy_to_fake.request("GET", "/", {"x-allow": "yes", "x_user": "admin"})
    assert response.status == 200
    assert "x_user" not in response.json()["headers"]
    assert "x_user" not in authz.seen[0][2]


# --- Envoy's native jwt_authn (the differential test's reference) -------------


@pytest.fixture(scope="module")
def issuer() -> Iterator[ThreadedTestIssuer]:
    with ThreadedTestIssuer() as running:
        yield running


@pytest.mark.e2e
def test_jwt_authn_listeners_with_local_and_remote_keys(
    start_envoy: StartEnvoy, issuer: ThreadedTestIssuer, upstream: UpstreamApp
) -> None:
    envoy = start_envoy(
        [
            envoy_config.jwt_authn_listener(
                "local",
                upstream_port=upstream.port,
                issuer=issuer.issuer,
                audiences=["api"],
                local_jwks=json.dumps(issuer.dev.jwks()),
                claim_to_headers=[("x-user", "sub")],
            ),
            envoy_config.jwt_authn_listener(
                "remote",
                upstream_port=upstream.port,
                issuer=issuer.issuer,
                audiences=["api"],
                remote_jwks_uri=issuer.jwks_uri,
            ),
        ]
    )
    good = issuer.mint({"sub": "alice"}, audience="api")
    other_audience = issuer.mint({"sub": "alice"}, audience="other")
    for listener in ("local", "remote"):
        ok = envoy.request("GET", "/x", {"authorization": f"Bearer {good}"}, listener=listener)
        assert ok.status == 200, (listener, ok)
        assert "authorization" not in ok.json()["headers"]  # forward: false
        assert envoy.request("GET", "/x", listener=listener).status == 401
        wrong = {"authorization": f"Bearer {other_audience}"}
        assert envoy.request("GET", "/x", wrong, listener=listener).status == 403
    claimed = envoy.request("GET", "/x", {"authorization": f"Bearer {good}"}, listener="local")
    assert claimed.json()["headers"]["x-user"] == "alice"  # claim_to_headers


# --- the real sidecar ----------------------------------------------------------


def api_policy(issuer: ThreadedTestIssuer, audience: str = "api") -> dict[str, Any]:
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {
            "issuers": [
                {
                    "issuer": issuer.issuer,
                    "jwksUri": issuer.jwks_uri,
                    "audiences": [audience],
                    "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
                }
            ],
            "rules": [{"paths": ["/healthz"], "action": "Allow"}],
            "defaultAction": "Authenticate",
        },
    }


@pytest.mark.e2e
def test_real_sidecar_behind_envoy(
    start_envoy: StartEnvoy,
    start_sidecar: StartSidecar,
    write_policy: PolicyWriter,
    issuer: ThreadedTestIssuer,
    upstream: UpstreamApp,
) -> None:
    sidecar = start_sidecar(write_policy(api_policy(issuer)))
    envoy = start_envoy(
        [envoy_config.ext_authz_listener(authz_port=sidecar.port, upstream_port=upstream.port)]
    )
    denied = envoy.request("GET", "/api/orders")
    assert denied.status == 401
    assert denied.headers["www-authenticate"].startswith("Bearer")
    assert upstream.requests == []

    token = issuer.mint({"sub": "alice"}, audience="api")
    allowed = envoy.request(
        "GET", "/api/orders", {"authorization": f"Bearer {token}", "x-user": "admin"}
    )
    assert allowed.status == 200, allowed
    assert allowed.json()["headers"]["x-user"] == "alice"


@pytest.mark.e2e
def test_sidecar_without_a_loadable_policy_fails_closed(
    start_envoy: StartEnvoy,
    start_sidecar: StartSidecar,
    write_policy: PolicyWriter,
    upstream: UpstreamApp,
) -> None:
    sidecar = start_sidecar(write_policy("kind: NotAPolicy\n"), ready="port")
    envoy = start_envoy(
        [envoy_config.ext_authz_listener(authz_port=sidecar.port, upstream_port=upstream.port)]
    )
    response = envoy.request("GET", "/healthz")  # even the Allow path: there is no policy yet
    assert response.status == 503
    assert upstream.requests == []


# --- manifests/envoy/envoy-sidecar.yaml ------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    "manifest", [SIDECAR_MANIFEST, SIDECAR_HTTP_MANIFEST], ids=["grpc", "http"]
)
def test_sidecar_manifest_validates_with_envoy(manifest: Path) -> None:
    envoy_support.validate(manifest)


@pytest.mark.e2e
def test_validate_rejects_a_broken_bootstrap(tmp_path: Path) -> None:
    config = yaml.safe_load(SIDECAR_MANIFEST.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["path_with_escaped_slashes_action"] = "NO_SUCH_ACTION"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    with pytest.raises(envoy_support.EnvoyError, match="NO_SUCH_ACTION"):
        envoy_support.validate(broken)


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sidecar_manifest_as_shipped_with_the_sidecar_cli(
    protocol: str,
    start_envoy: StartEnvoy,
    start_sidecar_process: StartSidecarProcess,
    write_policy: PolicyWriter,
    issuer: ThreadedTestIssuer,
    upstream: UpstreamApp,
) -> None:
    policy = api_policy(issuer)
    http_port = free_port()  # fixed: the restart below must come back where Envoy points
    extra = ["--http-listen", f"127.0.0.1:{http_port}"] if protocol == "http" else []
    sidecar: SidecarProcess = start_sidecar_process(write_policy(policy), extra_args=extra)
    manifest = SIDECAR_HTTP_MANIFEST if protocol == "http" else SIDECAR_MANIFEST
    config = envoy_config.rewrite_sidecar_bootstrap(
        yaml.safe_load(manifest.read_text()),
        app_port=upstream.port,
        authz_port=http_port if protocol == "http" else sidecar.port,
    )
    envoy = start_envoy(bootstrap_config=config)
    token = issuer.mint({"sub": "alice"}, audience="api")
    bearer = {"authorization": f"Bearer {token}"}

    health = envoy.request("GET", "/healthz", {"x-user": "admin"})
    assert health.status == 200  # through ext_authz, let in by the policy's Allow rule
    assert "x-user" not in health.json()["headers"]
    assert envoy.request("GET", "/api/orders").status == 401
    assert envoy.request("GET", "/api/orders", bearer).json()["headers"]["x-user"] == "alice"

    sidecar.kill()
    assert envoy.request("GET", "/api/orders", bearer).status == 503  # fails closed
    assert envoy.request("GET", "/healthz").status == 503

    sidecar.restart()
    assert envoy.request("GET", "/api/orders", bearer).status == 200
    assert sidecar.stop() == 0, sidecar.log_tail()  # SIGTERM is a clean stop


# --- manifests/samples -------------------------------------------------------------


def test_every_expected_sample_exists() -> None:
    assert {p.name for p in SAMPLES} >= {
        "oidc-discovery.yaml",
        "jwks-uri.yaml",
        "inline-jwks.yaml",
        "health-and-scopes.yaml",
    }


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_policy_parses(sample: Path) -> None:
    from lastguard.sidecar import keys
    from lastguard.sidecar.policy import model
    from lastguard.sidecar.policy.parse import parse_documents

    policies = parse_documents(sample.read_text())
    assert policies
    for policy in policies:
        for iss in policy.issuers:
            if iss.key_source is model.KeySourceKind.INLINE_JWKS:
                assert iss.jwks is not None
                keyset, problems = keys.parse_jwks(json.loads(iss.jwks))
                assert keyset.keys and not problems
