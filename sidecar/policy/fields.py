"""A typed reader of decoded YAML/JSON that collects problems instead of raising.

`Object` is a view of one mapping in a document: it hands out each field with the
type asked for, and adds every wrong type, broken bound or unknown field to a
shared `Problems` with its field path (``spec.issuers[0].jwksUri: ...``), giving
the caller a default instead. So one walk reports every problem of a document.
`string_item` and `header_name` check single values the same way; `is_http_url`
only answers.

Invariants: pure, no I/O; bad input is never raised, only recorded; a field is
unknown only once `Object.finish` has run without anyone asking for it. The
bounds in `MAX_ITEMS` and `MAX_LENGTH` are keyed by field name, apply wherever
that name occurs, and are shared with the CRD. What a JWTPolicy holds is
`lastguard.sidecar.policy.parse`'s business, not this module's.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

# Always used with fullmatch: `$` would also match before a trailing newline.
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A URL is only unreserved, reserved and percent characters (RFC 3986): no spaces or controls.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~%!$&'()*+,;=:@/?#\[\]]+")
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~%]+")

#: Bounds shared with the CRD (CEL cost estimation needs them there; here they stop abuse).
MAX_ITEMS = {
    "issuers": 16,
    "rules": 128,
    "paths": 64,
    "methods": 16,
    "audiences": 32,
    "algorithms": 16,
    "fromHeaders": 16,
    "fromParams": 16,
    "fromCookies": 16,
    "outputClaimToHeaders": 32,
    "requiredScopes": 32,
    "requiredClaims": 16,
    "values": 64,
    "matchLabels": 64,
    "publicKeys": 16,
}
MAX_LENGTH = {
    "jwks": 65536,
    "publicKeys": 65536,
    "issuer": 2048,
    "jwksUri": 2048,
    "audiences": 2048,
    "paths": 1024,
    "values": 1024,
    "matchLabels": 63,
}
DEFAULT_MAX_LENGTH = 256

#: Headers a policy may never set or read claims into: hop-by-hop, pseudo and framing headers.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-authorization",
        "cookie",
        "authorization",
    }
)


class Problems:
    """Collects problems with field paths while the reader walks a document."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer"}.get(
        type(value), type(value).__name__
    )


class Object:
    """A typed view of one mapping in the document that records problems instead of raising."""

    def __init__(self, data: Mapping[str, Any], path: str, problems: Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                self.problems.add(self._sub(key), "is required")
            return default
        value = self.data[key]
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # as the API server stores 60.0
        # bool is a subclass of int: an int field must not accept true/false.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.add(
                self._sub(key), f"must be {_type_name(kind())}, not {_type_name(value)}"
            )
            return default
        items = MAX_ITEMS.get(key)
        if items is not None and isinstance(value, list | dict) and len(value) > items:
            self.problems.add(self._sub(key), f"must have at most {items} items")
            return default
        length = MAX_LENGTH.get(key, DEFAULT_MAX_LENGTH)
        if isinstance(value, str) and len(value) > length:
            self.problems.add(self._sub(key), f"must be at most {length} characters")
            return default
        return value

    def string(self, key: str, required: bool = False) -> str | None:
        value = self.get(key, str, required=required)
        if value is not None and not value:
            self.problems.add(self._sub(key), "must not be empty")
            return None
        return value

    def integer(self, key: str, default: int | None, low: int, high: int) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not low <= value <= high:
            self.problems.add(self._sub(key), f"must be between {low} and {high}")
            return default
        return value  # type: ignore[no-any-return]

    def obj(self, key: str, required: bool = False) -> Object | None:
        value = self.get(key, dict, required=required)
        return None if value is None else Object(value, self._sub(key), self.problems)

    def items(
        self, key: str, item: Callable[[Any, str], T | None], required: bool = False
    ) -> list[T]:
        value = self.get(key, list, required=required)
        if value is None:
            return []
        out: list[T] = []
        for i, raw in enumerate(value):
            parsed = item(raw, f"{self._sub(key)}[{i}]")
            if parsed is not None:
                out.append(parsed)
        return out

    def strings(self, key: str) -> list[str]:
        limit = MAX_LENGTH.get(key, DEFAULT_MAX_LENGTH)
        return self.items(key, lambda raw, path: string_item(raw, path, self.problems, limit))

    def finish(self) -> None:
        """Reports every field the reader did not ask for."""
        for key in self.data:
            if key not in self.seen:
                self.problems.add(self._sub(str(key)), "unknown field")


def string_item(
    raw: Any, path: str, problems: Problems, limit: int = DEFAULT_MAX_LENGTH
) -> str | None:
    if not isinstance(raw, str) or not raw:
        problems.add(path, "must be a non-empty string")
        return None
    if len(raw) > limit:
        problems.add(path, f"must be at most {limit} characters")
        return None
    return raw


def as_object(raw: Any, path: str, problems: Problems) -> Object | None:
    if not isinstance(raw, dict):
        problems.add(path, f"must be object, not {_type_name(raw)}")
        return None
    return Object(raw, path, problems)


def is_http_url(value: str) -> bool:
    """An absolute http(s) URL with a host, nothing urlsplit would have to forgive."""
    if not _URL_CHARS.fullmatch(value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https"):
        return False
    host = parts.netloc.rpartition("@")[2]
    if host.startswith("["):
        literal, _, rest = host[1:].partition("]")
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return rest == "" or rest[:1] == ":"
    return bool(_REG_NAME.fullmatch(host.partition(":")[0]))


def header_name(value: str | None, path: str, problems: Problems) -> str | None:
    if value is None:
        return None
    if not HEADER_NAME.fullmatch(value):
        problems.add(path, "must be a valid HTTP header name")
        return None
    lowered = value.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith((":", "x-envoy-")):
        problems.add(path, f"{value!r} is reserved and cannot be set by a policy")
        return None
    return lowered
