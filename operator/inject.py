"""Sidecar injection as a pure function: a Pod in, an RFC 6902 JSON patch out.

Purely data-manipulative: no aiohttp, no Kubernetes client, no I/O. The webhook
(`lastguard.operator.webhook`) parses the AdmissionReview and calls `decide`.

What the patch adds, and the settings it is built from (`InjectionConfig`), live
in `lastguard.operator.inject_spec`; this module reads the pod (its label,
annotations, containers, ports and volumes), decides, and writes the patch.

Invariants:
- Only a pod labelled `lastguard.dev/inject: "true"` is injected, and never in
  an excluded namespace; `inject_spec.ALWAYS_EXCLUDED` cannot be configured away.
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
from dataclasses import dataclass
from typing import Any, TypeVar

# By its full name, so the purity check (tests/unit/test_inject.py) sees which module.
import lastguard.operator.inject_spec as inject_spec
from lastguard.operator.bootstrap import CHECK_PORT, ENVOY_ADMIN_PORT, HTTP_CHECK_PORT
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

DEFAULT_APP_PORT = 8081
DEFAULT_ENVOY_PORT = 8080

E = TypeVar("E", bound=enum.StrEnum)

_PORT = re.compile(r"[1-9][0-9]{0,4}")


class InjectionRefused(LastguardError):
    """The pod asks for injection but cannot be injected as it is; the message says why."""


class MalformedPod(LastguardError):
    """The object is not shaped like a Pod (the API server never sends one like it)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one pod. `reason` is a stable word for logs and metrics."""

    patch: list[dict[str, Any]] | None
    reason: str  # injected | not-requested | already-injected | excluded-namespace
    mode: inject_spec.Mode | None = None
    warnings: tuple[str, ...] = ()


def patch_for(
    pod: Mapping[str, Any], namespace: str, config: inject_spec.InjectionConfig
) -> list[dict[str, Any]] | None:
    """The JSON patch that injects `pod`, or None when it must not be injected.

    Raises InjectionRefused or MalformedPod (see `decide`).
    """
    return decide(pod, namespace, config).patch


def decide(pod: Mapping[str, Any], namespace: str, config: inject_spec.InjectionConfig) -> Decision:
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
    if inject_spec.SIDECAR_CONTAINER in names:
        return Decision(None, "already-injected")

    mode = _choice(annotations, MODE_ANNOTATION, config.default_mode)
    protocol = _choice(annotations, PROTOCOL_ANNOTATION, config.default_protocol)
    _refuse_clashes(spec, names, mode)
    app_port, envoy_port = _ports(annotations) if mode is inject_spec.Mode.ENVOY else (0, 0)
    _refuse_port_clashes((*containers, *init_containers), mode, envoy_port)

    new_containers = [inject_spec.sidecar_container(config, protocol)]
    if mode is inject_spec.Mode.ENVOY:
        new_containers.append(inject_spec.envoy_container(config, app_port, envoy_port, protocol))
    volumes = inject_spec.volumes(config)
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
    warnings = (
        _probe_warnings(containers, app_port, envoy_port) if mode is inject_spec.Mode.ENVOY else ()
    )
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
        owner = _reserved_ports(inject_spec.Mode.ENVOY, 0).get(port)
        if owner is not None:
            raise InjectionRefused(f"annotation {key}: port {port} is taken by {owner}")
    return app, envoy


def _reserved_ports(mode: inject_spec.Mode, envoy_port: int) -> dict[int, str]:
    ports = {
        CHECK_PORT: "lastguard's ext_authz",
        HTTP_CHECK_PORT: "lastguard's HTTP ext_authz",
        inject_spec.METRICS_PORT: "lastguard's metrics",
        inject_spec.HEALTH_PORT: "lastguard's health checks",
    }
    if mode is inject_spec.Mode.ENVOY:
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
    containers: tuple[Mapping[str, Any], ...], mode: inject_spec.Mode, envoy_port: int
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


def _refuse_clashes(spec: Mapping[str, Any], names: set[Any], mode: inject_spec.Mode) -> None:
    if spec.get("hostNetwork") is True:
        raise InjectionRefused(
            "a pod on the host network cannot be injected: its loopback-only ext_authz "
            "port would be the node's"
        )
    if mode is inject_spec.Mode.ENVOY and inject_spec.ENVOY_CONTAINER in names:
        raise InjectionRefused(
            f"the pod already has a container named {inject_spec.ENVOY_CONTAINER!r}"
        )
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise MalformedPod("spec.volumes: expected a list of volumes")
    taken = {v.get("name") for v in volumes if isinstance(v, Mapping)}
    ours = (inject_spec.PODINFO_VOLUME, inject_spec.CA_VOLUME, inject_spec.RUN_VOLUME)
    clashes = [name for name in ours if name in taken]
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
