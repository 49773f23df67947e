"""Plain-HTTP liveness and readiness for Kubernetes probes.

Kubernetes probes connect to the pod IP, while Check stays on loopback (only
the local Envoy may ask it). This small server answers `GET /healthz` (200
while the process runs) and `GET /readyz` (200 once a policy set is loaded,
503 before), so probes need no access to the ext_authz port.

It is a few lines of asyncio streams rather than a web framework: probes send
one short request per connection, and the sidecar's idle memory matters more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Requests larger than this, or slower than the timeout, are dropped.
_MAX_REQUEST = 8192
_TIMEOUT = 5.0


def _response(status: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def answer(request_line: bytes, ready: bool) -> bytes:
    """The response to one request line (pure)."""
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "only GET\n")
    path = parts[1].split("?", 1)[0]
    if path == "/healthz":
        return _response("200 OK", "ok\n")
    if path == "/readyz":
        if ready:
            return _response("200 OK", "ready\n")
        return _response("503 Service Unavailable", "policies not loaded\n")
    return _response("404 Not Found", "not found\n")


async def serve(listen: str, ready: Callable[[], bool]) -> asyncio.Server:
    """Starts the probe server on host:port; `close()` and `await wait_closed()` to stop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) <= _MAX_REQUEST:
                writer.write(answer(head.split(b"\r\n", 1)[0], ready()))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    host, _, port = listen.rpartition(":")
    return await asyncio.start_server(handle, host or "0.0.0.0", int(port), limit=_MAX_REQUEST)  # noqa: S104
