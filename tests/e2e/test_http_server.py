"""The HTTP ext_authz edge on a real socket: framing, ordering, hostile input.

Envoy only ever sends well-formed requests one at a time per connection; these
tests speak raw HTTP/1.1 to the port to pin what happens when that does not
hold (pipelining, bodies, HEAD, malformed heads), since a desynchronised
connection would pair one request with another's answer.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lastguard.sidecar import http_server
from tests.support import policies
from tests.support.clock import FakeClock
from tests.support.issuer import ThreadedTestIssuer
from tests.support.sidecar import PolicyWriter, SidecarThread, StartSidecar

pytestmark = pytest.mark.e2e


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class RawClient:
    """One keep-alive connection; reads answers by content-length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read(self, head_only: bool = False) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("closed before an answer")
        raw, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        length = 0 if head_only else int(headers["content-length"])
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Answer(int(status_line.split(" ")[1]), headers, body)

    def closed(self) -> bool:
        self.sock.settimeout(5)
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: app", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def policy(issuer: ThreadedTestIssuer) -> dict[str, Any]:
    return policies.document(
        issuers=[
            {
                "issuer": issuer.issuer,
                "jwksUri": issuer.jwks_uri,
                "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}],
            }
        ],
        rules=[{"paths": ["/healthz"], "action": "Allow"}],
    )


@dataclass
class Served:
    sidecar: SidecarThread
    issuer: ThreadedTestIssuer
    clock: FakeClock

    def client(self) -> RawClient:
        return RawClient(self.sidecar.http_port)


@pytest.fixture
def served(start_sidecar: StartSidecar, write_policy: PolicyWriter) -> Iterator[Served]:
    with ThreadedTestIssuer() as issuer:
        clock = FakeClock()
        sidecar = start_sidecar(
            write_policy(policy(issuer)), http_listen="127.0.0.1:0", key_clock=clock
        )
        yield Served(sidecar, issuer, clock)


def test_keep_alive_allow_then_deny_on_one_connection(served: Served) -> None:
    client = served.client()
    token = served.issuer.mint({"sub": "alice"})
    client.send(request("GET", "/api", f"authorization: Bearer {token}", "x-user: mallory"))
    allowed = client.read()
    assert allowed.status == 200 and allowed.headers["x-user"] == "alice"
    assert allowed.headers["x-envoy-auth-headers-to-remove"] == "authorization"
    client.send(request("GET", "/api"))
    denied = client.read()
    assert denied.status == 401
    assert denied.headers["www-authenticate"] == 'Bearer realm="lastguard"'
    assert denied.body.startswith(b'{"error":')


def test_pipelined_requests_are_answered_in_order_even_when_the_first_waits(
    served: Served,
) -> None:
    kid = served.issuer.rotate()  # a key the sidecar has not fetched yet
    served.clock.advance(3600)  # past the unknown-kid refetch rate limit
    served.issuer.server.delay = 0.3
    token = served.issuer.mint({"sub": "bob"}, kid=kid)
    client = served.client()
    client.send(
        request("GET", "/api", f"authorization: Bearer {token}")
        + request("GET", "/api")
        + request("GET", "/healthz")
    )
    assert [client.read().status for _ in range(3)] == [200, 401, 200]


def test_a_client_that_half_closes_still_gets_a_waiting_answer(served: Served) -> None:
    """The client sends its requests and shuts its write side while the first waits on a
    key fetch: every answer still arrives, then the server closes."""
    kid = served.issuer.rotate()
    served.clock.advance(3600)
    served.issuer.server.delay = 0.3
    token = served.issuer.mint({"sub": "bob"}, kid=kid)
    client = served.client()
    client.send(request("GET", "/api", f"authorization: Bearer {token}") + request("GET", "/api"))
    client.sock.shutdown(socket.SHUT_WR)
    assert [client.read().status for _ in range(2)] == [200, 401]
    assert client.closed()


def test_a_body_is_skipped_and_head_gets_no_body(served: Served) -> None:
    client = served.client()
    client.send(request("POST", "/api", body=b"x" * 5000))
    assert client.read().status == 401
    client.send(request("HEAD", "/api"))
    head = client.read(head_only=True)
    assert head.status == 401 and int(head.headers["content-length"]) > 0
    client.send(request("GET", "/healthz"))
    assert client.read().status == 200


def test_a_client_still_sending_gets_the_answer_and_a_clean_close(served: Served) -> None:
    """The server answers 431 a little way into a 1 MB head and ends the connection
    while the client is still sending. Closing at once would reset the connection
    (the kernel's answer to unread input): the client's send fails and the close is a
    reset. The lingering close drains instead: the send completes, then the answer
    and a clean end of stream."""
    client = served.client()
    client.send(b"GET / HTTP/1.1\r\nx: " + b"a" * 1_000_000)
    answer = client.read()
    assert answer.status == 431 and answer.headers["connection"] == "close"
    assert client.closed()


def test_lingering_ends_when_the_client_never_closes(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_server, "LINGER_SECONDS", 0.3)
    client = served.client()
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    assert client.read().status == 400 and client.closed()  # the server's side is shut
    client.send(b"more")  # still read (and dropped) while the server lingers
    deadline = time.monotonic() + 5
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # closed: input is refused
        while time.monotonic() < deadline:
            client.send(b"x")
            time.sleep(0.05)


def test_connection_close_is_honoured(served: Served) -> None:
    client = served.client()
    client.send(request("GET", "/healthz", "connection: close"))
    assert client.read().status == 200
    assert client.closed()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nx: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nx: " + b"a" * 70_000, 431),  # no end of head in sight
    ],
)
def test_malformed_requests_get_a_4xx_and_the_connection_closes(
    served: Served, data: bytes, status: int
) -> None:
    client = served.client()
    client.send(data)
    answer = client.read()
    assert answer.status == status and answer.headers["connection"] == "close"
    assert client.closed()
    other = served.client()  # the server itself is fine
    other.send(request("GET", "/healthz"))
    assert other.read().status == 200
