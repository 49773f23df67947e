"""Envoy's HTTP ext_authz protocol on the wire: parse its requests, render our answers. Pure.

Envoy's `http_service` sends, for each request it checks, an HTTP/1.1 request
with the original method and path (query included), `content-length: 0` (or the
buffered body) and the original headers its `allowed_headers` admit (always
`authorization`, `:method`, `:path`, `host`). It reads our answer so (Envoy 1.40,
`ext_authz_http_impl.cc`):

- 200: allowed. Headers matching `allowed_upstream_headers` are set on the
  request, replacing the client's; `x-envoy-auth-headers-to-remove` names
  headers to remove. Sets come before removals, so a header is in one list only.
- any 5xx: an authorization *error*: Envoy answers `status_on_error` itself,
  without our headers or body.
- anything else: denied; status, body and headers (by default all but `host`)
  go to the client.

What this protocol cannot express, and how lastguard stays closed: it cannot
remove a query parameter, and Envoy only forwards headers its
`allowed_upstream_headers` admit. The contract (see docs/http-mode.md) is that
Envoy forwards every header starting with `x-` and `cookie`; an allowed decision
that needs anything else becomes a 403 denial (`unsupported_by_http_mode`)
instead of an allow that would leave a token or a spoofable header behind.

Limits are Envoy's own defaults or smaller: a request head up to 60 KiB, 100
header lines, a body up to 1 MiB (read and ignored; lastguard decides on
headers). Requests that break them, or HTTP/1.1 framing, get a 4xx and the
connection is closed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from lastguard.sidecar.decision import Decision

MAX_HEAD_BYTES = 60 * 1024
MAX_HEADER_LINES = 100
MAX_BODY_BYTES = 1024 * 1024
HEADERS_TO_REMOVE = "x-envoy-auth-headers-to-remove"
#: The contract with Envoy's `allowed_upstream_headers`.
UPSTREAM_HEADER_PREFIX = "x-"
UPSTREAM_HEADERS_EXACT = frozenset({"cookie"})

_TCHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Every byte but the control characters RFC 9110 forbids in a field (all but HTAB).
_NOT_CONTROLS = bytes(b for b in range(256) if b == 0x09 or 0x20 <= b < 0x7F or b > 0x7F)
#: A request line: a method token, a target without spaces or control characters.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ [^\x00-\x20\x7f]+ HTTP/1\.1")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class WireError(Exception):
    """The request is not HTTP/1.1 as Envoy sends it; answer `status` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    path: str
    #: Lower-case names; repeated headers joined with "," as Envoy's CheckRequest does.
    headers: dict[str, str]
    body_length: int
    keep_alive: bool


def parse_head(head: bytes) -> RequestHead:
    """Parses a request head: everything before the blank line, without it.

    Raises `WireError` for anything that is not a well-formed HTTP/1.1 request.
    Control characters are found with one `bytes.translate` over the head (C
    speed; a regular expression walking an 800-byte token costs ~10 us): what
    remains must be exactly the CRLFs that end the lines.
    """
    lines = head.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise WireError(431, "too many header lines")
    if head.translate(None, _NOT_CONTROLS) != b"\r\n" * (len(lines) - 1):
        raise WireError(400, "control character in the request head")
    request_line = lines[0]
    if _REQUEST_LINE.fullmatch(request_line) is None:
        raise WireError(400, "bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TCHARS):
            raise WireError(400, "bad header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous},{text}"
    if "transfer-encoding" in headers:
        raise WireError(400, "transfer-encoding is not accepted (Envoy sends content-length)")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 12:  # also rejects "1,1" (repeated)
        raise WireError(400, "bad content-length")
    body_length = int(length_text)
    if body_length > MAX_BODY_BYTES:
        raise WireError(413, "body too large")
    connection = headers.get("connection")
    method, _, rest = request_line.decode("latin-1").partition(" ")
    return RequestHead(
        method=method,
        path=rest[:-9],  # without " HTTP/1.1"
        headers=headers,
        body_length=body_length,
        keep_alive=connection is None or "close" not in connection.lower(),
    )


class Framer:
    """Cuts request heads out of one connection's byte stream and skips their bodies.

    `feed` what arrives; `next_head` returns each complete head (without its blank
    line) or None until more arrives; `skip_body` after parsing a head drops the
    body that follows it. Raises `WireError(431)` for a head over the limit.
    """

    __slots__ = ("buffer", "skip")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.skip = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def skip_body(self, length: int) -> None:
        self.skip = length

    def next_head(self) -> bytes | None:
        buffer = self.buffer
        if self.skip:
            dropped = min(self.skip, len(buffer))
            del buffer[:dropped]
            self.skip -= dropped
            if self.skip:
                return None
        end = buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD_BYTES or (end < 0 and len(buffer) > MAX_HEAD_BYTES):
            raise WireError(431, "request head too large")
        if end < 0:
            return None
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        return head


def forwardable(name: str) -> bool:
    """Whether Envoy, configured per the contract, sets this header upstream."""
    return name.startswith(UPSTREAM_HEADER_PREFIX) or name in UPSTREAM_HEADERS_EXACT


UNSUPPORTED = Decision.deny(
    403,
    "unsupported_by_http_mode",
    "access_denied",
    "this policy needs the gRPC protocol: it removes a query parameter or sets a header "
    "that does not start with x-",
)


def expressible(decision: Decision) -> bool:
    """Whether an allowed decision can be carried out over the HTTP protocol."""
    return not decision.query_params_to_remove and all(
        forwardable(name) for name, _ in decision.headers_to_set
    )


def _response(status: int, headers: list[tuple[str, str]], body: bytes, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"content-length: {len(body)}")
    wire = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return wire if head_only else wire + body


def _allowed(decision: Decision) -> bytes:
    headers = list(decision.headers_to_set)
    if decision.headers_to_remove:
        headers.append((HEADERS_TO_REMOVE, ",".join(decision.headers_to_remove)))
    return _response(200, headers, b"", head_only=False)


@lru_cache(maxsize=512)
def _denied(decision: Decision, realm: str, head_only: bool) -> bytes:
    headers = [("content-type", "application/json"), ("cache-control", "no-store")]
    challenge = decision.challenge(realm)
    if challenge is not None:
        headers.append(("www-authenticate", challenge))
    if decision.status == 503:
        headers.append(("retry-after", "5"))
    return _response(decision.status, headers, decision.body().encode(), head_only)


def for_http(decision: Decision) -> Decision:
    """The decision to answer with: an allow this protocol cannot carry out becomes
    `UNSUPPORTED`. Cheap for reused decisions (one that was rendered is expressible)."""
    if not decision.allowed:
        return decision
    renderings = decision.renderings
    if renderings is not None and "http" in renderings:
        return decision
    return decision if expressible(decision) else UNSUPPORTED


def render(decision: Decision, realm: str, head_only: bool = False) -> bytes:
    """Our HTTP answer to Envoy for a decision (pass it through `for_http` first);
    `head_only` answers a HEAD request.

    Allowed answers have no body, so HEAD changes nothing for them; they are built
    once per reusable Decision (kept in its `renderings`), denials once per
    distinct denial.
    """
    if not decision.allowed:
        return _denied(decision, realm, head_only)
    return decision.rendered("http", _allowed)


def error_response(status: int) -> bytes:
    """The answer to a request we could not read; the connection closes after it."""
    body = b'{"error":"invalid_request","error_description":"malformed authorization request"}'
    return _response(
        status, [("content-type", "application/json"), ("connection", "close")], body, False
    )
