"""Reading verified claims: audiences, nested paths, scopes, required claims, headers. Pure."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from typing import Any

from lastguard.sidecar import errors
from lastguard.sidecar.policy.model import RequiredClaim

_MISSING = object()

#: Longest header value lastguard will emit for a claim; longer ones are left out.
MAX_HEADER_VALUE = 4096


def normalize_audience(aud: str) -> str:
    """Envoy jwt_authn's rule: `https://api/`, `http://api` and `api` are one audience."""
    for scheme in ("https://", "http://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme) :]
            break
    return aud.rstrip("/")


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The claim named `path`; a name not present as-is is read as a dotted path into objects."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def header_value(value: Any) -> str | None:
    """A claim as a header value: scalars as text, arrays joined by ',', objects as JSON.

    None when the claim is missing or the value could smuggle a header (control
    characters) or is too long.
    """
    if value is _MISSING or value is None:
        return None
    text: str | None
    if isinstance(value, list):
        items = [_scalar(v) for v in value]
        text = (
            None if any(i is None for i in items) else ",".join(i for i in items if i is not None)
        )
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = _scalar(value)
    if text is None or len(text) > MAX_HEADER_VALUE:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None
    return text


def granted_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from `scope` or `scp`, each either a space-separated string or a list."""
    out: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            out.update(value.split())
        elif isinstance(value, list):
            out.update(v for v in value if isinstance(v, str))
    return frozenset(out)


def require_scopes(granted: Collection[str], required: tuple[str, ...]) -> None:
    """`granted` is `granted_scopes(claims)` (computed once per verified token)."""
    for scope in required:
        if scope not in granted:
            raise errors.InsufficientScope(required)


def require_claims(claims: dict[str, Any], required: Iterable[RequiredClaim]) -> None:
    """Each claim must equal, or as an array contain, one of its allowed values."""
    for rc in required:
        value = claim_at(claims, rc.claim)
        values = value if isinstance(value, list) else [value]
        if not any(_scalar(v) in rc.values for v in values):
            raise errors.ClaimMismatch(rc.claim)
