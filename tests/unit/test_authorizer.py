"""The Check pipeline end to end in-process: policy + request in, Decision out.

Keys are inline (no network), the clock is fake, tokens are minted with PyJWT.
Each decision the README documents is pinned here as a named case.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lastguard.sidecar.authenticator import Authenticator
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.compile import compile_policy
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.jwks_cache import KeySource, StaticKeySource
from lastguard.sidecar.policy import model
from lastguard.sidecar.policy.parse import parse_policy
from lastguard.sidecar.token_cache import TokenCache

NOW = 1_800_000_000
ISS = "https://idp.example"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(private: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(alg)
    data: dict[str, Any] = json.loads(algo.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": alg, "use": "sig"}


JWKS = json.dumps(
    {
        "keys": [
            jwk(RSA_KEY, "rsa-1", "RS256"),
            jwk(EC_KEY, "ec-1", "ES256"),
            jwk(ED_KEY, "ed-1", "EdDSA"),
        ]
    }
)
PRIVATE = {"rsa-1": (RSA_KEY, "RS256"), "ec-1": (EC_KEY, "ES256"), "ed-1": (ED_KEY, "EdDSA")}


def mint(
    kid: str = "rsa-1",
    *,
    alg: str | None = None,
    key: Any = None,
    headers: Mapping[str, Any] | None = None,
    **claims: Any,
) -> str:
    private, default_alg = PRIVATE.get(kid, (RSA_KEY, "RS256"))
    body: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": "api", "exp": NOW + 300, "iat": NOW}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(
        body, key or private, algorithm=alg or default_alg, headers={"kid": kid, **(headers or {})}
    )


def unsigned(**claims: Any) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none'})}.{enc({'iss': ISS, 'exp': NOW + 60, **claims})}."


def hs256_with_public_key() -> str:
    """The algorithm-confusion attack: HMAC keyed with the RSA public key's PEM bytes."""
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    header = enc(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = enc(
        json.dumps({"iss": ISS, "aud": "api", "sub": "mallory", "exp": NOW + 60}).encode()
    )
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{enc(mac)}"


POLICY = {
    "apiVersion": "lastguard.dev/v1alpha1",
    "kind": "JWTPolicy",
    "metadata": {"name": "api", "namespace": "shop"},
    "spec": {
        "issuers": [
            {
                "issuer": ISS,
                "jwks": JWKS,
                "audiences": ["api"],
                "fromParams": ["access_token"],
                "fromHeaders": [{"name": "Authorization", "prefix": "Bearer "}],
                "outputClaimToHeaders": [
                    {"header": "x-user", "claim": "sub"},
                    {"header": "x-groups", "claim": "groups"},
                ],
                "maxLifetimeSeconds": 3600,
            }
        ],
        "rules": [
            {"paths": ["/healthz"], "action": "Allow"},
            {"paths": ["/admin/*"], "action": "Deny"},
            {"paths": ["/public/*"], "action": "Optional"},
            {"paths": ["/api/*"], "methods": ["POST"], "requiredScopes": ["write"]},
            {"paths": ["/ops/*"], "requiredClaims": [{"claim": "groups", "values": ["ops"]}]},
        ],
    },
}


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def build(
    policy: Mapping[str, Any] = POLICY, source: KeySource | None = None
) -> tuple[Authorizer, Clock]:
    clock = Clock()
    authorizer = Authorizer(Authenticator(TokenCache(clock=clock), clock=clock))
    parsed = parse_policy(policy)

    def source_for(issuer: model.Issuer) -> KeySource:
        if source is not None:
            return source
        return StaticKeySource.from_jwks(issuer.jwks or "", label=issuer.issuer)

    authorizer.install(compile_policy(parsed, source_for))
    return authorizer, clock


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def decide(headers: Mapping[str, str], path: str = "/api/x", method: str = "GET") -> Decision:
    authorizer, _ = build()
    return await authorizer.check(method, path, headers)


@pytest.mark.parametrize(
    ("headers", "path", "method", "status", "reason"),
    [
        pytest.param({}, "/api/x", "GET", 401, "missing_token", id="no-token"),
        pytest.param(bearer(mint()), "/api/x", "GET", 200, "authenticated", id="valid-rs256"),
        pytest.param(bearer(mint("ec-1")), "/api/x", "GET", 200, "authenticated", id="valid-es256"),
        pytest.param(bearer(mint("ed-1")), "/api/x", "GET", 200, "authenticated", id="valid-eddsa"),
        pytest.param(
            {}, "/x?access_token=" + mint(), "GET", 200, "authenticated", id="valid-in-query"
        ),
        pytest.param(
            bearer(mint(exp=NOW - 61)), "/api/x", "GET", 401, "expired", id="expired-beyond-skew"
        ),
        pytest.param(
            bearer(mint(exp=NOW - 59)),
            "/api/x",
            "GET",
            200,
            "authenticated",
            id="expired-within-skew",
        ),
        pytest.param(
            bearer(mint(nbf=NOW + 61)), "/api/x", "GET", 401, "not_yet_valid", id="nbf-beyond-skew"
        ),
        pytest.param(
            bearer(mint(nbf=NOW + 59)), "/api/x", "GET", 200, "authenticated", id="nbf-within-skew"
        ),
        pytest.param(bearer(mint(exp=None)), "/api/x", "GET", 401, "no_exp", id="no-exp"),
        pytest.param(
            bearer(mint(exp="soon")), "/api/x", "GET", 401, "malformed", id="exp-not-number"
        ),
        pytest.param(
            bearer(mint(iat=NOW - 7200)), "/api/x", "GET", 401, "lifetime", id="lifetime-too-long"
        ),
        pytest.param(
            bearer(mint(iss="https://evil")), "/api/x", "GET", 401, "issuer", id="wrong-issuer"
        ),
        pytest.param(
            bearer(mint(aud="other")), "/api/x", "GET", 401, "audience", id="wrong-audience"
        ),
        pytest.param(
            bearer(mint(aud=["other", "api"])),
            "/api/x",
            "GET",
            200,
            "authenticated",
            id="audience-in-list",
        ),
        pytest.param(bearer(mint(aud=None)), "/api/x", "GET", 401, "audience", id="no-audience"),
        pytest.param(
            bearer(mint(key=OTHER_RSA)), "/api/x", "GET", 401, "signature", id="bad-signature"
        ),
        pytest.param(bearer(mint("rsa-9")), "/api/x", "GET", 401, "unknown_kid", id="unknown-kid"),
        pytest.param(bearer(unsigned()), "/api/x", "GET", 401, "algorithm", id="alg-none"),
        pytest.param(
            bearer(hs256_with_public_key()),
            "/api/x",
            "GET",
            401,
            "algorithm",
            id="hs256-signed-with-rsa-public-key",
        ),
        pytest.param(
            bearer(mint(alg="PS256")),
            "/api/x",
            "GET",
            401,
            "unknown_kid",
            id="alg-not-allowed-by-jwk",
        ),
        pytest.param(
            bearer(mint(headers={"crit": ["urn:x"], "urn:x": 1})),
            "/api/x",
            "GET",
            401,
            "crit",
            id="crit-header",
        ),
        pytest.param(bearer("not-a-jwt"), "/api/x", "GET", 401, "malformed", id="garbage"),
        pytest.param(bearer("a" * 9000), "/api/x", "GET", 401, "token_too_large", id="huge"),
        pytest.param({}, "/healthz", "GET", 200, "rule_allow", id="allow-rule-no-token"),
        pytest.param(
            bearer("garbage"), "/healthz", "GET", 200, "rule_allow", id="allow-rule-ignores-token"
        ),
        pytest.param(bearer(mint()), "/admin/users", "GET", 403, "rule_deny", id="deny-rule"),
        pytest.param({}, "/public/x", "GET", 200, "optional_no_token", id="optional-no-token"),
        pytest.param(bearer(mint()), "/public/x", "GET", 200, "authenticated", id="optional-valid"),
        pytest.param(
            bearer(mint(exp=NOW - 600)),
            "/public/x",
            "GET",
            401,
            "expired",
            id="optional-invalid-rejected",
        ),
        pytest.param(
            bearer(mint(scope="read")),
            "/api/x",
            "POST",
            403,
            "insufficient_scope",
            id="missing-scope",
        ),
        pytest.param(
            bearer(mint(scope="read write")), "/api/x", "POST", 200, "authenticated", id="has-scope"
        ),
        pytest.param(
            bearer(mint(groups=["dev"])), "/ops/x", "GET", 403, "claim", id="claim-mismatch"
        ),
        pytest.param(
            bearer(mint(groups=["dev", "ops"])),
            "/ops/x",
            "GET",
            200,
            "authenticated",
            id="claim-match",
        ),
    ],
)
async def test_decisions(
    headers: dict[str, str], path: str, method: str, status: int, reason: str
) -> None:
    decision = await decide(headers, path, method)
    assert (decision.status, decision.reason) == (status, reason), decision.description


async def test_challenges_follow_rfc6750() -> None:
    missing = await decide({})
    assert missing.challenge("lastguard") == 'Bearer realm="lastguard"'
    invalid = await decide(bearer(mint(exp=NOW - 600)))
    assert invalid.challenge("r") == (
        'Bearer realm="r", error="invalid_token", error_description="the access token expired"'
    )
    scope = await decide(bearer(mint()), method="POST")
    assert scope.challenge("r") == (
        'Bearer realm="r", error="insufficient_scope", '
        'error_description="the access token lacks a required scope", scope="write"'
    )
    assert json.loads(scope.body()) == {
        "error": "insufficient_scope",
        "error_description": "the access token lacks a required scope",
    }


async def test_allowed_request_headers() -> None:
    token = mint(groups=["a", "b"])
    decision = await decide({**bearer(token), "x-user": "admin"})
    assert decision.allowed
    assert dict(decision.headers_to_set) == {"x-user": "alice", "x-groups": "a,b"}
    # The token header goes; headers lastguard sets are overwritten, never also removed
    # (Envoy removes after it sets).
    assert decision.headers_to_remove == ("authorization",)
    assert decision.metadata is not None and decision.metadata["claims"]["sub"] == "alice"


async def test_spoofed_headers_are_stripped_when_no_claim_sets_them() -> None:
    decision = await decide({"x-user": "admin", "x-groups": "root"}, path="/healthz")
    assert decision.allowed and set(decision.headers_to_remove) == {"x-user", "x-groups"}
    token = mint()  # no groups claim: x-groups is not set, so the client's copy must go
    decision = await decide({**bearer(token), "x-groups": "root"})
    assert (
        "x-groups" in decision.headers_to_remove and ("x-user", "alice") in decision.headers_to_set
    )


async def test_query_token_is_removed_from_the_request() -> None:
    decision = await decide({}, path="/x?access_token=" + mint())
    assert decision.query_params_to_remove == ("access_token",)


async def test_forward_original_token_keeps_it() -> None:
    policy = json.loads(json.dumps(POLICY))
    policy["spec"]["issuers"][0]["forwardOriginalToken"] = True
    authorizer, _ = build(policy)
    decision = await authorizer.check("GET", "/api/x", bearer(mint()))
    assert decision.allowed and "authorization" not in decision.headers_to_remove


async def test_cookie_token_is_cut_from_the_cookie_header() -> None:
    policy = json.loads(json.dumps(POLICY))
    policy["spec"]["issuers"][0]["fromCookies"] = ["session"]
    authorizer, _ = build(policy)
    decision = await authorizer.check("GET", "/api/x", {"cookie": f"theme=dark; session={mint()}"})
    assert decision.allowed and ("cookie", "theme=dark") in decision.headers_to_set


async def test_not_ready_and_no_policy() -> None:
    authorizer = Authorizer(Authenticator())
    assert (await authorizer.check("GET", "/", {})).status == 503
    authorizer.install(None)
    denied = await authorizer.check("GET", "/", {})
    assert (denied.status, denied.reason) == (403, "no_policy")
    assert "no JWTPolicy selects this workload" in denied.body()
    authorizer.allow_without_policy = True
    assert (await authorizer.check("GET", "/", {})).allowed


async def test_token_cache_hit_and_expiry() -> None:
    authorizer, clock = build()
    cache = authorizer.authenticator.cache
    token = mint(exp=NOW + 100)
    assert (await authorizer.check("GET", "/api/x", bearer(token))).allowed
    assert len(cache) == 1
    assert (await authorizer.check("GET", "/api/x", bearer(token))).allowed
    clock.now = NOW + 101  # past exp: the entry is gone; skew still admits the token
    assert (await authorizer.check("GET", "/api/x", bearer(token))).allowed
    clock.now = NOW + 161
    assert (await authorizer.check("GET", "/api/x", bearer(token))).reason == "expired"


async def test_cached_token_still_checked_for_scope_and_location() -> None:
    authorizer, _ = build()
    token = mint(scope="read")
    assert (await authorizer.check("GET", "/api/x", bearer(token))).allowed
    assert (await authorizer.check("POST", "/api/x", bearer(token))).status == 403


async def test_cache_is_not_shared_across_policy_reloads() -> None:
    authorizer, _ = build()
    token = mint()
    assert (await authorizer.check("GET", "/api/x", bearer(token))).allowed
    policy = json.loads(json.dumps(POLICY))
    policy["spec"]["issuers"][0]["audiences"] = ["other"]
    authorizer.install(
        compile_policy(
            parse_policy(policy), lambda i: StaticKeySource.from_jwks(i.jwks or "", label=i.issuer)
        )
    )
    assert (await authorizer.check("GET", "/api/x", bearer(token))).reason == "audience"


class _BrokenSource(StaticKeySource):
    async def candidates(self, kid: str | None, alg: str) -> Any:
        raise RuntimeError("boom")


async def test_unexpected_errors_deny_with_500() -> None:
    source = _BrokenSource.from_jwks(JWKS, label=ISS)
    source.__class__ = _BrokenSource
    authorizer, _ = build(source=source)
    decision = await authorizer.check("GET", "/api/x", bearer(mint()))
    assert (decision.allowed, decision.status) == (False, 500)


async def test_denials_never_echo_the_token(caplog: pytest.LogCaptureFixture) -> None:
    token = mint(exp=NOW - 600)
    authorizer, _ = build()
    decision = await authorizer.check("GET", "/api/x?access_token=" + token, bearer(token))
    assert token not in decision.body() and token not in (decision.challenge("r") or "")
    assert all(token not in r.getMessage() and token not in str(r.__dict__) for r in caplog.records)
