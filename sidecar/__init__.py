"""lastguard's sidecar: an Envoy ext_authz server that enforces JWTPolicy.

Layering: `policy`, `tokens`, `keys`, `extract`, `match`, `authenticator`,
`authorizer` and `decision` are the core (no grpc, no network); `response`
(gRPC) and `http_wire` (HTTP) turn decisions into each protocol's bytes, also
without I/O. `fetch`, `jwks_cache`, `server`, `http_server`, `reload`,
`workers` and `cli` are the edges that do I/O.
"""
