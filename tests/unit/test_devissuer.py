"""The dev issuer: minted tokens verify against the JWKS it serves over real HTTP."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jwt
import pytest

from lastguard.sidecar import devissuer, keys
from tests.support.issuer import TestIssuer, ThreadedTestIssuer

PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def served_jwks(iss: TestIssuer) -> dict[str, Any]:
    status, body = await get(iss.jwks_uri)
    assert status == 200
    document: dict[str, Any] = json.loads(body)
    return document


def verify(token: str, jwks: dict[str, Any], issuer: str, **options: Any) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=[jwt.get_unverified_header(token)["alg"]],
        audience=options.pop("audience", devissuer.DEFAULT_AUDIENCE),
        issuer=issuer,
        **options,
    )
    return claims


@pytest.fixture
async def iss() -> Any:
    async with TestIssuer() as server:
        yield server


@pytest.mark.parametrize(
    ("alg", "kid"),
    [
        pytest.param("RS256", "rsa-1", id="rs256"),
        pytest.param("ES256", "ec-1", id="es256"),
        pytest.param("EdDSA", "ed-1", id="eddsa"),
    ],
)
async def test_minted_tokens_verify_against_served_jwks(
    iss: TestIssuer, alg: str, kid: str
) -> None:
    token = iss.dev.mint({"scope": "read"}, alg=alg)
    assert jwt.get_unverified_header(token) == {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = verify(token, await served_jwks(iss), iss.issuer)
    assert claims["scope"] == "read" and claims["sub"] == devissuer.DEFAULT_SUBJECT
    assert claims["exp"] - claims["iat"] == 300


async def test_served_jwks_has_public_signing_keys_only(iss: TestIssuer) -> None:
    document = await served_jwks(iss)
    assert [k["kid"] for k in document["keys"]] == ["rsa-1", "ec-1", "ed-1"]
    assert all(not PRIVATE_MEMBERS & set(k) for k in document["keys"])
    keyset, problems = keys.parse_jwks(document)
    assert problems == [] and keyset.kids == ("ec-1", "ed-1", "rsa-1")
    assert keyset.candidates("rsa-1", "RS256") and not keyset.candidates("rsa-1", "PS256")


async def test_discovery_document(iss: TestIssuer) -> None:
    status, body = await get(iss.url + "/.well-known/openid-configuration")
    document = json.loads(body)
    assert status == 200
    assert (document["issuer"], document["jwks_uri"]) == (iss.url, iss.url + "/jwks.json")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("", {"sub": "dev-user", "aud": "lastguard-dev"}, id="defaults"),
        pytest.param(
            "?sub=alice&aud=api&scope=read+write",
            {"sub": "alice", "aud": "api", "scope": "read write"},
            id="sub-aud-scope",
        ),
        pytest.param("?alg=ES256", {"sub": "dev-user"}, id="es256"),
        pytest.param("?alg=EdDSA&lifetime=60", {"sub": "dev-user"}, id="eddsa-lifetime"),
    ],
)
async def test_token_endpoint(iss: TestIssuer, query: str, expected: dict[str, Any]) -> None:
    status, token = await get(iss.url + "/token" + query)
    assert status == 200
    claims = verify(
        token, await served_jwks(iss), iss.issuer, audience=expected.get("aud", "lastguard-dev")
    )
    assert expected.items() <= claims.items()


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("?alg=HS256", id="symmetric-alg"),
        pytest.param("?alg=none", id="alg-none"),
        pytest.param("?alg=PS256", id="alg-not-published"),
        pytest.param("?lifetime=0", id="lifetime-zero"),
        pytest.param("?lifetime=abc", id="lifetime-not-a-number"),
        pytest.param("?lifetime=999999", id="lifetime-too-long"),
    ],
)
async def test_token_endpoint_rejects_bad_requests(iss: TestIssuer, query: str) -> None:
    status, _ = await get(iss.url + "/token" + query)
    assert status == 400


def test_mint_claims_headers_and_times() -> None:
    issuer = devissuer.DevIssuer("https://dev.test")
    token = issuer.mint(
        {"sub": "bob", "nbf": None, "groups": ["ops"]},
        lifetime=60,
        now=1_000,
        audience=["a", "b"],
        headers={"kid": None, "x-test": "1"},
    )
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "kid" not in header and header["x-test"] == "1"
    assert "nbf" not in claims
    assert (claims["iss"], claims["sub"], claims["aud"], claims["groups"]) == (
        "https://dev.test",
        "bob",
        ["a", "b"],
        ["ops"],
    )
    assert (claims["iat"], claims["exp"]) == (1_000, 1_060)


def test_mint_with_a_mismatched_kid_for_forgery_tests() -> None:
    issuer = devissuer.DevIssuer("https://dev.test")
    token = issuer.mint(alg="RS384", kid="rsa-1")
    assert jwt.get_unverified_header(token)["alg"] == "RS384"
    with pytest.raises(ValueError):
        issuer.mint(alg="HS256")


async def test_rotate_and_remove_key(iss: TestIssuer) -> None:
    new_kid = iss.rotate("ES256")
    assert new_kid == "ec-2" and iss.dev.signing_kid("ES256") == "ec-2"
    token = iss.mint(alg="ES256")
    assert jwt.get_unverified_header(token)["kid"] == "ec-2"
    document = await served_jwks(iss)
    assert {"ec-1", "ec-2"} <= {k["kid"] for k in document["keys"]}
    verify(token, document, iss.issuer)

    iss.remove_key("ec-2")
    assert iss.dev.signing_kid("ES256") == "ec-1"
    assert "ec-2" not in {k["kid"] for k in (await served_jwks(iss))["keys"]}
    assert iss.rotate("ES256") == "ec-3"  # kids are never reused


def test_public_pem_matches_the_published_key() -> None:
    issuer = devissuer.DevIssuer("https://dev.test")
    published = {k.kid: k.thumbprint for k in keys.parse_jwks(issuer.jwks())[0].keys}
    from_pem = {
        kid: keys.parse_pem_keys([(kid, issuer.public_pem(kid))])[0].keys[0].thumbprint
        for kid in issuer.kids
    }
    assert from_pem == published


async def test_serve_sets_the_url_only_when_unset() -> None:
    explicit = devissuer.DevIssuer("https://public.example")
    running = await devissuer.serve(explicit, "127.0.0.1", 0)
    try:
        assert explicit.issuer_url == "https://public.example"
        assert running.url == f"http://127.0.0.1:{running.port}"
    finally:
        await running.close()


async def test_test_issuer_fault_controls(iss: TestIssuer) -> None:
    iss.extra_keys.append({"kty": "oct", "kid": "junk", "k": "c2VjcmV0"})
    iss.discovery_overrides["issuer"] = "https://evil.test"
    iss.set_cache_control("max-age=7")
    async with aiohttp.ClientSession() as session:
        async with session.get(iss.jwks_uri) as response:
            assert response.headers["Cache-Control"] == "max-age=7"
            assert (await response.json())["keys"][-1]["kid"] == "junk"
        async with session.get(iss.url + "/.well-known/openid-configuration") as response:
            assert (await response.json())["issuer"] == "https://evil.test"
        iss.set_down(True)
        async with session.get(iss.jwks_uri) as response:
            assert response.status == 503
    assert iss.hits["/jwks.json"] == 2


def test_threaded_issuer_serves_pyjwt_client() -> None:
    with ThreadedTestIssuer() as iss:
        token = iss.mint({"sub": "carol"}, alg="ES256")
        client = jwt.PyJWKClient(iss.jwks_uri)
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token, key.key, algorithms=["ES256"], audience="lastguard-dev", issuer=iss.issuer
        )
        assert claims["sub"] == "carol"

        new_kid = iss.rotate("RS256")
        rotated = iss.mint(alg="RS256")
        fresh = jwt.PyJWKClient(iss.jwks_uri)
        assert fresh.get_signing_key_from_jwt(rotated).key_id == new_kid

        iss.set_down(True)
        with pytest.raises(jwt.PyJWKClientError):
            jwt.PyJWKClient(iss.jwks_uri).get_signing_key_from_jwt(token)
        assert iss.hits["/jwks.json"] == 3
