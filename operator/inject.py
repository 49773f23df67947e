"""Sidecar injection as a pure function: a Pod in, an RFC 6902 JSON patch out.

Purely data-manipulative: no aiohttp, no Kubernetes client, no I/O. The webhook
(`lastguard.operator.webhook`) parses the AdmissionReview and calls `decide`.

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
- Only a pod labelled `lastguard.dev/inject: "true"` is injected, and never in
  an excluded namespace; `ALWAYS_EXCLUDED` cannot be configured away.
- Idempotent: a pod that has a `lastguard` container gets no patch.
- A pod that asks for injection but cannot get a working one (bad annotation,
  port clash, host network, name clash) is refused with `InjectionRefused`: it
  is neither admitted unprotected nor patched into a pod that cannot start.
- Output is deterministic: the same pod and config give the same patch.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lastguard.operator.bootstrap import (
    CHECK_PORT,
    ENVOY_ADMIN_PORT,
    HTTP_CHECK_PORT,
    Protocol,
    envoy_bootstrap,
)
from lastguard.sidecar import podinfo
from lastguard.sidecar.errors import LastguardError

INJECT_LABEL = "lastguard.dev/inject"
#: A namespace labelled NAMESPACE_LABEL=NAMESPACE_ENABLED gets the CA bundle injected pods
#: mount (`ca_publisher`) and is selected by the webhook.
NAMESPACE_LABEL = "lastguard.dev/injection"
NAMESPACE_ENABLED = "enabled"
MODE_ANNOTATION = "lastguard.dev/mode"
PROTOCOL_ANNOTATION = "lastguard.dev/protocol"
APP_PORT_ANNOTATION = "lastguard.dev/app-port"
ENVOY_PORT_ANNOTATION = "lastguard.dev/envoy-port"
INJECTED_ANNOTATION = "lastguard.dev/injected"
STATUS_ANNOTATION = "lastguard.dev/status"

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
DEFAULT_APP_PORT = 8081
DEFAULT_ENVOY_PORT = 8080

#: The uid of distroless "nonroot". Both containers run as it: they write nothing but the
#: snapshot (in an emptyDir), so no image-specific user is needed.
NONROOT_UID = 65532
#: The Envoy our bootstrap is checked against. `command: [envoy]` skips the image's
#: entrypoint script, so the distroless variant works as well.
DEFAULT_ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.40.0"
#: Envoy starts one worker per host CPU unless told; a sidecar needs few.
ENVOY_CONCURRENCY = 2

E = TypeVar("E", bound=enum.StrEnum)

_PORT = re.compile(r"[1-9][0-9]{0,4}")


class Mode(enum.StrEnum):
    SIDECAR = "sidecar"
    ENVOY = "envoy"


class InjectionRefused(LastguardError):
    """The pod asks for injection but cannot be injected as it is; the message says why."""


class MalformedPod(LastguardError):
    """The object is not shaped like a Pod (the API server never sends one like it)."""


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


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one pod. `reason` is a stable word for logs and metrics."""

    patch: list[dict[str, Any]] | None
    reason: str  # injected | not-requested | already-injected | excluded-namespace
    mode: Mode | None = None
    warnings: tuple[str, ...] = ()


def patch_for(
    pod: Mapping[str, Any], namespace: str, config: InjectionConfig
) -> list[dict[str, Any]] | None:
    """The JSON patch that injects `pod`, or None when it must not be injected.

    Raises InjectionRefused or MalformedPod (see `decide`).
    """
    return decide(pod, namespace, config).patch


