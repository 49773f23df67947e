"""The HTTP ext_authz edge: a lean asyncio HTTP/1.1 server in front of the same Authorizer.

Why it exists: behind Envoy on this project's benchmark machine, a Python gRPC
server spends about 0.27 ms of CPU per no-op Check (grpc.aio), while a plain
asyncio protocol answering Envoy's `http_service` spends about 0.02 ms
(docs/performance.md). Decisions are the Authorizer's, exactly as over gRPC;
only the wire differs (`http_wire`).

One `_Connection` per Envoy connection. Requests are answered in order: a
request whose decision has to wait (a key fetch) holds back the ones pipelined
behind it. Decisions that need no waiting are answered in the same event-loop
callback that read them (`eager`), without a Task.

A connection the server ends (a malformed request, `connection: close`) ends
with a lingering close, as nginx and Apache do: the answer is written, the
write side shut, and what the client still sends is read and dropped until it
closes or `LINGER_SECONDS` pass (RFC 9112, section 9.6). Closing at once with
unread input makes the kernel reset the connection: a client still sending sees
its send fail, and the reset can erase an answer the client has not read yet.
"""

from __future__ import annotations

import asyncio
import logging
import time

from lastguard.sidecar import eager, http_wire
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.recording import CheckRecorder

log = logging.getLogger("lastguard.http")

#: Stop reading from a connection while this much is buffered behind a waiting request.
_PAUSE_BYTES = http_wire.MAX_HEAD_BYTES + 4
#: How long an ended connection goes on draining the client's input before closing.
LINGER_SECONDS = 2.0


class HttpAuthzServer:
    def __init__(self, authorizer: Authorizer, realm: str, recorder: CheckRecorder) -> None:
        self.authorizer = authorizer
        self.realm = realm
        self.recorder = recorder
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, listen: str) -> int:
        """Listens on `listen` (HOST:PORT; port 0 picks one) and returns the port.

        `SO_REUSEPORT` is set so worker processes can share the port (see `workers`).
        """
        host, _, port = listen.rpartition(":")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host or "127.0.0.1", int(port), reuse_port=True, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets requests being decided finish for `grace` s, then closes."""
        if self._server is None:
            return
        self._server.close()
        deadline = time.monotonic() + grace
        while any(c.busy for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpAuthzServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.framer = http_wire.Framer()
        #: A request is being decided in a Task; what follows waits in the buffer.
        self.busy = False
        self.paused = False
        #: The client half-closed (sent all it will) while a request was being decided.
        self.client_done = False
        #: Set once the server ended the connection: the transport, draining (see module).
        self.ending: asyncio.Transport | None = None
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.transport = self.ending = None
        if self._linger is not None:
            self._linger.cancel()

    def close(self) -> None:
        transport = self.transport or self.ending
        if transport is not None:
            transport.close()

    def _end(self) -> None:
        """Ends the connection after the answer just written, with a lingering close."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self.ending = transport
        self.framer = http_wire.Framer()  # what was buffered is dropped too
        transport.write_eof()  # after what is still queued
        if self.paused:
            self.paused = False
            transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def eof_received(self) -> bool:
        """The client sent all it will: answer what is being decided, then close."""
        if self.busy and self.ending is None:
            self.client_done = True
            return True  # keep the transport open for the answers
        return False  # nothing pending: asyncio closes the transport

    def data_received(self, data: bytes) -> None:
        if self.ending is not None:
            return  # lingering: dropped
        self.framer.feed(data)
        if self.busy:
            if len(self.framer.buffer) > _PAUSE_BYTES and self.transport is not None:
                self.transport.pause_reading()
                self.paused = True
            return
        self._process()

    def _process(self) -> None:
        framer = self.framer
        while self.transport is not None and not self.busy:
            try:
                raw = framer.next_head()
                if raw is None:
                    break
                head = http_wire.parse_head(raw)
            except http_wire.WireError as exc:
                self._fail(exc.status)
                return
            framer.skip_body(head.body_length)
            self._answer(head)
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def _answer(self, head: http_wire.RequestHead) -> None:
        started = time.perf_counter()
        outcome = eager.start(self.server.authorizer.check(head.method, head.path, head.headers))
        if isinstance(outcome, eager.Done):
            self._send(head, outcome.value, started)
            return
        self.busy = True

        def finished(task: asyncio.Task[Decision]) -> None:
            self.busy = False
            if task.cancelled():
                self.close()
                return
            self._send(head, task.result(), started)
            self._process()
            if self.client_done and not self.busy:
                self.close()

        outcome.add_done_callback(finished)

    def _send(self, head: http_wire.RequestHead, decision: Decision, started: float) -> None:
        server = self.server
        answered = http_wire.for_http(decision)
        if answered is not decision:
            log.warning(
                "request denied",
                extra={"fields": {"decision": "deny", "reason": answered.reason,
                                  "needs": "gRPC mode (see docs/http-mode.md)"}},
            )  # fmt: skip
        server.recorder.record(answered, started)
        if self.transport is None:
            return
        self.transport.write(http_wire.render(answered, server.realm, head.method == "HEAD"))
        if not head.keep_alive:
            self._end()

    def _fail(self, status: int) -> None:
        log.info("malformed authorization request", extra={"fields": {"status": status}})
        if self.transport is not None:
            self.transport.write(http_wire.error_response(status))
            self._end()
