"""lastguard's operator: watches JWTPolicy resources, writes their status, and
streams compiled policy snapshots to every sidecar.

Layering: `index` and `status` are pure (no kopf, no kubernetes client, no
grpc); `kube`, `leader`, `distribution` and `main` are the edges. Policies are
parsed with `lastguard.sidecar.policy.parse`, the same code the sidecar runs.
"""
