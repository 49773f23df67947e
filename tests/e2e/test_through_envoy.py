"""lastguard behind the real Envoy: decisions, keys over time, reloads, hostile input.

Real parts: Envoy 1.40, the sidecar on real gRPC, a real HTTP JWKS server with
keys the test generates, and an echo app that reports what it received. Key
refresh runs on a fake monotonic clock the test advances (the sidecar's
background loop still polls in real time), so nothing waits for a 10-minute TTL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import envoy_config
from tests.support.clock import FakeClock
from tests.support.envoy import EnvoyProcess, HttpResponse, StartEnvoy
from tests.support.issuer import ThreadedTestIssuer
from tests.support.sidecar import PolicyWriter, SidecarThread, StartSidecar
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e


def policy(issuer: ThreadedTestIssuer, **issuer_fields: Any) -> dict[str, Any]:
    spec_issuer = {
        "issuer": issuer.issuer,
        "jwksUri": issuer.jwks_uri,
        "audiences": ["api"],
        # Any explicit location replaces the default, as in Istio: list the header too.
        "fromHeaders": [{"name": "Authorization", "prefix": "Bearer "}],
        "fromParams": ["access_token"],
        "outputClaimToHeaders": [
            {"header": "x-user", "claim": "sub"},
            {"header": "x-groups", "claim": "groups"},
        ],
        **issuer_fields,
    }
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {
            "issuers": [spec_issuer],
            "rules": [
                {"paths": ["/healthz"], "action": "Allow"},
                {"paths": ["/admin/*"], "action": "Deny"},
                {"paths": ["/public/*"], "action": "Optional"},
                {"paths": ["/api/*"], "methods": ["POST"], "requiredScopes": ["write"]},
            ],
        },
    }


@dataclass
class Stack:
    protocol: str
    issuer: ThreadedTestIssuer
    sidecar: SidecarThread
    envoy: EnvoyProcess
    upstream: UpstreamApp
    clock: FakeClock
    write: PolicyWriter

    def get(self, path: str, token: str | None = None, **headers: str) -> HttpResponse:
        return self.request("GET", path, token, **headers)

    def request(
        self, method: str, path: str, token: str | None = None, **headers: str
    ) -> HttpResponse:
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if token is not None:
            sent["authorization"] = f"Bearer {token}"
        return self.envoy.request(method, path, sent)

    def mint(self, **claims: Any) -> str:
        kid = claims.pop("kid", None)
        lifetime = claims.pop("lifetime", 300)
        return self.issuer.mint(
            {"sub": "alice", **claims}, audience="api", kid=kid, lifetime=lifetime
        )


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls a condition that depends on the sidecar's background loop (real time, bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture(params=["grpc", "http"])
def stack(
    request: pytest.FixtureRequest,
    start_envoy: StartEnvoy,
    start_sidecar: StartSidecar,
    write_policy: PolicyWriter,
    upstream: UpstreamApp,
) -> Iterator[Stack]:
    """The whole stack, with Envoy calling lastguard over gRPC or over HTTP (the same
    decisions are expected from both, but where the HTTP protocol cannot express one)."""
    protocol: str = request.param
    with ThreadedTestIssuer() as issuer:
        clock = FakeClock()
        extra = {"http_listen": "127.0.0.1:0"} if protocol == "http" else {}
        sidecar = start_sidecar(write_policy(policy(issuer)), key_clock=clock, **extra)
        authz_port = sidecar.http_port if protocol == "http" else sidecar.port
        envoy = start_envoy(
            [
                envoy_config.ext_authz_listener(
                    authz_port=authz_port, upstream_port=upstream.port, protocol=protocol
                )
            ]
        )
        yield Stack(protocol, issuer, sidecar, envoy, upstream, clock, write_policy)


# --- every documented decision, through Envoy ------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(stack: Stack) -> None:
    response = stack.get("/api/orders")
    assert response.status == 401
    assert response.headers["www-authenticate"] == 'Bearer realm="lastguard"'
    assert response.json() == {
        "error": "unauthorized",
        "error_description": "an access token is required",
    }
    assert stack.upstream.requests == []


@pytest.mark.parametrize(
    ("claims", "description"),
    [
        pytest.param({"lifetime": -3600}, "the access token expired", id="expired"),
        pytest.param(
            {"audience_override": "other"},
            "the access token is not meant for this audience",
            id="wrong-audience",
        ),
        pytest.param(
            {"iss": "https://evil.example"}, "the token's issuer is not trusted", id="wrong-issuer"
        ),
        pytest.param({"nbf_ahead": 3600}, "the access token is not valid yet", id="not-yet-valid"),
    ],
)
def test_invalid_tokens_are_401_invalid_token(
    stack: Stack, claims: dict[str, Any], description: str
) -> None:
    claims = dict(claims)
    if "audience_override" in claims:
        token = stack.issuer.mint({"sub": "a"}, audience=claims.pop("audience_override"))
    elif "nbf_ahead" in claims:
        token = stack.mint(nbf=int(time.time()) + claims.pop("nbf_ahead"))
    else:
        token = stack.mint(**claims)
    response = stack.get("/api/orders", token)
    assert response.status == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="lastguard", error="invalid_token", error_description="{description}"'
    )
    assert response.json()["error"] == "invalid_token"
    assert token not in response.text


def test_missing_scope_is_403_insufficient_scope(stack: Stack) -> None:
    response = stack.request("POST", "/api/orders", stack.mint(scope="read"))
    assert response.status == 403
    assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
    assert 'scope="write"' in response.headers["www-authenticate"]
    assert stack.request("POST", "/api/orders", stack.mint(scope="read write")).status == 200


def test_allowed_request_what_the_app_sees(stack: Stack) -> None:
    token = stack.mint(groups=["a", "b"])
    response = stack.get("/api/orders", token, x_user="admin", x_groups="root")
    assert response.status == 200
    seen = response.json()["headers"]
    assert seen["x-user"] == "alice" and seen["x-groups"] == "a,b"
    assert "authorization" not in seen


def test_token_in_query_is_removed_before_the_app(stack: Stack) -> None:
    token = stack.mint()
    response = stack.get(f"/api/orders?page=2&access_token={token}")
    if stack.protocol == "http":
        # Envoy's HTTP protocol cannot remove a query parameter: closed, not leaked.
        assert response.status == 403
        assert response.json()["error_description"].startswith("this policy needs the gRPC")
        return
    assert response.status == 200
    seen_path = response.json()["path"]
    assert "access_token" not in seen_path and "page=2" in seen_path


def test_allow_deny_and_optional_rules(stack: Stack) -> None:
    assert stack.get("/healthz", x_user="admin").status == 200
    assert "x-user" not in stack.upstream.requests[-1].headers
    assert stack.get("/admin/users", stack.mint()).status == 403
    assert stack.get("/public/page").status == 200
    assert stack.get("/public/page", stack.mint(lifetime=-3600)).status == 401
    assert stack.get("/healthz/../admin/users").status == 403


def test_no_policy_selects_the_workload_is_403(
    start_envoy: StartEnvoy,
    start_sidecar: StartSidecar,
    write_policy: PolicyWriter,
    upstream: UpstreamApp,
) -> None:
    with ThreadedTestIssuer() as issuer:
        doc = policy(issuer)
        doc["spec"]["selector"] = {"matchLabels": {"app": "billing"}}
        sidecar = start_sidecar(write_policy(doc), workload=_workload("default", {"app": "orders"}))
        envoy = start_envoy(
            [envoy_config.ext_authz_listener(authz_port=sidecar.port, upstream_port=upstream.port)]
        )
        response = envoy.request("GET", "/healthz")
        assert response.status == 403
        assert response.json() == {
            "error": "access_denied",
            "error_description": "no JWTPolicy selects this workload",
        }


def _workload(namespace: str, labels: dict[str, str]) -> Any:
    from lastguard.sidecar.policy.select import Workload

    return Workload.of(namespace, labels)


# --- keys over time ------------------------------------------------------------------


def test_rotation_new_kid_is_picked_up_and_removed_key_stops_working(stack: Stack) -> None:
    old = stack.mint()
    assert stack.get("/api/x", old).status == 200

    stack.clock.advance(31)  # the startup fetch is older than the unknown-kid refetch interval
    new_kid = stack.issuer.rotate()
    fresh = stack.mint(kid=new_kid)
    assert stack.get("/api/x", fresh).status == 200  # unknown kid -> one refetch -> accepted

    stack.issuer.remove_key("rsa-1")
    assert stack.get("/api/x", old).status == 200  # keys not refreshed yet: still trusted
    stack.clock.advance(601)  # the cache TTL passes; the background loop refreshes
    eventually(lambda: stack.get("/api/x", old).status == 401)
    response = stack.get("/api/x", old)
    assert "unknown key" in response.headers["www-authenticate"]
    assert stack.get("/api/x", fresh).status == 200


def test_unknown_kid_refetch_is_rate_limited(stack: Stack) -> None:
    assert stack.get("/api/x", stack.mint()).status == 200
    stack.clock.advance(31)
    before = stack.issuer.hits["/jwks.json"]
    for i in range(5):
        token = stack.issuer.mint({"sub": "x"}, audience="api", headers={"kid": f"nope-{i}"})
        assert stack.get("/api/x", token).status == 401
    assert stack.issuer.hits["/jwks.json"] - before == 1


def test_jwks_down_at_start_is_503_then_recovers(
    start_envoy: StartEnvoy,
    start_sidecar: StartSidecar,
    write_policy: PolicyWriter,
    upstream: UpstreamApp,
) -> None:
    with ThreadedTestIssuer() as issuer:
        issuer.stop_listening()
        clock = FakeClock()
        sidecar = start_sidecar(write_policy(policy(issuer)), key_clock=clock)
        envoy = start_envoy(
            [envoy_config.ext_authz_listener(authz_port=sidecar.port, upstream_port=upstream.port)]
        )
        token = issuer.mint({"sub": "alice"}, audience="api")
        response = envoy.request("GET", "/api/x", {"authorization": f"Bearer {token}"})
        assert response.status == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"] == "temporarily_unavailable"
        assert envoy.request("GET", "/healthz").status == 200  # Allow paths need no keys

        issuer.resume_listening()
        clock.advance(61)  # past the longest failure backoff

        def recovered() -> bool:
            return (
                envoy.request("GET", "/api/x", {"authorization": f"Bearer {token}"}).status == 200
            )

        eventually(recovered)


def test_jwks_down_later_keeps_the_last_good_keys(stack: Stack) -> None:
    token = stack.mint()
    assert stack.get("/api/x", token).status == 200
    stack.issuer.set_down(True)
    before = stack.issuer.hits["/jwks.json"]
    stack.clock.advance(601)
    eventually(lambda: stack.issuer.hits["/jwks.json"] > before)  # a refresh was tried and failed
    fresh = stack.mint()  # a token never seen (not cached), signed by a known key
    assert stack.get("/api/x", fresh).status == 200


# --- policy changes and hostile input ------------------------------------------------------


def test_policy_file_hot_reload(stack: Stack) -> None:
    billing = stack.issuer.mint({"sub": "bob"}, audience="billing")
    assert stack.get("/api/x", billing).status == 401
    stack.write(policy(stack.issuer, audiences=["billing"]))
    eventually(lambda: stack.get("/api/x", billing).status == 200)
    stack.write("apiVersion: lastguard.dev/v1alpha1\nkind: JWTPolicy\nspec: {broken")
    time.sleep(0.6)  # three reload intervals: the broken file is read and refused
    assert stack.get("/api/x", billing).status == 200


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Bearer " + "A" * 20_000, id="huge-token"),
        pytest.param("Bearer a.b.c", id="three-garbage-segments"),
        pytest.param("Bearer e30.e30.e30", id="empty-json-objects"),
        pytest.param("Bearer ....", id="dots"),
        pytest.param("Bearer %00%01", id="percent-junk"),
        pytest.param("Bearer eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.", id="alg-none"),
        pytest.param("Bearer " + "eyJ" * 3000, id="long-base64"),
        pytest.param("Bearer\ttab", id="tab-separated"),
        pytest.param("Bearer a,Bearer b", id="two-tokens-joined"),
    ],
)
def test_hostile_authorization_headers_are_401_and_the_sidecar_survives(
    stack: Stack, value: str
) -> None:
    response = stack.envoy.request("GET", "/api/x", {"authorization": value})
    assert response.status in (401, 431), response.status
    assert stack.upstream.requests == []
    assert stack.get("/api/x", stack.mint()).status == 200  # still serving


def test_duplicate_authorization_headers_are_rejected(stack: Stack) -> None:
    token = stack.mint()
    response = stack.envoy.request(
        "GET",
        "/api/x",
        [("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")],
    )
    assert response.status == 401  # Envoy joins them with ",": never a valid compact JWS


def test_logs_never_contain_tokens(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    expired = stack.mint(lifetime=-3600)
    stack.get(f"/api/x?access_token={expired}")
    stack.get("/api/x", expired)
    text = "\n".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    assert expired not in text
    assert expired.split(".")[1] not in text
