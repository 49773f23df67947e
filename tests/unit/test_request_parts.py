"""Pure request-side pieces: token parsing, extraction, path matching, selection, claims."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from lastguard.sidecar import claims, errors, extract, match, tokens
from lastguard.sidecar.policy import model, select


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


RS256_HEADER = b64(b'{"alg":"RS256"}')


def raw(header: bytes, payload: bytes) -> str:
    return f"{b64(header)}.{b64(payload)}.c2ln"


def compact(header: Any, payload: Any, signature: bytes = b"sig") -> str:
    enc = lambda v: b64(v if isinstance(v, bytes) else json.dumps(v).encode())  # noqa: E731
    return f"{enc(header)}.{enc(payload)}.{b64(signature)}"


# --- tokens -----------------------------------------------------------------


def test_parse_valid_token() -> None:
    parsed = tokens.parse(compact({"alg": "RS256", "kid": "k1"}, {"iss": "i", "exp": 1}))
    assert parsed.alg == "RS256" and parsed.kid == "k1"
    assert parsed.claims == {"iss": "i", "exp": 1}
    assert parsed.signature == b"sig"
    assert parsed.signing_input.count(b".") == 1


@pytest.mark.parametrize(
    ("token", "error"),
    [
        pytest.param("", errors.MalformedToken, id="empty"),
        pytest.param("abc", errors.MalformedToken, id="one-segment"),
        pytest.param("a.b", errors.MalformedToken, id="two-segments"),
        pytest.param("a.b.c.d", errors.MalformedToken, id="four-segments-jwe-like"),
        pytest.param("a b.c.d", errors.MalformedToken, id="space"),
        pytest.param("eyJ=.e30.c2ln", errors.MalformedToken, id="padding"),
        pytest.param("x" * 9000, errors.TokenTooLarge, id="huge"),
        pytest.param("é.e30.c2ln", errors.MalformedToken, id="non-ascii"),
        pytest.param(f"{b64(b'not json')}.e30.c2ln", errors.MalformedToken, id="header-not-json"),
        pytest.param(f"{b64(b'[1]')}.e30.c2ln", errors.MalformedToken, id="header-not-object"),
        pytest.param(
            f"{b64(bytes([0xFF, 0xFE]))}.e30.c2ln", errors.MalformedToken, id="header-not-utf8"
        ),
        pytest.param(
            compact({"alg": "RS256"}, [1]), errors.MalformedToken, id="payload-not-object"
        ),
        pytest.param(compact({"kid": "x"}, {}), errors.MalformedToken, id="no-alg"),
        pytest.param(compact({"alg": 5}, {}), errors.MalformedToken, id="alg-not-string"),
        pytest.param(compact({"alg": "none"}, {}), errors.UnsupportedAlgorithm, id="alg-none"),
        pytest.param(
            compact({"alg": "NoNe"}, {}), errors.UnsupportedAlgorithm, id="alg-none-mixed-case"
        ),
        pytest.param(
            compact({"alg": "RS256", "kid": 1}, {}), errors.MalformedToken, id="kid-not-string"
        ),
        pytest.param(
            compact({"alg": "RS256", "crit": ["exp"], "exp": 1}, {}),
            errors.CriticalHeader,
            id="crit",
        ),
        pytest.param(compact({"alg": "RS256"}, {}, b""), errors.MalformedToken, id="no-signature"),
        pytest.param(
            raw(b'{"alg":"RS256","alg":"none"}', b"{}"),
            errors.MalformedToken,
            id="duplicate-header-member",
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"sub":"a","sub":"admin"}'),
            errors.MalformedToken,
            id="duplicate-claim",
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b"[" * 100000),
            errors.TokenTooLarge,
            id="deep-nesting-is-too-large",
        ),
        pytest.param("eyJhbGciOiJSUzI1NiJ9.e.c2ln", errors.MalformedToken, id="impossible-length"),
        pytest.param(raw(b'{"alg":"RS256"}', b'{"exp":NaN}'), errors.MalformedToken, id="exp-nan"),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"exp":Infinity}'), errors.MalformedToken, id="exp-infinity"
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"nbf":-1}'), errors.MalformedToken, id="nbf-negative"
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"exp":18446744073709551616}'),
            errors.MalformedToken,
            id="exp-beyond-range",
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"exp":true}'), errors.MalformedToken, id="exp-bool"
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"sub":42}'), errors.MalformedToken, id="sub-number"
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"iss":["a"]}'), errors.MalformedToken, id="iss-list"
        ),
        pytest.param(
            raw(b'{"alg":"RS256"}', b'{"aud":["a",5]}'), errors.MalformedToken, id="aud-list-number"
        ),
    ],
)
def test_malformed_tokens(token: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        tokens.parse(token)


def test_deep_json_nesting_is_malformed_not_a_crash() -> None:
    token = raw(b'{"alg":"RS256"}', b"[" * 3000 + b"]" * 3000)
    with pytest.raises((errors.MalformedToken, errors.TokenTooLarge)):
        tokens.parse(token)


# --- extraction ---------------------------------------------------------------

ISSUER = model.Issuer(
    issuer="https://i",
    from_headers=(
        model.HeaderLocation("authorization", "Bearer "),
        model.HeaderLocation("x-token"),
    ),
    from_params=("access_token",),
    from_cookies=("session",),
)
LOCATIONS = extract.policy_locations([ISSUER])


@pytest.mark.parametrize(
    ("headers", "path", "expected"),
    [
        pytest.param({}, "/", None, id="nothing"),
        pytest.param(
            {"authorization": "Bearer abc"}, "/", ("abc", "header authorization"), id="bearer"
        ),
        pytest.param(
            {"authorization": "bearer abc"},
            "/",
            ("abc", "header authorization"),
            id="scheme-case-insensitive",
        ),
        pytest.param({"authorization": "Basic dXNlcg=="}, "/", None, id="basic-is-no-token"),
        pytest.param({"x-token": "abc"}, "/", ("abc", "header x-token"), id="plain-header"),
        pytest.param({}, "/x?a=1&access_token=abc", ("abc", "param access_token"), id="query"),
        pytest.param({"cookie": "a=b; session=abc"}, "/", ("abc", "cookie session"), id="cookie"),
        pytest.param(
            {"authorization": "Bearer first", "x-token": "second"},
            "/?access_token=third",
            ("first", "header authorization"),
            id="headers-first",
        ),
    ],
)
def test_find_token(headers: dict[str, str], path: str, expected: tuple[str, str] | None) -> None:
    found = extract.find_token(LOCATIONS, headers, path)
    assert (None if found is None else (found.token, str(found.location))) == expected


@pytest.mark.parametrize(
    ("headers", "path"),
    [
        pytest.param({"authorization": "Bearer "}, "/", id="empty-bearer"),
        pytest.param({}, "/?access_token=", id="empty-param"),
        pytest.param({"cookie": "session="}, "/", id="empty-cookie"),
    ],
)
def test_empty_token_is_malformed(headers: dict[str, str], path: str) -> None:
    with pytest.raises(errors.MalformedToken):
        extract.find_token(LOCATIONS, headers, path)


def test_cookie_removal_keeps_other_cookies() -> None:
    assert extract.cookie_header_without("a=1; session=t; b=2", "session") == "a=1; b=2"
    assert extract.cookie_header_without("session=t", "session") == ""


# --- paths and rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        pytest.param("/a/b", "/a/b", id="plain"),
        pytest.param("/a/b?x=1#f", "/a/b", id="query-fragment"),
        pytest.param("//admin", "/admin", id="double-slash"),
        pytest.param("/healthz/../admin", "/admin", id="dot-dot"),
        pytest.param("/./admin/.", "/admin/", id="dot"),
        pytest.param("/%61dmin", "/admin", id="percent-unreserved"),
        pytest.param("/public/..%2Fadmin", "/admin", id="encoded-slash"),
        pytest.param("/public/%2e%2e/admin", "/admin", id="encoded-dots"),
        pytest.param("/public/%252e%252e/admin", "/admin", id="double-encoded-dots"),
        pytest.param("/public\\..\\admin", "/admin", id="backslashes"),
        pytest.param("/../../etc", "/etc", id="above-root"),
        pytest.param("", "/", id="empty"),
        pytest.param("/.well-known/x", "/.well-known/x", id="dot-file"),
    ],
)
def test_normalize_path(raw: str, normalized: str) -> None:
    assert match.normalize_path(raw) == normalized


RULES = match.compile_rules(
    [
        model.Rule(paths=("/healthz",), action=model.Action.ALLOW),
        model.Rule(paths=("/public/*",), methods=("GET",), action=model.Action.ALLOW),
        model.Rule(paths=("/admin/*",), action=model.Action.DENY),
        model.Rule(paths=("/me",), action=model.Action.OPTIONAL),
    ],
    model.Action.AUTHENTICATE,
)


@pytest.mark.parametrize(
    ("method", "path", "action"),
    [
        pytest.param("GET", "/healthz", model.Action.ALLOW, id="exact"),
        pytest.param("GET", "/healthz?probe=1", model.Action.ALLOW, id="exact-with-query"),
        pytest.param("GET", "/healthz/x", model.Action.AUTHENTICATE, id="exact-is-not-prefix"),
        pytest.param("GET", "/public/a/b", model.Action.ALLOW, id="prefix"),
        pytest.param("POST", "/public/a", model.Action.AUTHENTICATE, id="method-mismatch"),
        pytest.param("GET", "/admin/users", model.Action.DENY, id="deny"),
        pytest.param("GET", "/healthz/../admin/x", model.Action.DENY, id="dot-dot-escape"),
        pytest.param("GET", "/public/..%2Fadmin/x", model.Action.DENY, id="encoded-escape"),
        pytest.param("GET", "//admin/x", model.Action.DENY, id="double-slash-escape"),
        pytest.param("GET", "/me", model.Action.OPTIONAL, id="optional"),
        pytest.param("GET", "/other", model.Action.AUTHENTICATE, id="default"),
    ],
)
def test_first_matching_rule(method: str, path: str, action: model.Action) -> None:
    assert RULES.find(method, path).action is action


# --- selection --------------------------------------------------------------------


def pol(
    name: str, ns: str = "shop", labels: dict[str, str] | None = None, ts: str | None = None
) -> model.JWTPolicy:
    return model.JWTPolicy(
        namespace=ns,
        name=name,
        match_labels=tuple(sorted(labels.items())) if labels else None,
        creation_timestamp=ts,
    )


@pytest.mark.parametrize(
    ("policies", "labels", "winner", "conflicts"),
    [
        pytest.param([pol("a", ns="other")], {"app": "web"}, None, [], id="other-namespace"),
        pytest.param([pol("wide")], {"app": "web"}, "wide", [], id="namespace-wide"),
        pytest.param(
            [pol("wide"), pol("web", labels={"app": "web"})],
            {"app": "web"},
            "web",
            [],
            id="specific-beats-wide",
        ),
        pytest.param(
            [pol("api", labels={"app": "api"})], {"app": "web"}, None, [], id="selector-mismatch"
        ),
        pytest.param(
            [
                pol("new", labels={"app": "web"}, ts="2026-02-01T00:00:00Z"),
                pol("old", labels={"app": "web"}, ts="2026-01-01T00:00:00Z"),
            ],
            {"app": "web", "tier": "x"},
            "old",
            ["new"],
            id="oldest-wins-conflict",
        ),
        pytest.param([pol("b"), pol("a")], {}, "a", ["b"], id="name-breaks-ties"),
    ],
)
def test_select(
    policies: list[model.JWTPolicy],
    labels: dict[str, str],
    winner: str | None,
    conflicts: list[str],
) -> None:
    result = select.select(policies, select.Workload.of("shop", labels))
    assert (result.policy.name if result.policy else None) == winner
    assert [p.name for p in result.conflicts] == conflicts


# --- claims -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "header"),
    [
        pytest.param("alice", "alice", id="string"),
        pytest.param(42, "42", id="int"),
        pytest.param(True, "true", id="bool"),
        pytest.param(["a", "b"], "a,b", id="array"),
        pytest.param({"b": 1, "a": 2}, '{"a":2,"b":1}', id="object-as-json"),
        pytest.param("evil\r\nx-admin: 1", None, id="crlf-injection"),
        pytest.param("x" * 5000, None, id="too-long"),
        pytest.param([{"a": 1}], None, id="array-of-objects"),
        pytest.param(None, None, id="null"),
    ],
)
def test_header_value(value: Any, header: str | None) -> None:
    assert claims.header_value(value) == header


def test_claim_paths() -> None:
    c = {"sub": "a", "realm_access": {"roles": ["x"]}, "https://ns/role": "r"}
    assert claims.claim_at(c, "realm_access.roles") == ["x"]
    assert claims.claim_at(c, "https://ns/role") == "r"
    assert claims.header_value(claims.claim_at(c, "missing.path")) is None


@pytest.mark.parametrize(
    ("token_claims", "required", "ok"),
    [
        pytest.param({"scope": "read write"}, ("read",), True, id="scope-string"),
        pytest.param({"scp": ["read", "write"]}, ("read", "write"), True, id="scp-list"),
        pytest.param({"scope": "read"}, ("read", "write"), False, id="missing-one"),
        pytest.param({}, ("read",), False, id="no-scope-claim"),
        pytest.param({"scope": "readwrite"}, ("read",), False, id="no-substring-match"),
    ],
)
def test_required_scopes(token_claims: dict[str, Any], required: tuple[str, ...], ok: bool) -> None:
    if ok:
        claims.require_scopes(claims.granted_scopes(token_claims), required)
    else:
        with pytest.raises(errors.InsufficientScope):
            claims.require_scopes(claims.granted_scopes(token_claims), required)


@pytest.mark.parametrize(
    ("token_claims", "ok"),
    [
        pytest.param({"groups": ["dev", "admins"]}, True, id="list-contains"),
        pytest.param({"groups": "admins"}, True, id="equals"),
        pytest.param({"groups": ["dev"]}, False, id="list-lacks"),
        pytest.param({}, False, id="missing"),
    ],
)
def test_required_claims(token_claims: dict[str, Any], ok: bool) -> None:
    required = [model.RequiredClaim("groups", ("admins", "ops"))]
    if ok:
        claims.require_claims(token_claims, required)
    else:
        with pytest.raises(errors.ClaimMismatch):
            claims.require_claims(token_claims, required)
