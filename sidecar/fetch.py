"""Fetching JSON documents (JWKS, OIDC discovery) over HTTP. The I/O edge for keys.

`Fetcher` is the seam: the key cache depends on it only, so tests substitute a
fake and production uses `HttpFetcher`.

`HttpFetcher` uses the standard library's HTTP client in a worker thread. Key
fetches are rare background work, so a thread costs nothing that matters,
while an async HTTP client library would add megabytes to every idle sidecar.

Invariants:
- Every failure raises `KeyFetchError` naming the URL and the cause, with the
  library's exception as `__cause__`. Nothing else escapes `get_json`.
- Only http(s) URLs; at most 3 redirects, only to http(s), never from https
  down to http.
- A body is read in chunks and abandoned as soon as it exceeds `max_bytes`, so
  a hostile server cannot make us buffer much. No compression is requested.
- Bodies are never logged and never put into error messages.
- No cookies are kept and no proxy settings are read from the environment.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from lastguard.sidecar import errors

MAX_REDIRECTS = 3
_CHUNK_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class FetchedDocument:
    """A decoded JSON object and how long the server lets us cache it."""

    data: Any
    #: Cache-Control max-age in seconds; 0 for no-store / no-cache; None when absent.
    max_age: int | None


class Fetcher(Protocol):
    async def get_json(self, url: str, timeout: float) -> FetchedDocument:
        """The JSON object at `url`, within `timeout` seconds, or `KeyFetchError`."""
        ...


class _TooManyRedirects(Exception):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    """At most MAX_REDIRECTS, only to http(s), never from https to http."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        hops = getattr(req, "lastguard_hops", 0) + 1
        if hops > MAX_REDIRECTS:
            raise _TooManyRedirects()
        old, new = urlsplit(req.full_url).scheme, urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise errors.KeyFetchError(f"{req.full_url}: redirected from {old} to {new}")
        request = super().redirect_request(req, fp, code, msg, headers, newurl)
        if request is not None:
            request.lastguard_hops = hops  # type: ignore[attr-defined]
        return request


class HttpFetcher:
    """`Fetcher` over urllib in a worker thread; `close()` is kept for symmetry."""

    def __init__(self, max_bytes: int = 512 * 1024, user_agent: str = "lastguard") -> None:
        self._max_bytes = max_bytes
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        # No ProxyHandler from the environment, no cookie processor.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _Redirects())

    async def get_json(self, url: str, timeout: float) -> FetchedDocument:
        if urlsplit(url).scheme not in ("http", "https"):
            raise errors.KeyFetchError(f"{url}: only http(s) URLs can be fetched")
        body, cache_control = await asyncio.to_thread(self._fetch, url, timeout)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
            raise errors.KeyFetchError(f"{url}: the response is not valid JSON") from exc
        if not isinstance(data, dict):
            raise errors.KeyFetchError(f"{url}: the response is not a JSON object")
        return FetchedDocument(data, parse_max_age(cache_control))

    def _fetch(self, url: str, timeout: float) -> tuple[bytes, list[str]]:
        """Blocking: the body (bounded) and the Cache-Control values, within `timeout`."""
        deadline = time.monotonic() + timeout
        request = urllib.request.Request(url, headers=self._headers)  # noqa: S310 (scheme checked)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                if response.status != 200:
                    raise errors.KeyFetchError(f"{url}: HTTP status {response.status}")
                body = self._read_limited(url, response, deadline, timeout)
                return body, response.headers.get_all("Cache-Control") or []
        except errors.KeyFetchError:
            raise
        except _TooManyRedirects as exc:
            raise errors.KeyFetchError(f"{url}: more than {MAX_REDIRECTS} redirects") from exc
        except urllib.error.HTTPError as exc:
            raise errors.KeyFetchError(f"{url}: HTTP status {exc.code}") from exc
        except TimeoutError as exc:
            raise errors.KeyFetchError(f"{url}: timed out after {timeout:g}s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError | socket.timeout):
                raise errors.KeyFetchError(f"{url}: timed out after {timeout:g}s") from exc
            raise errors.KeyFetchError(f"{url}: {_describe(exc.reason)}") from exc
        except (OSError, ValueError) as exc:  # e.g. a connection reset, a malformed response
            raise errors.KeyFetchError(f"{url}: {_describe(exc)}") from exc

    def _read_limited(self, url: str, response: Any, deadline: float, timeout: float) -> bytes:
        too_large = errors.KeyFetchError(f"{url}: the response exceeds {self._max_bytes} bytes")
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max_bytes:
            raise too_large
        body = bytearray()
        while chunk := response.read(_CHUNK_BYTES):
            body += chunk
            if len(body) > self._max_bytes:
                raise too_large
            if time.monotonic() > deadline:
                raise errors.KeyFetchError(f"{url}: timed out after {timeout:g}s")
        return bytes(body)

    async def close(self) -> None:
        """Nothing to release: each fetch opens and closes its own connection."""


def parse_max_age(cache_control: list[str]) -> int | None:
    """The max-age of Cache-Control header values; 0 for no-store / no-cache; None if absent.

    Malformed or negative max-age values are ignored, as RFC 9111 asks of caches.
    """
    max_age: int | None = None
    for value in cache_control:
        for directive in value.split(","):
            name, _, arg = directive.strip().partition("=")
            name = name.strip().lower()
            if name in ("no-store", "no-cache"):
                return 0
            if name == "max-age":
                arg = arg.strip().strip('"')
                if arg.isascii() and arg.isdigit():
                    max_age = int(arg)
    return max_age


def _describe(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot connect ({reason.strerror or reason})"
    if isinstance(reason, OSError) and reason.strerror:
        return f"cannot connect ({reason.strerror})"
    return str(reason) or type(reason).__name__
