"""Maps a Decision to Envoy's CheckResponse (envoy.service.auth.v3). The protocol edge.

Facts about Envoy (1.40) this relies on: `ok_response.headers` are applied
before `headers_to_remove`, so a header is never in both lists; an unset
`append` with `append_action` OVERWRITE_IF_EXISTS_OR_ADD replaces a client's
copy; denied-response headers reach the client; `dynamic_metadata` is stored
under the `envoy.filters.http.ext_authz` namespace.

Responses are kept *serialized*: the gRPC method is registered with a
serializer that passes bytes through (see `server`), so a reused response
costs neither message building nor serialization, and a cached one takes
about a tenth of the memory of a message object. Denials are rendered once per
distinct decision; allowed responses once per Decision, kept in its
`renderings` (the authorizer reuses one Decision for every request with the
same cached token, so a cache hit renders nothing).
"""

from __future__ import annotations

from functools import lru_cache

from google.protobuf.struct_pb2 import Struct

from lastguard.proto.envoy.config.core.v3 import base_pb2
from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb
from lastguard.proto.envoy.type.v3 import http_status_pb2
from lastguard.proto.google.rpc import status_pb2
from lastguard.sidecar.decision import Decision

# google.rpc.Code values Envoy reads from CheckResponse.status.
OK = 0
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16
UNAVAILABLE = 14

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def _rpc_code(status: int) -> int:
    if status == 401:
        return UNAUTHENTICATED
    if status == 503:
        return UNAVAILABLE
    return PERMISSION_DENIED


@lru_cache(maxsize=256)
def _denied(decision: Decision, realm: str) -> bytes:
    headers = [_header("content-type", "application/json"), _header("cache-control", "no-store")]
    challenge = decision.challenge(realm)
    if challenge is not None:
        headers.append(_header("www-authenticate", challenge))
    if decision.status == 503:
        headers.append(_header("retry-after", "5"))
    wire: bytes = pb.CheckResponse(
        status=status_pb2.Status(code=_rpc_code(decision.status), message=decision.reason),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),  # type: ignore[arg-type]
            headers=headers,
            body=decision.body(),
        ),
    ).SerializeToString()
    return wire


def render(decision: Decision, realm: str) -> bytes:
    """The serialized CheckResponse for a decision (built once per reusable decision)."""
    if not decision.allowed:
        return _denied(decision, realm)
    return decision.rendered("envoy", _allowed)


def _allowed(decision: Decision) -> bytes:
    ok = pb.OkHttpResponse(
        headers=[_header(name, value) for name, value in decision.headers_to_set],
        headers_to_remove=decision.headers_to_remove,
        query_parameters_to_remove=decision.query_params_to_remove,
    )
    response = pb.CheckResponse(status=status_pb2.Status(code=OK), ok_response=ok)
    if decision.metadata:
        metadata = Struct()
        metadata.update(decision.metadata)
        response.dynamic_metadata.CopyFrom(metadata)
    wire: bytes = response.SerializeToString()
    return wire
