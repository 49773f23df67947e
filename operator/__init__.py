"""lastguard's operator: watches JWTPolicy resources, writes their status, and
streams compiled policy snapshots to every sidecar.

Layering: `index`, `status` and `inject` are pure (no kopf, no kubernetes
client, no grpc), as are the rules inside `ca_publisher`; `kube`, `leader`,
`controller`, `distribution`, `webhook`, the publisher and `main` are the edges. Policies are
parsed with `lastguard.sidecar.policy.parse`, the same code the sidecar runs.
"""
