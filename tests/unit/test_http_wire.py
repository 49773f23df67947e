"""The HTTP ext_authz wire: parsing Envoy's requests, rendering our answers (pure)."""

from __future__ import annotations

import pytest

from lastguard.sidecar import http_wire
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.http_wire import WireError, parse_head


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def test_a_request_as_envoy_sends_it() -> None:
    parsed = parse_head(
        head(
            "POST /api/orders?page=2 HTTP/1.1",
            "host: shop.example",
            "Authorization:  Bearer abc ",
            "content-length: 0",
            "x-request-id: 42",
        )
    )
    assert parsed.method == "POST"
    assert parsed.path == "/api/orders?page=2"
    assert parsed.headers == {
        "host": "shop.example",
        "authorization": "Bearer abc",
        "content-length": "0",
        "x-request-id": "42",
    }
    assert parsed.body_length == 0 and parsed.keep_alive


def test_repeated_headers_are_joined_as_in_envoys_check_request() -> None:
    parsed = parse_head(head("GET / HTTP/1.1", "authorization: a", "Authorization: b"))
    assert parsed.headers["authorization"] == "a,b"


def test_connection_close_and_a_body_to_skip() -> None:
    parsed = parse_head(head("GET / HTTP/1.1", "connection: Close", "content-length: 17"))
    assert not parsed.keep_alive and parsed.body_length == 17


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (head("GET /"), 400),
        (head("GET / HTTP/1.0"), 400),
        (head("GET  / HTTP/1.1"), 400),
        (head("G(T / HTTP/1.1"), 400),
        (head("GET /a\x00b HTTP/1.1"), 400),
        (head("GET /a\tb HTTP/1.1"), 400),
        (head("GET / HTTP/1.1", "no colon"), 400),
        (head("GET / HTTP/1.1", "bad name: x"), 400),
        (head("GET / HTTP/1.1", ": empty name"), 400),
        (head("GET / HTTP/1.1", "x: a\nb"), 400),
        (head("GET / HTTP/1.1", "x: a\rb"), 400),
        (head("GET / HTTP/1.1", "x: \x7f"), 400),
        (head("GET / HTTP/1.1", "transfer-encoding: chunked"), 400),
        (head("GET / HTTP/1.1", "content-length: -1"), 400),
        (head("GET / HTTP/1.1", "content-length: 1", "content-length: 1"), 400),
        (head("GET / HTTP/1.1", "content-length: 99999999999999"), 400),
        (head("GET / HTTP/1.1", f"content-length: {http_wire.MAX_BODY_BYTES + 1}"), 413),
        (head("GET / HTTP/1.1", *[f"x-{i}: v" for i in range(101)]), 431),
    ],
)
def test_malformed_requests_are_refused_with_a_4xx(raw: bytes, status: int) -> None:
    with pytest.raises(WireError) as caught:
        parse_head(raw)
    assert caught.value.status == status


def test_a_tab_inside_a_header_value_is_allowed() -> None:
    assert parse_head(head("GET / HTTP/1.1", "x: a\tb")).headers["x"] == "a\tb"


ALLOWED = Decision.allow(
    "authenticated",
    headers_to_set=(("x-user", "alice"), ("cookie", "theme=dark")),
    headers_to_remove=("authorization", "x-groups"),
)


def test_an_allow_sets_headers_and_names_the_ones_to_remove() -> None:
    wire = http_wire.render(http_wire.for_http(ALLOWED), "lastguard")
    assert wire == (
        b"HTTP/1.1 200 OK\r\nx-user: alice\r\ncookie: theme=dark\r\n"
        b"x-envoy-auth-headers-to-remove: authorization,x-groups\r\ncontent-length: 0\r\n\r\n"
    )
    assert ALLOWED.renderings is not None and ALLOWED.renderings["http"] == wire
    assert http_wire.render(ALLOWED, "lastguard", head_only=True) is wire


def test_a_denial_carries_status_challenge_and_body_but_no_body_for_head() -> None:
    denied = Decision.deny(401, "missing_token", None, "no token")
    wire = http_wire.render(denied, "lastguard")
    status, _, rest = wire.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 401 Unauthorized"
    assert b'www-authenticate: Bearer realm="lastguard"' in headers.split(b"\r\n")
    assert f"content-length: {len(body)}".encode() in headers.split(b"\r\n")
    assert body == denied.body().encode()
    assert http_wire.render(denied, "lastguard", head_only=True) == wire[: -len(body)]


def test_not_ready_is_a_503_with_retry_after() -> None:
    wire = http_wire.render(Decision.deny(503, "not_ready", None, "starting"), "lastguard")
    assert wire.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"\r\nretry-after: 5\r\n" in wire


@pytest.mark.parametrize(
    "decision",
    [
        Decision.allow("authenticated", query_params_to_remove=("access_token",)),
        Decision.allow("authenticated", headers_to_set=(("user-id", "alice"),)),
    ],
)
def test_what_http_cannot_express_is_denied_not_allowed(decision: Decision) -> None:
    answered = http_wire.for_http(decision)
    assert answered is http_wire.UNSUPPORTED
    assert not answered.allowed and answered.status == 403
    assert http_wire.render(answered, "r").startswith(b"HTTP/1.1 403 Forbidden\r\n")


def test_denials_and_expressible_allows_pass_through_for_http() -> None:
    denied = Decision.deny(403, "rule_denied", "access_denied", "no")
    assert http_wire.for_http(denied) is denied
    allowed = Decision.allow("rule_allowed", headers_to_remove=("x-user",))
    assert http_wire.for_http(allowed) is allowed


def test_error_response_closes_the_connection() -> None:
    wire = http_wire.error_response(431)
    assert wire.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nconnection: close\r\n" in wire


def test_the_framer_cuts_heads_across_reads_and_skips_bodies() -> None:
    framer = http_wire.Framer()
    framer.feed(b"POST /a HTTP/1.1\r\ncontent-le")
    assert framer.next_head() is None
    framer.feed(b"ngth: 5\r\n\r\nhel")
    first = framer.next_head()
    assert first == b"POST /a HTTP/1.1\r\ncontent-length: 5"
    framer.skip_body(parse_head(first).body_length)
    assert framer.next_head() is None  # two body bytes still to come
    framer.feed(b"loGET /b HTTP/1.1\r\n\r\n")
    assert framer.next_head() == b"GET /b HTTP/1.1"
    assert framer.next_head() is None and not framer.buffer


@pytest.mark.parametrize("ended", [True, False])
def test_the_framer_refuses_a_head_over_the_limit(ended: bool) -> None:
    framer = http_wire.Framer()
    framer.feed(b"GET / HTTP/1.1\r\nx: " + b"a" * http_wire.MAX_HEAD_BYTES)
    if ended:
        framer.feed(b"\r\n\r\n")
    with pytest.raises(WireError) as caught:
        framer.next_head()
    assert caught.value.status == 431
