"""A real JWKS / OIDC discovery server on 127.0.0.1 for tests, built on the dev issuer.

`TestIssuer` runs in the test's event loop (`async with TestIssuer() as iss:`);
`ThreadedTestIssuer` runs the same server in a thread with its own loop, for
tests whose code under test blocks or owns another loop (`with
ThreadedTestIssuer() as iss:`). Both serve `DevIssuer` routes unchanged and add
fault controls:

- `hits[path]` counts requests per path;
- `set_down(True)`: every request answers 503;
- `stop_listening()` / `resume_listening()`: close the listener and every open
  connection (clients get "connection refused"), then bind the same port again;
- `set_cache_control("max-age=60")`: Cache-Control on every response (None: none);
- `extra_keys`: JWKs appended to the served key set (junk, symmetric keys...);
- `discovery_overrides`: members replaced in the discovery document;
- `delay`: seconds to wait before answering (for timeouts); closing the server
  wakes any waiting request so that teardown stays fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from lastguard.sidecar import devissuer

T = TypeVar("T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class TestIssuer:
    """The dev issuer on 127.0.0.1:<free port>, with fault controls. See the module doc."""

    __test__ = False  # not a pytest test class

    def __init__(self, dev: devissuer.DevIssuer | None = None, *, host: str = "127.0.0.1") -> None:
        self.dev = dev if dev is not None else devissuer.DevIssuer()
        self.host = host
        self.hits: Counter[str] = Counter()
        self.down = False
        self.cache_control: str | None = None
        self.extra_keys: list[Any] = []
        self.discovery_overrides: dict[str, Any] = {}
        self.delay = 0.0
        self._running: devissuer.RunningIssuer | None = None
        self._closing: asyncio.Event | None = None

    # --- lifecycle ---

    async def start(self) -> TestIssuer:
        self._closing = asyncio.Event()
        self._running = await devissuer.serve(self.dev, self.host, 0, middlewares=[self._faults])
        return self

    async def close(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._running is not None:
            await self._running.close()
            self._running = None

    async def __aenter__(self) -> TestIssuer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- addresses ---

    @property
    def url(self) -> str:
        return self._handle().url

    @property
    def port(self) -> int:
        return self._handle().port

    @property
    def issuer(self) -> str:
        """The issuer identifier (`iss`), which is also the discovery base URL."""
        return self.dev.url

    @property
    def jwks_uri(self) -> str:
        return self.dev.jwks_uri

    # --- keys ---

    def mint(self, claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
        return self.dev.mint(claims, **kwargs)

    def rotate(self, alg: str = "RS256") -> str:
        return self.dev.rotate(alg)

    def remove_key(self, kid: str) -> None:
        self.dev.remove_key(kid)

    # --- faults ---

    def set_down(self, down: bool) -> None:
        self.down = down

    def set_cache_control(self, value: str | None) -> None:
        self.cache_control = value

    async def stop_listening(self) -> None:
        """Closes the listener and all open connections: new requests are refused."""
        running = self._handle()
        await running.site.stop()
        server = running.runner.server
        for connection in list(server.connections if server is not None else ()):
            connection.force_close()

    async def resume_listening(self) -> None:
        """Listens on the same port again."""
        running = self._handle()
        running.site = web.TCPSite(running.runner, self.host, running.port)
        await running.site.start()

    # --- internals ---

    def _handle(self) -> devissuer.RunningIssuer:
        if self._running is None:
            raise RuntimeError("the test issuer is not running")
        return self._running

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] += 1
        if self.delay > 0 and self._closing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.delay)
        if self.down:
            response: web.StreamResponse = web.Response(status=503, text="down for a test\n")
        else:
            response = await handler(request)
            response = self._rewrite(request.path, response)
        if self.cache_control is not None:
            response.headers["Cache-Control"] = self.cache_control
        return response

    def _rewrite(self, path: str, response: web.StreamResponse) -> web.StreamResponse:
        if not isinstance(response, web.Response) or response.status != 200:
            return response
        if path == "/jwks.json" and self.extra_keys:
            document = self.dev.jwks()
            document["keys"].extend(self.extra_keys)
            return web.json_response(document)
        if path == "/.well-known/openid-configuration" and self.discovery_overrides:
            document = {**self.dev.discovery(), **self.discovery_overrides}
            return web.json_response(document)
        return response


class ThreadedTestIssuer:
    """A `TestIssuer` served from a background thread with its own event loop.

    Plain attribute controls (`set_down`, `set_cache_control`, `delay`,
    `extra_keys`, `discovery_overrides`) act at once; anything that mutates the
    dev issuer's keys goes through `rotate` / `remove_key` (or `call`), which run
    on the server's loop so that a JWKS is never served mid-change.
    """

    __test__ = False

    def __init__(self, dev: devissuer.DevIssuer | None = None, *, host: str = "127.0.0.1") -> None:
        self.server = TestIssuer(dev, host=host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadedTestIssuer:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="test-issuer", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        self._run(self.server.start())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._run(self.server.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> ThreadedTestIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the same controls as TestIssuer ---

    @property
    def dev(self) -> devissuer.DevIssuer:
        return self.server.dev

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def issuer(self) -> str:
        return self.server.issuer

    @property
    def jwks_uri(self) -> str:
        return self.server.jwks_uri

    @property
    def hits(self) -> Counter[str]:
        return self.server.hits

    @property
    def extra_keys(self) -> list[Any]:
        return self.server.extra_keys

    @property
    def discovery_overrides(self) -> dict[str, Any]:
        return self.server.discovery_overrides

    @property
    def delay(self) -> float:
        return self.server.delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self.server.delay = seconds

    def set_down(self, down: bool) -> None:
        self.server.set_down(down)

    def set_cache_control(self, value: str | None) -> None:
        self.server.set_cache_control(value)

    def stop_listening(self) -> None:
        self._run(self.server.stop_listening())

    def resume_listening(self) -> None:
        self._run(self.server.resume_listening())

    def mint(self, claims: dict[str, Any] | None = None, **kwargs: Any) -> str:
        return self.dev.mint(claims, **kwargs)

    def rotate(self, alg: str = "RS256") -> str:
        return self.call(lambda: self.dev.rotate(alg))

    def remove_key(self, kid: str) -> None:
        self.call(lambda: self.dev.remove_key(kid))

    def call(self, fn: Callable[[], T]) -> T:
        """Runs `fn` on the server's loop and returns its result."""

        async def run() -> T:
            return fn()

        return self._run(run())

    def _run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        if self._loop is None:
            raise RuntimeError("the threaded test issuer is not started")
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        return future.result(timeout)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
