"""Fetching JSON documents (JWKS, OIDC discovery) over HTTP. The I/O edge for keys.

`Fetcher` is the seam: the key cache depends on it only, so tests substitute a
fake and production uses `HttpFetcher` (aiohttp).

Invariants:
- Every failure raises `KeyFetchError` naming the URL and the cause, with the
  library's exception as `__cause__`. Nothing else escapes `get_json`.
- Only http(s) URLs; at most 3 redirects, never from https down to http.
- A body is read in chunks and abandoned as soon as it exceeds `max_bytes`
  (after decompression), so a hostile server cannot make us buffer much.
- Bodies are never logged and never put into error messages.
- No cookies are kept and no proxy settings are read from the environment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

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


class HttpFetcher:
    """`Fetcher` over aiohttp. Owns one ClientSession, created on first use; `close()` it."""

    def __init__(self, max_bytes: int = 512 * 1024, user_agent: str = "lastguard") -> None:
        self._max_bytes = max_bytes
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        self._session: aiohttp.ClientSession | None = None

    async def get_json(self, url: str, timeout: float) -> FetchedDocument:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise errors.KeyFetchError(f"{url}: only http(s) URLs can be fetched")
        try:
            async with self._client().get(
                url,
                timeout=aiohttp.ClientTimeout(total=timeout),
                # aiohttp raises on reaching max_redirects, so allow one more.
                max_redirects=MAX_REDIRECTS + 1,
            ) as response:
                if scheme == "https" and response.url.scheme != "https":
                    raise errors.KeyFetchError(f"{url}: redirected from https to http")
                if response.status != 200:
                    raise errors.KeyFetchError(f"{url}: HTTP status {response.status}")
                body = await self._read_limited(url, response)
                max_age = parse_max_age(response.headers.getall("Cache-Control", []))
        except errors.KeyFetchError:
            raise
        except TimeoutError as exc:
            raise errors.KeyFetchError(f"{url}: timed out after {timeout:g}s") from exc
        except aiohttp.TooManyRedirects as exc:
            raise errors.KeyFetchError(f"{url}: more than {MAX_REDIRECTS} redirects") from exc
        except aiohttp.ClientError as exc:
            raise errors.KeyFetchError(f"{url}: {_describe(exc)}") from exc
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 too
            raise errors.KeyFetchError(f"{url}: the response is not valid JSON") from exc
        if not isinstance(data, dict):
            raise errors.KeyFetchError(f"{url}: the response is not a JSON object")
        return FetchedDocument(data, max_age)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    async def _read_limited(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        too_large = errors.KeyFetchError(f"{url}: the response exceeds {self._max_bytes} bytes")
        if (response.content_length or 0) > self._max_bytes:
            raise too_large
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            body += chunk
            if len(body) > self._max_bytes:
                raise too_large
        return bytes(body)


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


def _describe(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__
