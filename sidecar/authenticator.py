"""One token's flow, in a fixed order, cheapest checks first. No network I/O of its own.

1. size, then the verified-token cache (a hit skips everything below);
2. parse (strict, see `tokens`);
3. issuer known to the policy, and the token found where that issuer looks;
4. algorithm allowed for the issuer;
5. time window with clock skew (`exp` required, `nbf` honoured), max lifetime;
6. audience;
7. keys for (`kid`, `alg`) from the issuer's key source (may await a bounded,
   shared fetch when the key is unknown, see `jwks_cache`);
8. signature, with PyJWT's algorithm implementations and keys built once per
   fetch. The key source binds each key to the algorithms its type allows,
   which rules out algorithm confusion (an HS256 token never meets an RSA key).
Each failure raises its own `TokenError` subclass.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from jwt.algorithms import Algorithm, get_default_algorithms

from lastguard.sidecar import claims as claims_mod
from lastguard.sidecar import errors, metrics, tokens
from lastguard.sidecar.compile import CompiledIssuer, CompiledPolicy
from lastguard.sidecar.extract import FoundToken
from lastguard.sidecar.policy.model import SUPPORTED_ALGORITHMS
from lastguard.sidecar.token_cache import TokenCache, VerifiedToken

_CACHE_HIT = metrics.TOKEN_CACHE.labels("hit")
_CACHE_MISS = metrics.TOKEN_CACHE.labels("miss")


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # tokens.parse already rejected non-numbers, NaN and out-of-range dates.
    return float(value)


def check_time(claims: dict[str, Any], issuer: CompiledIssuer, now: float) -> float:
    """Checks exp/nbf (with the issuer's skew) and max lifetime; returns exp."""
    config = issuer.config
    skew = config.clock_skew_seconds
    exp = _number(claims, "exp")
    if exp is None:
        raise errors.MissingExpiry()
    if now > exp + skew:
        raise errors.Expired()
    nbf = _number(claims, "nbf")
    if nbf is not None and now + skew < nbf:
        raise errors.NotYetValid()
    if config.max_lifetime_seconds is not None:
        iat = _number(claims, "iat")
        if iat is None:
            raise errors.LifetimeExceeded("the token has no iat, which a maximum lifetime requires")
        if exp - iat > config.max_lifetime_seconds:
            raise errors.LifetimeExceeded()
    return exp


def check_audience(claims: dict[str, Any], issuer: CompiledIssuer) -> None:
    if not issuer.audiences:
        return
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if any(claims_mod.normalize_audience(a) in issuer.audiences for a in values):
        return
    raise errors.AudienceMismatch()


class Authenticator:
    def __init__(self, cache: TokenCache | None = None, clock: Callable[[], float] = time.time):
        self.cache = cache if cache is not None else TokenCache(clock=clock)
        self.clock = clock
        defaults = get_default_algorithms()
        self._algorithms: dict[str, Algorithm] = {a: defaults[a] for a in SUPPORTED_ALGORITHMS}

    async def authenticate(self, found: FoundToken, policy: CompiledPolicy) -> VerifiedToken:
        token = found.token
        if len(token) > tokens.MAX_TOKEN_BYTES:
            raise errors.TokenTooLarge()
        digest = TokenCache.digest(token)
        entry = self.cache.get(digest)
        if entry is not None:
            issuer = entry.issuer
            if (
                policy.issuers.get(issuer.config.issuer) is issuer
                and found.location in issuer.locations
            ):
                _CACHE_HIT.inc()
                return entry
        _CACHE_MISS.inc()

        parsed = tokens.parse(token)
        claims = parsed.claims
        iss = claims.get("iss")
        issuer_or_none = policy.issuers.get(iss) if isinstance(iss, str) else None
        if issuer_or_none is None:
            raise errors.UnknownIssuer()
        issuer = issuer_or_none
        if found.location not in issuer.locations:
            raise errors.TokenLocationNotAllowed()
        if parsed.alg not in issuer.algorithms:
            raise errors.UnsupportedAlgorithm()
        exp = check_time(claims, issuer, self.clock())
        check_audience(claims, issuer)

        keys = await issuer.keys.candidates(parsed.kid, parsed.alg)
        algorithm = self._algorithms[parsed.alg]
        if not any(self._verify(algorithm, parsed, key.key) for key in keys):
            raise errors.BadSignature()
        return self.cache.put(
            digest, issuer, claims, parsed.payload_segment, issuer.keys.generation, exp
        )

    @staticmethod
    def _verify(algorithm: Algorithm, parsed: tokens.ParsedToken, key: Any) -> bool:
        try:
            return bool(algorithm.verify(parsed.signing_input, key, parsed.signature))
        except Exception:  # a malformed signature must deny, never crash
            return False
