"""The Envoy bootstrap an `envoy`-mode pod gets: the shipped files, with the pod's ports. Pure.

`Protocol.GRPC` gives manifests/envoy/envoy-sidecar.yaml (ext_authz over gRPC to
127.0.0.1:9191), `Protocol.HTTP` manifests/envoy/envoy-sidecar-http.yaml (over
HTTP to 127.0.0.1:9192, lastguard's HTTP mode, docs/http-mode.md). Why each
setting is there is written in those files; tests/unit/test_inject.py pins
that the defaults give exactly them.
"""

from __future__ import annotations

import enum
from typing import Any

CHECK_PORT = 9191  # ext_authz gRPC, 127.0.0.1 only
HTTP_CHECK_PORT = 9192  # ext_authz HTTP, 127.0.0.1 only
ENVOY_ADMIN_PORT = 9901  # 127.0.0.1 only
#: lastguard's HTTP-mode contract with Envoy (docs/http-mode.md).
_HTTP_MODE_HEADERS = {"patterns": [{"exact": "cookie"}, {"prefix": "x-"}]}


class Protocol(enum.StrEnum):
    """How Envoy asks lastguard: gRPC (the default) or HTTP (cheaper, docs/http-mode.md)."""

    GRPC = "grpc"
    HTTP = "http"


def _ext_authz(protocol: Protocol) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
    }
    if protocol is Protocol.GRPC:
        config["grpc_service"] = {"envoy_grpc": {"cluster_name": "lastguard"}, "timeout": "1s"}
    else:
        config["http_service"] = {
            "server_uri": {
                "uri": f"http://127.0.0.1:{HTTP_CHECK_PORT}",
                "cluster": "lastguard",
                "timeout": "1s",
            },
            "authorization_request": {"allowed_headers": _HTTP_MODE_HEADERS},
            "authorization_response": {"allowed_upstream_headers": _HTTP_MODE_HEADERS},
        }
    config["failure_mode_allow"] = False
    config["status_on_error"] = {"code": "ServiceUnavailable"}
    if protocol is Protocol.GRPC:
        config["include_peer_certificate"] = True
    return config


def envoy_bootstrap(
    app_port: int, envoy_port: int, protocol: Protocol = Protocol.GRPC
) -> dict[str, Any]:
    """The shipped bootstrap for `protocol` with the pod's ports (why each setting: see the
    files). tests/unit/test_inject.py pins that the defaults give exactly the shipped files.
    """

    def address(host: str, port: int) -> dict[str, Any]:
        return {"socket_address": {"address": host, "port_value": port}}

    def static_cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
        endpoint = {"endpoint": {"address": address("127.0.0.1", port)}}
        return {
            "name": name,
            "type": "STATIC",
            **extra,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        }

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        "use_remote_address": True,
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
                    ".StdoutAccessLog"
                },
            }
        ],
        "route_config": {
            "name": "app",
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ],
        },
        "http_filters": [
            {"name": "envoy.filters.http.ext_authz", "typed_config": _ext_authz(protocol)},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    authz_options = {
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                ".HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    }
    return {
        "admin": {"address": address("127.0.0.1", ENVOY_ADMIN_PORT)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": address("0.0.0.0", envoy_port),  # noqa: S104
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                static_cluster("app", app_port, connect_timeout="1s"),
                static_cluster("lastguard", CHECK_PORT, connect_timeout="0.25s", **authz_options)
                if protocol is Protocol.GRPC
                else static_cluster("lastguard", HTTP_CHECK_PORT, connect_timeout="0.25s"),
            ],
        },
    }
