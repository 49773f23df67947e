"""Where tokens come from: headers (with a prefix), query parameters, cookies. Pure.

A policy's locations are the ordered union of its issuers' locations (headers
first, then parameters, then cookies, each in declaration order). The first
location that carries a value is the request's token; its issuer must then
accept that location (checked by the authenticator). A header whose value does
not start with the prefix (say `Authorization: Basic ...`) carries no token, as
in Istio. A matching prefix followed by nothing is a malformed token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from lastguard.sidecar.errors import MalformedToken
from lastguard.sidecar.policy import model


@dataclass(frozen=True, slots=True)
class Location:
    kind: str  # "header" | "param" | "cookie"
    name: str  # header names are lower-case
    prefix: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class FoundToken:
    token: str
    location: Location


def issuer_locations(issuer: model.Issuer) -> tuple[Location, ...]:
    return (
        *(Location("header", h.name, h.prefix) for h in issuer.from_headers),
        *(Location("param", p) for p in issuer.from_params),
        *(Location("cookie", c) for c in issuer.from_cookies),
    )


def policy_locations(issuers: Iterable[model.Issuer]) -> tuple[Location, ...]:
    """Ordered, de-duplicated union of every issuer's token locations."""
    found: dict[Location, None] = {}
    for kind in ("header", "param", "cookie"):
        for issuer in issuers:
            for loc in issuer_locations(issuer):
                if loc.kind == kind:
                    found.setdefault(loc, None)
    return tuple(found)


def query_params(path: str) -> dict[str, str]:
    """First value of each query parameter of a request path."""
    _, sep, query = path.partition("?")
    if not sep:
        return {}
    out: dict[str, str] = {}
    for key, value in parse_qsl(query.partition("#")[0], keep_blank_values=True):
        out.setdefault(key, value)
    return out


def cookies(header: str) -> dict[str, str]:
    """Cookie name to value; the first occurrence of a name wins."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.setdefault(name, value.strip().strip('"'))
    return out


def find_token(
    locations: tuple[Location, ...], headers: Mapping[str, str], path: str
) -> FoundToken | None:
    """The first token present in `locations`, or None. Raises MalformedToken for an empty one."""
    params: dict[str, str] | None = None
    jar: dict[str, str] | None = None
    for loc in locations:
        if loc.kind == "header":
            value = headers.get(loc.name)
            if value is None:
                continue
            if loc.prefix:
                if value[: len(loc.prefix)].lower() != loc.prefix.lower():
                    continue
                value = value[len(loc.prefix) :]
            token = value.strip()
        elif loc.kind == "param":
            if params is None:
                params = query_params(path)
            if loc.name not in params:
                continue
            token = params[loc.name]
        else:
            if jar is None:
                jar = cookies(headers.get("cookie", ""))
            if loc.name not in jar:
                continue
            token = jar[loc.name]
        if not token:
            raise MalformedToken(f"the {loc} is present but empty")
        return FoundToken(token, loc)
    return None


def cookie_header_without(header: str, name: str) -> str:
    """The Cookie header with every cookie called `name` removed."""
    kept = [p.strip() for p in header.split(";") if p.strip().partition("=")[0] != name]
    return "; ".join(p for p in kept if p)
