"""A development token issuer (`lastguard dev-issuer`): keys, a JWKS, discovery, minting.

For demos and tests only, never for production: its private keys live in
memory, are generated at start, and `/token` hands a signed token to anyone who
asks for any subject, audience and scope.

`DevIssuer` holds the keys and mints; `build_app` serves it over HTTP
(`/.well-known/openid-configuration`, `/jwks.json`, `/token`); `serve` binds it.
Invariant: `jwks()` and the served JWKS contain public keys only.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt import algorithms as jwt_algorithms

DEFAULT_AUDIENCE = "lastguard-dev"
DEFAULT_SUBJECT = "dev-user"
MAX_TOKEN_LIFETIME = 86_400

#: Key family of each algorithm this issuer signs with, and the first kid of each family.
_FAMILY = {
    "RS256": "rsa",
    "RS384": "rsa",
    "RS512": "rsa",
    "PS256": "rsa",
    "PS384": "rsa",
    "PS512": "rsa",
    "ES256": "ec",
    "EdDSA": "ed",
}
_FAMILY_ALG = {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    alg: str  # the alg published in the JWKS
    private: PrivateKey


class DevIssuer:
    """In-memory signing keys (RSA-2048 "rsa-1", EC P-256 "ec-1", Ed25519 "ed-1") and a minter.

    `issuer_url` may be left unset until the server is bound (`serve` sets it).
    With `publish_alg` (default) each JWK carries its `alg`, binding the RSA key
    to RS256; turn it off to let one RSA key verify RS384/PS256... tokens too.
    """

    def __init__(
        self,
        issuer_url: str | None = None,
        *,
        audience: str = DEFAULT_AUDIENCE,
        publish_alg: bool = True,
    ) -> None:
        self.issuer_url = issuer_url
        self.audience = audience
        self.publish_alg = publish_alg
        self._keys: dict[str, _Key] = {}
        self._signing: dict[str, str] = {}  # family -> kid
        self._serials = {family: itertools.count(2) for family in _FAMILY_ALG}
        for family in _FAMILY_ALG:
            self._add(family, f"{family}-1")

    @property
    def url(self) -> str:
        if self.issuer_url is None:
            raise RuntimeError("the dev issuer's URL is not set yet")
        return self.issuer_url

    @property
    def jwks_uri(self) -> str:
        return self.url.rstrip("/") + "/jwks.json"

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def signing_kid(self, alg: str = "RS256") -> str:
        return self._signing[_family(alg)]

    def jwks(self) -> dict[str, Any]:
        """The published key set: public keys only."""
        return {"keys": [self._public_jwk(key) for key in self._keys.values()]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": sorted(_FAMILY),
        }

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        lifetime: int = 300,
        now: float | None = None,
        headers: Mapping[str, Any] | None = None,
        issuer: str | None = None,
        audience: str | list[str] | None = None,
    ) -> str:
        """A signed token. `claims` extend and override the defaults (iss, sub, aud,
        iat, nbf, exp, jti); a claim given as None is left out. Header values given
        as None (e.g. `{"kid": None}`) are left out too."""
        issued = int(time.time() if now is None else now)
        payload: dict[str, Any] = {
            "iss": issuer if issuer is not None else self.url,
            "sub": DEFAULT_SUBJECT,
            "aud": audience if audience is not None else self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + lifetime,
            "jti": secrets.token_hex(8),
        }
        payload.update(claims or {})
        key = self._keys[kid if kid is not None else self.signing_kid(alg)]
        header: dict[str, Any] = {"kid": key.kid, **(headers or {})}
        return jwt.encode(
            {k: v for k, v in payload.items() if v is not None},
            key.private,
            algorithm=alg,
            headers={k: v for k, v in header.items() if v is not None},
        )

    def rotate(self, alg: str = "RS256") -> str:
        """Adds a new key for alg's family and signs with it from now on; returns its kid.

        The previous key stays published until `remove_key`.
        """
        family = _family(alg)
        kid = f"{family}-{next(self._serials[family])}"
        self._add(family, kid)
        return kid

    def remove_key(self, kid: str) -> None:
        """Stops publishing a key. Its family then signs with its newest remaining key."""
        removed = self._keys.pop(kid)
        family = _family(removed.alg)
        if self._signing.get(family) == kid:
            rest = [k.kid for k in self._keys.values() if _family(k.alg) == family]
            if rest:
                self._signing[family] = rest[-1]
            else:
                del self._signing[family]

    def private_key(self, kid: str) -> PrivateKey:
        return self._keys[kid].private

    def public_pem(self, kid: str) -> str:
        public = self._keys[kid].private.public_key()
        pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem.decode()

    def _add(self, family: str, kid: str) -> None:
        private: PrivateKey
        if family == "rsa":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif family == "ec":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        self._keys[kid] = _Key(kid, _FAMILY_ALG[family], private)
        self._signing[family] = kid

    def _public_jwk(self, key: _Key) -> dict[str, Any]:
        public = key.private.public_key()
        jwk: dict[str, Any]
        if isinstance(public, rsa.RSAPublicKey):
            jwk = jwt_algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = jwt_algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = jwt_algorithms.OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=key.kid, use="sig")
        if self.publish_alg:
            jwk["alg"] = key.alg
        return jwk


def _family(alg: str) -> str:
    try:
        return _FAMILY[alg]
    except KeyError:
        raise ValueError(f"the dev issuer does not sign with {alg!r}") from None


# --- serving ----------------------------------------------------------------

ISSUER_KEY = web.AppKey("dev_issuer", DevIssuer)


def build_app(issuer: DevIssuer, *, middlewares: Iterable[Any] = ()) -> web.Application:
    """The dev issuer's HTTP API. `/token` mints for anyone: a dev tool, never for production.

    GET /token?sub=&aud=&scope=&lifetime=&alg= answers the token as text/plain.
    """
    app = web.Application(middlewares=list(middlewares))
    app[ISSUER_KEY] = issuer
    app.router.add_get("/.well-known/openid-configuration", _discovery)
    app.router.add_get("/jwks.json", _jwks)
    app.router.add_get("/token", _token)
    return app


async def _discovery(request: web.Request) -> web.Response:
    return web.json_response(request.app[ISSUER_KEY].discovery())


async def _jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[ISSUER_KEY].jwks())


async def _token(request: web.Request) -> web.Response:
    issuer = request.app[ISSUER_KEY]
    query = request.query
    alg = query.get("alg", "RS256")
    # With published algs, only those verify: don't hand out tokens that cannot.
    usable = set(_FAMILY_ALG.values()) if issuer.publish_alg else set(_FAMILY)
    if alg not in usable:
        raise web.HTTPBadRequest(text=f"alg must be one of {', '.join(sorted(usable))}\n")
    try:
        lifetime = int(query.get("lifetime", "300"))
    except ValueError:
        lifetime = -1
    if not 1 <= lifetime <= MAX_TOKEN_LIFETIME:
        raise web.HTTPBadRequest(text=f"lifetime must be 1..{MAX_TOKEN_LIFETIME} seconds\n")
    claims: dict[str, Any] = {"sub": query.get("sub", DEFAULT_SUBJECT)}
    if "scope" in query:
        claims["scope"] = query["scope"]
    token = issuer.mint(claims, alg=alg, lifetime=lifetime, audience=query.get("aud"))
    return web.Response(text=token, content_type="text/plain")


@dataclass(slots=True)
class RunningIssuer:
    """A bound dev issuer server: its base URL and how to stop it."""

    url: str
    port: int
    runner: web.AppRunner
    site: web.TCPSite

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(
    issuer: DevIssuer, host: str, port: int, *, middlewares: Iterable[Any] = ()
) -> RunningIssuer:
    """Serves `issuer` on host:port (0: any free port). Sets `issuer.issuer_url` if unset."""
    runner = web.AppRunner(
        build_app(issuer, middlewares=middlewares), access_log=None, shutdown_timeout=5.0
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url = f"http://{_host_for_url(host)}:{bound_port}"
    if issuer.issuer_url is None:
        issuer.issuer_url = url
    return RunningIssuer(url, bound_port, runner, site)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
