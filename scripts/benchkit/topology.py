"""What is measured: the policy lastguard enforces and Envoy's listeners, one per variant.

Pure functions from keys and ports to configuration: the policy is shaped like
a real API's, and every listener answers 200 itself (`direct_response`), so no
upstream app can be the bottleneck, after the auth filter its variant names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from benchkit import plan, tokens
from lastguard.sidecar import devissuer
from tests.support import envoy_config


def bench_policy(jwks_json: str, partner: devissuer.DevIssuer, jobs: devissuer.DevIssuer) -> Any:
    """A JWTPolicy shaped like a real API's: three issuers, thirteen rules, claim headers."""
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "orders-api", "namespace": "shop"},
        "spec": {
            "issuers": [
                {
                    "issuer": tokens.ISSUER,
                    "jwks": jwks_json,
                    "audiences": [tokens.AUDIENCE],
                    "algorithms": list(tokens.ALGORITHMS),
                    "maxLifetimeSeconds": tokens.TOKEN_LIFETIME + 86_400,
                    "outputClaimToHeaders": [
                        {"header": "x-user", "claim": "sub"},
                        {"header": "x-groups", "claim": "groups"},
                        {"header": "x-tenant", "claim": "org.tenant"},
                    ],
                },
                {
                    "issuer": partner.url,
                    "jwks": json.dumps(partner.jwks()),
                    "audiences": ["orders-partner"],
                    "algorithms": ["ES256"],
                    "fromHeaders": [{"name": "x-partner-token"}],
                    "outputClaimToHeaders": [{"header": "x-partner", "claim": "sub"}],
                },
                {
                    "issuer": jobs.url,
                    "jwks": json.dumps(jobs.jwks()),
                    "audiences": [tokens.AUDIENCE],
                    "algorithms": ["EdDSA"],
                    "outputClaimToHeaders": [{"header": "x-service", "claim": "sub"}],
                },
            ],
            "rules": [
                {"paths": ["/healthz", "/readyz"], "action": "Allow"},
                {"paths": ["/metrics"], "action": "Allow"},
                {"paths": ["/admin/*", "/debug/*"], "action": "Deny"},
                {"paths": ["/public/*"], "action": "Optional"},
                {"paths": ["/api/orders/*"], "methods": ["GET"], "requiredScopes": ["orders.read"]},
                {
                    "paths": ["/api/orders/*"],
                    "methods": ["POST", "PUT", "DELETE"],
                    "requiredScopes": ["orders.write"],
                    "requiredClaims": [{"claim": "groups", "values": ["buyers", "admins"]}],
                },
                {
                    "paths": ["/api/payments/*"],
                    "requiredScopes": ["payments.write"],
                    "requiredClaims": [{"claim": "groups", "values": ["finance"]}],
                },
                {"paths": ["/api/users/*"], "methods": ["GET"], "requiredScopes": ["users.read"]},
                {
                    "paths": ["/api/users/*"],
                    "methods": ["PUT", "PATCH", "DELETE"],
                    "requiredScopes": ["users.write"],
                },
                {
                    "paths": ["/api/reports/*"],
                    "requiredClaims": [{"claim": "org.tenant", "values": ["acme", "globex"]}],
                },
                {"paths": ["/api/partners/*"], "requiredScopes": ["partner.orders"]},
                {"paths": ["/api/*"], "methods": ["GET", "HEAD"], "requiredScopes": ["api.read"]},
                {"paths": ["/api/*"], "requiredScopes": ["api.write"]},
            ],
            "defaultAction": "Deny",
        },
    }


def _direct_response_listener(
    name: str, http_filters: Sequence[Mapping[str, Any]], clusters: Sequence[dict[str, Any]] = ()
) -> envoy_config.ListenerSpec:
    """The tests' listener, answering 200 itself instead of routing to an app.

    The auth filters still run before the router, which sends the direct
    response; so no upstream can be the bottleneck. The access log goes too:
    a line per request would be measured along with the filters.
    """
    listener = envoy_config.http_listener(name, http_filters)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["access_log"]
    hcm["route_config"]["virtual_hosts"][0]["routes"] = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
        }
    ]
    return envoy_config.ListenerSpec(name=name, listener=listener, clusters=tuple(clusters))


def bench_listeners(jwks_json: str, ports: Mapping[str, int]) -> list[envoy_config.ListenerSpec]:
    """Envoy's listeners, one per variant; `ports` maps each ext_authz variant to its server's
    port (gRPC for `lastguard` and `noop`, HTTP for the `_http` variants)."""
    authz = [authz_listener(variant, ports[variant]) for variant in plan.SERVER_OF]
    return [
        _direct_response_listener("none", []),
        _direct_response_listener(
            "jwt_authn",
            [
                envoy_config.jwt_authn_filter(
                    issuer=tokens.ISSUER,
                    audiences=[tokens.AUDIENCE],
                    local_jwks=jwks_json,
                    claim_to_headers=[("x-user", "sub"), ("x-tenant", "org.tenant")],
                )
            ],
        ),
        *authz,
    ]


def authz_listener(variant: str, port: int) -> envoy_config.ListenerSpec:
    """The listener of one ext_authz variant (`lastguard`, `noop`, ...), its server on `port`."""
    protocol = plan.PROTOCOL_OF[variant]
    return _direct_response_listener(
        variant,
        [envoy_config.ext_authz_filter(authz_cluster=variant, timeout="2s", protocol=protocol)],
        [envoy_config.static_cluster(variant, port, http2=protocol == "grpc")],
    )
