"""lastguard's sidecar: an Envoy ext_authz server that enforces JWTPolicy.

Layering: `policy`, `tokens`, `keys`, `extract`, `match`, `authenticator` and
`authorizer` are the core (no grpc, no network); `fetch`, `jwks_cache`,
`server`, `reload` and `cli` are the edges that do I/O.
"""
