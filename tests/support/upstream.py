"""A stand-in for the protected app: echoes what it received, so tests can see what got through.

Every request, whatever the method or path, is answered 200 with a JSON body
``{"method", "path", "headers", "body"}`` where `headers` maps lower-cased names
to values (repeated headers joined with ", "). Each request is also recorded in
`UpstreamApp.requests`, so a test can assert that a denied request never
reached the app. Plain http.server in a background thread: no event loop to
share with the code under test.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: str

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "headers": self.headers,
            "body": self.body,
        }


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _EchoServer

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode("utf-8", errors="replace") if length else ""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        seen = SeenRequest(self.command, self.path, headers, body)
        with self.server.lock:
            self.server.seen.append(seen)
        payload = json.dumps(seen.as_json()).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        # One request per connection: a stopped app never keeps serving pooled connections.
        self.send_header("connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass  # Envoy's access log already says what happened.


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _EchoHandler)
        self.lock = threading.Lock()
        self.seen: list[SeenRequest] = []


class UpstreamApp:
    """The echo app on 127.0.0.1:`port` (0: any free port). `start()`/`stop()` or `with`."""

    def __init__(self, port: int = 0) -> None:
        self._requested_port = port
        self._server: _EchoServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> UpstreamApp:
        self._server = _EchoServer((HOST, self._requested_port))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="upstream-app",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> UpstreamApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("upstream app is not running")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request received so far, oldest first (a copy)."""
        if self._server is None:
            return []
        with self._server.lock:
            return list(self._server.seen)

    def clear(self) -> None:
        if self._server is not None:
            with self._server.lock:
                self._server.seen.clear()
