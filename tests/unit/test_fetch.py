"""HttpFetcher against real HTTP servers on 127.0.0.1: every failure is a KeyFetchError."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from lastguard.sidecar import errors, fetch

MAX_BYTES = 4096


async def _ok(request: web.Request) -> web.Response:
    response = web.json_response({"keys": [], "seen_ua": request.headers.get("User-Agent")})
    for value in request.query.getall("cc", []):
        response.headers.add("Cache-Control", value)
    return response


async def _status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text='{"keys": []}')


async def _slow(request: web.Request) -> web.Response:
    stop: asyncio.Event = request.app[STOP]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 5)
    return web.json_response({})


async def _big_streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # chunked: no Content-Length to check up front
    await response.prepare(request)
    for _ in range(64):
        await response.write(b" " * 1024)
    await response.write(b"{}")
    await response.write_eof()
    return response


async def _big_declared(request: web.Request) -> web.Response:
    return web.Response(body=b" " * (MAX_BYTES * 2) + b"{}", content_type="application/json")


async def _text(request: web.Request) -> web.Response:
    return web.Response(text=BODIES[request.match_info["name"]])


async def _redirect(request: web.Request) -> web.Response:
    hops = int(request.match_info["hops"])
    raise web.HTTPFound("/ok" if hops == 0 else f"/redirect/{hops - 1}")


BODIES = {
    "html": "<html>login</html>",
    "array": "[1, 2]",
    "deep": "[" * 100_000,
    "latin1": '{"a": "\xe9"}',
}

STOP = web.AppKey("stop", asyncio.Event)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app[STOP] = asyncio.Event()
    app.router.add_get("/ok", _ok)
    app.router.add_get("/status/{code}", _status)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/big-streamed", _big_streamed)
    app.router.add_get("/big-declared", _big_declared)
    app.router.add_get("/text/{name}", _text)
    app.router.add_get("/redirect/{hops}", _redirect)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    app[STOP].set()
    await runner.cleanup()


@pytest.fixture
async def fetcher() -> AsyncIterator[fetch.HttpFetcher]:
    f = fetch.HttpFetcher(max_bytes=MAX_BYTES, user_agent="lastguard-test")
    yield f
    await f.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that is bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"


async def test_success_decodes_json_and_sends_user_agent(
    server: str, fetcher: fetch.HttpFetcher
) -> None:
    document = await fetcher.get_json(f"{server}/ok", timeout=5)
    assert document == fetch.FetchedDocument({"keys": [], "seen_ua": "lastguard-test"}, None)


@pytest.mark.parametrize(
    ("path", "cause"),
    [
        pytest.param("/status/404", "HTTP status 404", id="not-found"),
        pytest.param("/status/500", "HTTP status 500", id="server-error"),
        pytest.param("/status/204", "HTTP status 204", id="no-content"),
        pytest.param("/big-streamed", f"exceeds {MAX_BYTES} bytes", id="oversized-chunked"),
        pytest.param("/big-declared", f"exceeds {MAX_BYTES} bytes", id="oversized-declared"),
        pytest.param("/text/html", "not valid JSON", id="html-not-json"),
        pytest.param("/text/array", "not a JSON object", id="json-array"),
        pytest.param("/slow", "timed out after 0.2s", id="timeout"),
        pytest.param("/redirect/4", "more than 3 redirects", id="too-many-redirects"),
    ],
)
async def test_failures_raise_key_fetch_error(
    server: str, fetcher: fetch.HttpFetcher, path: str, cause: str
) -> None:
    url = f"{server}{path}"
    with pytest.raises(errors.KeyFetchError) as raised:
        await fetcher.get_json(url, timeout=0.2)
    assert str(raised.value).startswith(url)
    assert cause in str(raised.value)


async def test_deeply_nested_json_is_rejected_not_crashing(server: str) -> None:
    fetcher = fetch.HttpFetcher(max_bytes=200_000)
    try:
        with pytest.raises(errors.KeyFetchError, match="not valid JSON"):
            await fetcher.get_json(f"{server}/text/deep", timeout=5)
    finally:
        await fetcher.close()


async def test_up_to_three_redirects_are_followed(server: str, fetcher: fetch.HttpFetcher) -> None:
    document = await fetcher.get_json(f"{server}/redirect/2", timeout=5)
    assert document.data["keys"] == []


async def test_connection_refused(refused_url: str, fetcher: fetch.HttpFetcher) -> None:
    with pytest.raises(errors.KeyFetchError, match="cannot connect") as raised:
        await fetcher.get_json(refused_url, timeout=5)
    assert str(raised.value).startswith(refused_url)
    assert raised.value.__cause__ is not None


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("file:///etc/passwd", id="file"),
        pytest.param("ftp://127.0.0.1/jwks.json", id="ftp"),
        pytest.param("jwks.json", id="relative"),
    ],
)
async def test_only_http_urls(fetcher: fetch.HttpFetcher, url: str) -> None:
    with pytest.raises(errors.KeyFetchError, match="only http"):
        await fetcher.get_json(url, timeout=1)


async def test_error_messages_never_contain_the_body(
    server: str, fetcher: fetch.HttpFetcher
) -> None:
    with pytest.raises(errors.KeyFetchError) as raised:
        await fetcher.get_json(f"{server}/text/html", timeout=5)
    assert "login" not in str(raised.value)


@pytest.mark.parametrize(
    ("headers", "max_age"),
    [
        pytest.param([], None, id="absent"),
        pytest.param(["max-age=300"], 300, id="max-age"),
        pytest.param(["public, max-age=60, must-revalidate"], 60, id="among-others"),
        pytest.param(["Max-Age = 45"], 45, id="case-and-spaces"),
        pytest.param(['max-age="90"'], 90, id="quoted"),
        pytest.param(["no-cache"], 0, id="no-cache"),
        pytest.param(["max-age=300, no-store"], 0, id="no-store-wins"),
        pytest.param(["public", "max-age=120"], 120, id="several-headers"),
        pytest.param(["max-age=-5"], None, id="negative-ignored"),
        pytest.param(["max-age=abc"], None, id="garbage-ignored"),
        pytest.param(["max-age=\u00b2"], None, id="non-ascii-digit-ignored"),
        pytest.param(["s-maxage=10"], None, id="shared-cache-directive-ignored"),
    ],
)
def test_parse_max_age(headers: list[str], max_age: int | None) -> None:
    assert fetch.parse_max_age(headers) == max_age


@pytest.mark.parametrize(
    ("cc", "max_age"),
    [
        pytest.param(["max-age=77"], 77, id="max-age"),
        pytest.param(["no-store"], 0, id="no-store"),
        pytest.param(["public", "max-age=5"], 5, id="two-headers"),
    ],
)
async def test_cache_control_reaches_the_document(
    server: str, fetcher: fetch.HttpFetcher, cc: list[str], max_age: int
) -> None:
    query = "&".join(f"cc={value}" for value in cc)
    document = await fetcher.get_json(f"{server}/ok?{query}", timeout=5)
    assert document.max_age == max_age


async def test_close_is_idempotent_and_fetcher_reusable(
    server: str, fetcher: fetch.HttpFetcher
) -> None:
    await fetcher.get_json(f"{server}/ok", timeout=5)
    await fetcher.close()
    await fetcher.close()
    assert (await fetcher.get_json(f"{server}/ok", timeout=5)).data["keys"] == []
