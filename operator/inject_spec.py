"""What sidecar injection adds to a pod, and the settings it is built from.

Pure data: no aiohttp, no Kubernetes client, no I/O. `lastguard.operator.inject`
decides whether and how a pod is injected and calls this module for the
containers and volumes it adds.

What a pod gets:

- `sidecar` mode (default; for Istio, or a pod that already runs its own Envoy):
  the `lastguard` container, with ext_authz on 127.0.0.1:9191 (loopback only),
  metrics on :9090 and HTTP health on :9091 (`/readyz` is 200 once policies
  are loaded, `/healthz` while the process runs; the kubelet probes the pod IP,
  so the probes cannot use the loopback-only gRPC port).
- `envoy` mode: the above plus `lastguard-envoy`, an Envoy whose bootstrap is
  generated per pod (`bootstrap.envoy_bootstrap`, the shipped
  manifests/envoy/envoy-sidecar.yaml with the pod's ports) and passed with
  `--config-yaml`, so no per-namespace ConfigMap is needed. Envoy listens on
  `lastguard.dev/envoy-port` (8080) and forwards to the app on
  127.0.0.1:`lastguard.dev/app-port` (8081). The Service must target the
  Envoy port, and the app must listen on 127.0.0.1 only.
- `lastguard.dev/protocol: http` (or the webhook's `--inject-default-protocol`)
  makes Envoy ask over HTTP (docs/http-mode.md): the sidecar also listens on
  127.0.0.1:9192, and envoy mode uses manifests/envoy/envoy-sidecar-http.yaml.
- Volumes `lastguard-podinfo` (downward API, the layout `lastguard.sidecar.podinfo`
  reads), `lastguard-ca` (ConfigMap `lastguard-ca`, which must exist in the pod's
  namespace) and `lastguard-run` (memory emptyDir for the policy snapshot).

Invariants:
- Both containers run as the non-root uid 65532 with a read-only root filesystem,
  no privilege escalation and no capabilities, as the restricted Pod Security
  Standard asks.
- Deterministic: the same settings give the same containers and volumes.
- `ALWAYS_EXCLUDED` cannot be configured away: `InjectionConfig.excludes` only adds to it.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from lastguard.operator.bootstrap import CHECK_PORT, HTTP_CHECK_PORT, Protocol, envoy_bootstrap
from lastguard.sidecar import podinfo

#: Never injected, whatever the flags or the webhook's namespaceSelector say:
#: a broken injection there could stop the cluster itself from running pods.
ALWAYS_EXCLUDED = frozenset({"kube-system", "kube-public", "kube-node-lease"})

SIDECAR_CONTAINER = "lastguard"
ENVOY_CONTAINER = "lastguard-envoy"
PODINFO_VOLUME = "lastguard-podinfo"
CA_VOLUME = "lastguard-ca"
RUN_VOLUME = "lastguard-run"

PODINFO_DIR = "/etc/lastguard/podinfo"
CA_DIR = "/etc/lastguard/ca"
CA_FILE = "ca.crt"  # the file name in CA_DIR, whatever the ConfigMap key
RUN_DIR = "/var/run/lastguard"
SNAPSHOT_FILE = f"{RUN_DIR}/snapshot.json"

METRICS_PORT = 9090
HEALTH_PORT = 9091

#: The uid of distroless "nonroot". Both containers run as it: they write nothing but the
#: snapshot (in an emptyDir), so no image-specific user is needed.
NONROOT_UID = 65532
#: The Envoy our bootstrap is checked against. `command: [envoy]` skips the image's
#: entrypoint script, so the distroless variant works as well.
DEFAULT_ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.40.0"
#: Envoy starts one worker per host CPU unless told; a sidecar needs few.
ENVOY_CONCURRENCY = 2


# --- settings ------------------------------------------------------------------------------


class Mode(enum.StrEnum):
    """Which containers a pod gets: `sidecar` adds lastguard; `envoy` adds an Envoy too."""

    SIDECAR = "sidecar"
    ENVOY = "envoy"


@dataclass(frozen=True, slots=True)
class Resources:
    """A container's requests and limits; an empty string leaves the field out."""

    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"

    def as_dict(self) -> dict[str, dict[str, str]]:
        requests = {"cpu": self.cpu_request, "memory": self.memory_request}
        limits = {"memory": self.memory_limit}
        out = {
            "requests": {k: v for k, v in requests.items() if v},
            "limits": {k: v for k, v in limits.items() if v},
        }
        return {k: v for k, v in out.items() if v}