def decide(pod: Mapping[str, Any], namespace: str, config: InjectionConfig) -> Decision:
    """Whether and how to inject `pod`, created in `namespace`."""
    metadata = _mapping(pod, "metadata")
    labels = _mapping(metadata, "labels")
    annotations = _mapping(metadata, "annotations")
    spec = _mapping(pod, "spec")
    containers = _containers(spec, "containers")
    init_containers = _containers(spec, "initContainers")
    if not containers:
        raise MalformedPod("spec.containers: a pod needs at least one container")

    if labels.get(INJECT_LABEL) != "true":
        return Decision(None, "not-requested")
    if config.excludes(namespace):
        return Decision(None, "excluded-namespace")
    names = {c.get("name") for c in (*containers, *init_containers)}
    if SIDECAR_CONTAINER in names:
        return Decision(None, "already-injected")

    mode = _choice(annotations, MODE_ANNOTATION, config.default_mode)
    protocol = _choice(annotations, PROTOCOL_ANNOTATION, config.default_protocol)
    _refuse_clashes(spec, names, mode)
    app_port, envoy_port = _ports(annotations) if mode is Mode.ENVOY else (0, 0)
    _refuse_port_clashes((*containers, *init_containers), mode, envoy_port)

    new_containers = [_sidecar_container(config, protocol)]
    if mode is Mode.ENVOY:
        new_containers.append(_envoy_container(config, app_port, envoy_port, protocol))
    volumes = _volumes(config)
    status = {
        "mode": str(mode),
        "protocol": str(protocol),
        "containers": [c["name"] for c in new_containers],
        "volumes": [v["name"] for v in volumes],
    }
    new_annotations = {
        INJECTED_ANNOTATION: "true",
        STATUS_ANNOTATION: json.dumps(status, sort_keys=True, separators=(",", ":")),
    }
    patch = [{"op": "add", "path": "/spec/containers/-", "value": c} for c in new_containers]
    patch += _add_items(spec.get("volumes"), "/spec/volumes", volumes)
    patch += _add_entries(metadata, new_annotations)
    warnings = _probe_warnings(containers, app_port, envoy_port) if mode is Mode.ENVOY else ()
    return Decision(patch, "injected", mode, warnings)


# --- reading the pod -----------------------------------------------------------------------


