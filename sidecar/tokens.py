"""Strict parsing of compact JWS tokens (header.payload.signature). Pure.

Parsing is separated from verification so the cheap checks (issuer, algorithm,
time window, audience) run on the decoded claims before any key lookup or
signature work. Nothing here trusts the token: the result is "unverified" until
`lastguard.sidecar.authenticator` has checked the signature.

Strictness, on purpose: exactly three base64url segments without padding, JSON
objects without duplicate member names (a duplicate could be read one way here
and another way by the app), ASCII only, `alg` a string, `kid` a string if
present, and any `crit` header rejected because lastguard implements no JWS
extensions (RFC 7515 4.1.11), and registered claims of the wrong type
(`exp: NaN`, a numeric `sub`, an `aud` list holding a number). Header
parameters that name keys (`jku`, `x5u`, `jwk`, `x5c`) are ignored: keys come
only from the policy.
"""

from __future__ import annotations

import binascii
import json
import re
from base64 import urlsafe_b64decode
from dataclasses import dataclass
from typing import Any

from lastguard.sidecar.errors import (
    CriticalHeader,
    MalformedToken,
    TokenTooLarge,
    UnsupportedAlgorithm,
)

#: Larger tokens are rejected before any decoding (header limits make bigger ones suspect).
MAX_TOKEN_BYTES = 8192

_COMPACT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A decoded but unverified token."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes
    payload_segment: str
    alg: str
    kid: str | None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C; a shorter dict means a repeated member name
    if len(out) != len(pairs):
        raise MalformedToken("the token repeats a member name")
    return out


def _b64decode(segment: str) -> bytes:
    if len(segment) % 4 == 1:
        raise MalformedToken("the token has a base64url segment of impossible length")
    try:
        return urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise MalformedToken("the token is not valid base64url") from exc


def _no_constants(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which are not JSON; `exp: NaN` would never expire.
    raise MalformedToken(f"the token contains {name}, which is not valid JSON")


def _json_object(segment: str, what: str) -> dict[str, Any]:
    raw = _b64decode(segment)
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except MalformedToken:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedToken(f"the token's {what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise MalformedToken(f"the token's {what} is not a JSON object")
    return value


#: Numeric dates beyond this are not plausible (and lose precision as floats).
MAX_NUMERIC_DATE = 2**53


def _check_registered_claims(claims: dict[str, Any]) -> None:
    """RFC 7519 4.1 types: string claims are strings, dates are finite numbers, aud a
    string or a list of strings. Whatever the app reads must be what was checked."""
    for name in ("iss", "sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise MalformedToken(f"the token's {name} claim is not a string")
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is None and name not in claims:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MalformedToken(f"the token's {name} claim is not a number")
        if not 0 <= value <= MAX_NUMERIC_DATE:  # NaN fails every comparison
            raise MalformedToken(f"the token's {name} claim is out of range")
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise MalformedToken("the token's aud claim is not a string or a list of strings")


def parse(token: str) -> ParsedToken:
    """Decodes a compact JWS. Raises a TokenError subclass; never anything else."""
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenTooLarge(f"the access token is larger than {MAX_TOKEN_BYTES} bytes")
    if not _COMPACT.fullmatch(token):
        raise MalformedToken("the access token is not a compact JWS (header.payload.signature)")
    header_segment, payload_segment, signature_segment = token.split(".")
    header = _json_object(header_segment, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise MalformedToken("the token's header has no alg")
    if alg.lower() == "none":
        raise UnsupportedAlgorithm("unsigned tokens (alg none) are not accepted")
    if "crit" in header:
        raise CriticalHeader()
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise MalformedToken("the token's kid is not a string")
    claims = _json_object(payload_segment, "payload")
    _check_registered_claims(claims)
    signature = _b64decode(signature_segment)
    if not signature:
        raise MalformedToken("the token has no signature")
    return ParsedToken(
        header=header,
        claims=claims,
        signing_input=f"{header_segment}.{payload_segment}".encode("ascii"),
        signature=signature,
        payload_segment=payload_segment,
        alg=alg,
        kid=kid,
    )