@dataclass(frozen=True, slots=True)
class InjectionConfig:
    """The webhook's injection settings, built once from its flags (`webhook.config_from`)."""

    image: str
    policy_server: str  # e.g. lastguard-operator.lastguard-system.svc:15010
    image_pull_policy: str = "IfNotPresent"
    ca_configmap: str = "lastguard-ca"
    ca_key: str = "ca.crt"
    envoy_image: str = DEFAULT_ENVOY_IMAGE
    resources: Resources = field(default_factory=Resources)
    envoy_resources: Resources = field(default_factory=Resources)
    default_mode: Mode = Mode.SIDECAR
    #: How Envoy asks lastguard unless the pod's `lastguard.dev/protocol` says otherwise.
    default_protocol: Protocol = Protocol.GRPC
    log_level: str = "info"
    #: Added to ALWAYS_EXCLUDED (put the operator's own namespace here).
    excluded_namespaces: frozenset[str] = frozenset()

    def excludes(self, namespace: str) -> bool:
        return namespace in ALWAYS_EXCLUDED or namespace in self.excluded_namespaces


# --- what is added -------------------------------------------------------------------------


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": NONROOT_UID,
        "runAsGroup": NONROOT_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def sidecar_args(config: InjectionConfig, protocol: Protocol = Protocol.GRPC) -> list[str]:
    """The arguments of the injected container's `lastguard` command.

    gRPC is always served (its health service too); `Protocol.HTTP` adds the HTTP
    ext_authz listener on 127.0.0.1:9192.
    """
    http = ["--http-listen", f"127.0.0.1:{HTTP_CHECK_PORT}"] if protocol is Protocol.HTTP else []
    return [
        "--log-level",
        config.log_level,
        "sidecar",
        "--policy-server",
        config.policy_server,
        "--policy-server-ca",
        f"{CA_DIR}/{CA_FILE}",
        "--pod-info-dir",
        PODINFO_DIR,
        "--snapshot-file",
        SNAPSHOT_FILE,
        "--listen",
        f"127.0.0.1:{CHECK_PORT}",
        "--metrics-listen",
        f"0.0.0.0:{METRICS_PORT}",
        "--health-listen",
        f"0.0.0.0:{HEALTH_PORT}",
        *http,
    ]


def sidecar_container(config: InjectionConfig, protocol: Protocol) -> dict[str, Any]:
    return {
        "name": SIDECAR_CONTAINER,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["lastguard"],  # whatever the image's entrypoint
        "args": sidecar_args(config, protocol),
        "ports": [
            {"name": "lg-metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "lg-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        # Ready once a policy set is loaded (until then every Check is a 503), so the
        # pod gets no traffic before it can be protected.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": HEALTH_PORT},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        # Alive while the process answers: an unreachable operator must not restart
        # sidecars that enforce their stored snapshot.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": HEALTH_PORT},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": config.resources.as_dict(),
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True},
            {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True},
            {"name": RUN_VOLUME, "mountPath": RUN_DIR},
        ],
    }


def envoy_args(
    config: InjectionConfig, app_port: int, envoy_port: int, protocol: Protocol = Protocol.GRPC
) -> list[str]:
    """The Envoy command line of the injected container (after `envoy`)."""
    bootstrap = json.dumps(envoy_bootstrap(app_port, envoy_port, protocol), separators=(",", ":"))
    return [
        "--config-yaml",
        bootstrap,  # JSON is YAML
        "--concurrency",
        str(ENVOY_CONCURRENCY),
        # Nothing to hand over between Envoys in one container; no shared memory needed.
        "--disable-hot-restart",
        "--log-level",
        config.log_level,  # lastguard's levels (debug, info, warning, error) are Envoy's too
    ]


def envoy_container(
    config: InjectionConfig, app_port: int, envoy_port: int, protocol: Protocol
) -> dict[str, Any]:
    # The admin API stays on loopback, so the probes can only see that the listener accepts.
    listening = {"tcpSocket": {"port": envoy_port}}
    return {
        "name": ENVOY_CONTAINER,
        "image": config.envoy_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["envoy"],
        "args": envoy_args(config, app_port, envoy_port, protocol),
        "ports": [{"name": "lg-http", "containerPort": envoy_port, "protocol": "TCP"}],
        "readinessProbe": {**listening, "periodSeconds": 2, "timeoutSeconds": 1},
        "livenessProbe": {**listening, "periodSeconds": 10, "timeoutSeconds": 2},
        "resources": config.envoy_resources.as_dict(),
        "securityContext": _security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def volumes(config: InjectionConfig) -> list[dict[str, Any]]:
    downward = [
        {"path": podinfo.NAMESPACE_FILE, "fieldRef": {"fieldPath": "metadata.namespace"}},
        {"path": podinfo.LABELS_FILE, "fieldRef": {"fieldPath": "metadata.labels"}},
        {"path": podinfo.NAME_FILE, "fieldRef": {"fieldPath": "metadata.name"}},
    ]
    return [
        {"name": PODINFO_VOLUME, "downwardAPI": {"items": downward}},
        # Not optional: without the CA the sidecar cannot trust the operator, so the
        # kubelet holds the pod in ContainerCreating (with an event) until it exists.
        {
            "name": CA_VOLUME,
            "configMap": {
                "name": config.ca_configmap,
                "items": [{"key": config.ca_key, "path": CA_FILE}],
            },
        },
        {"name": RUN_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