def _mapping(parent: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedPod(f"{key}: expected an object, got {type(value).__name__}")
    return value


def _containers(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
        raise MalformedPod(f"spec.{key}: expected a list of containers")
    return value


def _choice(annotations: Mapping[str, Any], key: str, default: E) -> E:
    """The annotation `key` as a member of `default`'s enum; `default` when absent."""
    value = annotations.get(key)
    if value is None:
        return default
    kind = type(default)
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InjectionRefused(f"annotation {key}: {value!r} is not one of {allowed}") from None


def _port(annotations: Mapping[str, Any], key: str, default: int) -> int:
    value = annotations.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not _PORT.fullmatch(value) or int(value) > 65535:
        raise InjectionRefused(f"annotation {key}: {value!r} is not a port number (1-65535)")
    return int(value)


def _ports(annotations: Mapping[str, Any]) -> tuple[int, int]:
    app = _port(annotations, APP_PORT_ANNOTATION, DEFAULT_APP_PORT)
    envoy = _port(annotations, ENVOY_PORT_ANNOTATION, DEFAULT_ENVOY_PORT)
    if app == envoy:
        raise InjectionRefused(
            f"annotations {APP_PORT_ANNOTATION} and {ENVOY_PORT_ANNOTATION} are both {app}: "
            "Envoy and the app need different ports"
        )
    for key, port in ((APP_PORT_ANNOTATION, app), (ENVOY_PORT_ANNOTATION, envoy)):
        owner = _reserved_ports(Mode.ENVOY, 0).get(port)
        if owner is not None:
            raise InjectionRefused(f"annotation {key}: port {port} is taken by {owner}")
    return app, envoy


def _reserved_ports(mode: Mode, envoy_port: int) -> dict[int, str]:
    ports = {
        CHECK_PORT: "lastguard's ext_authz",
        HTTP_CHECK_PORT: "lastguard's HTTP ext_authz",
        METRICS_PORT: "lastguard's metrics",
        HEALTH_PORT: "lastguard's health checks",
    }
    if mode is Mode.ENVOY:
        ports[ENVOY_ADMIN_PORT] = "Envoy's admin API"
        if envoy_port:
            ports[envoy_port] = f"Envoy's listener ({ENVOY_PORT_ANNOTATION})"
    return ports


def _port_entries(container: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    ports = container.get("ports")
    return [p for p in ports if isinstance(p, Mapping)] if isinstance(ports, list) else []


def _declared_ports(container: Mapping[str, Any]) -> Iterator[int]:
    for port in _port_entries(container):
        if isinstance(port.get("containerPort"), int):
            yield port["containerPort"]


def _refuse_port_clashes(
    containers: tuple[Mapping[str, Any], ...], mode: Mode, envoy_port: int
) -> None:
    # All containers share the pod's network namespace: a second bind fails at start.
    reserved = _reserved_ports(mode, envoy_port)
    for container in containers:
        for port in _declared_ports(container):
            if port in reserved:
                raise InjectionRefused(
                    f"container {container.get('name')!r} declares port {port}, which "
                    f"{reserved[port]} needs in this pod"
                )


def _refuse_clashes(spec: Mapping[str, Any], names: set[Any], mode: Mode) -> None:
    if spec.get("hostNetwork") is True:
        raise InjectionRefused(
            "a pod on the host network cannot be injected: its loopback-only ext_authz "
            "port would be the node's"
        )
    if mode is Mode.ENVOY and ENVOY_CONTAINER in names:
        raise InjectionRefused(f"the pod already has a container named {ENVOY_CONTAINER!r}")
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise MalformedPod("spec.volumes: expected a list of volumes")
    taken = {v.get("name") for v in volumes if isinstance(v, Mapping)}
    clashes = [name for name in (PODINFO_VOLUME, CA_VOLUME, RUN_VOLUME) if name in taken]
    if clashes:
        raise InjectionRefused(f"the pod already has a volume named {clashes[0]!r}")


def _probe_warnings(
    containers: list[Mapping[str, Any]], app_port: int, envoy_port: int
) -> tuple[str, ...]:
    """Probes aimed at the app port: the kubelet calls the pod IP, where the app must not listen."""
    warnings = []
    for container in containers:
        named = {p.get("name"): p.get("containerPort") for p in _port_entries(container)}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if not isinstance(probe, Mapping):
                continue
            for action in ("httpGet", "tcpSocket", "grpc"):
                target = probe.get(action)
                port = target.get("port") if isinstance(target, Mapping) else None
                if isinstance(port, str):
                    port = named.get(port)
                if port == app_port:
                    warnings.append(
                        f"container {container.get('name')}: {kind} targets the app port "
                        f"{app_port}; probe the Envoy port {envoy_port} instead"
                    )
    return tuple(warnings)


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


def _sidecar_container(config: InjectionConfig, protocol: Protocol) -> dict[str, Any]:
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


def _envoy_container(
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


def _volumes(config: InjectionConfig) -> list[dict[str, Any]]:
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


# --- JSON patch ----------------------------------------------------------------------------


def escape_pointer(token: str) -> str:
    """One JSON Pointer reference token (RFC 6901): `~` is `~0`, `/` is `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def _add_items(existing: Any, path: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(existing, list):
        return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]
    return [{"op": "add", "path": path, "value": items}]  # absent or null: create the list


def _add_entries(metadata: Mapping[str, Any], entries: dict[str, str]) -> list[dict[str, Any]]:
    # metadata exists: the pod has the inject label.
    if isinstance(metadata.get("annotations"), Mapping):
        return [
            {"op": "add", "path": f"/metadata/annotations/{escape_pointer(k)}", "value": v}
            for k, v in entries.items()
        ]
    return [{"op": "add", "path": "/metadata/annotations", "value": dict(entries)}]
