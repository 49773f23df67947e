"""Pods and AdmissionReviews as the API server sends them, and checks on patched pods.

`api_server_pod()` is a Deployment's pod the way a mutating webhook sees it:
after defaulting and after the built-in admission plugins (the ServiceAccount
plugin has added the `kube-api-access-*` volume and mount), with
`generateName` and no name yet. `review()` wraps a pod in an
`admission.k8s.io/v1` AdmissionReview request, every field the API server fills.

`apply()` applies a JSON patch with the `jsonpatch` library (an independent
RFC 6902 implementation), and `problems()` lists what `kubernetes_validate`'s
schemas cannot see but the API server's validation rejects.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import jsonpatch
import kubernetes_validate

K8S_VERSION = "1.30"  # the oldest Kubernetes lastguard supports
SA_VOLUME = "kube-api-access-x7k2p"

_IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def api_server_pod(
    *,
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    service_account_volume: bool = True,
    app_port: int = 8081,
    **spec: Any,
) -> dict[str, Any]:
    """A defaulted pod of Deployment `orders`; `labels`/`annotations` None leaves the key out."""
    metadata: dict[str, Any] = {
        "generateName": "orders-7d9f8c6b5-",
        "namespace": namespace,
        "creationTimestamp": None,
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "orders-7d9f8c6b5",
                "uid": "0b6a3f1e-2c8d-4e4b-9a57-6f0e1d2c3b4a",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    app: dict[str, Any] = {
        "name": "orders",
        "image": "registry.example.com/shop/orders:1.4.2",
        "ports": [{"name": "http", "containerPort": app_port, "protocol": "TCP"}],
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }
    pod_spec: dict[str, Any] = {
        "containers": [app],
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 30,
        "dnsPolicy": "ClusterFirst",
        "serviceAccountName": "default",
        "serviceAccount": "default",
        "securityContext": {},
        "schedulerName": "default-scheduler",
        "tolerations": [
            {
                "key": "node.kubernetes.io/not-ready",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
            {
                "key": "node.kubernetes.io/unreachable",
                "operator": "Exists",
                "effect": "NoExecute",
                "tolerationSeconds": 300,
            },
        ],
        "priority": 0,
        "enableServiceLinks": True,
        "preemptionPolicy": "PreemptLowerPriority",
    }
    if service_account_volume:
        pod_spec["volumes"] = [
            {
                "name": SA_VOLUME,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        ]
        app["volumeMounts"] = [
            {
                "name": SA_VOLUME,
                "readOnly": True,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
            }
        ]
    pod_spec.update(spec)
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": pod_spec, "status": {}}


def review(
    obj: dict[str, Any] | None,
    *,
    namespace: str = "shop",
    operation: str = "CREATE",
    kind: tuple[str, str, str] = ("", "v1", "Pod"),
    resource: tuple[str, str, str] = ("", "v1", "pods"),
    sub_resource: str | None = None,
    dry_run: bool = False,
    uid: str | None = None,
) -> dict[str, Any]:
    """An AdmissionReview v1 request as kube-apiserver sends it to a mutating webhook."""
    group, version, kind_name = kind
    request: dict[str, Any] = {
        "uid": uid or str(uuid.uuid4()),
        "kind": {"group": group, "version": version, "kind": kind_name},
        "resource": dict(zip(("group", "version", "resource"), resource, strict=True)),
        "requestKind": {"group": group, "version": version, "kind": kind_name},
        "requestResource": dict(zip(("group", "version", "resource"), resource, strict=True)),
        "namespace": namespace,
        "operation": operation,
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "uid": "5a0f7c8e-1111-4a3b-8c9d-0e1f2a3b4c5d",
            "groups": [
                "system:serviceaccounts",
                "system:serviceaccounts:kube-system",
                "system:authenticated",
            ],
        },
        "object": obj,
        "oldObject": None,
        "dryRun": dry_run,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    }
    if sub_resource is not None:
        request["subResource"] = sub_resource
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}


def decode_patch(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch in an AdmissionReview response (which must say JSONPatch)."""
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(patch, list)
    return patch


def apply(pod: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """`pod` with `patch` applied (RFC 6902, strictly); `pod` itself is left alone."""
    return jsonpatch.apply_patch(copy.deepcopy(pod), patch)  # type: ignore[no-any-return]


def validate(pod: dict[str, Any]) -> None:
    """Raises AssertionError (short message) when the schema of K8S_VERSION rejects `pod`."""
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(str(exc).split("\n", 1)[0]) from None


def _all_containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers") or []
    yield from spec["containers"]


def problems(pod: dict[str, Any]) -> list[str]:
    """What the API server's own validation (beyond the schema) would reject."""
    spec = pod["spec"]
    found: list[str] = []
    names = [c["name"] for c in _all_containers(spec)]
    if len(names) != len(set(names)):
        found.append(f"duplicate container names: {names}")
    volumes = [v["name"] for v in spec.get("volumes") or []]
    if len(volumes) != len(set(volumes)):
        found.append(f"duplicate volume names: {volumes}")
    port_names: list[str] = []
    for container in _all_containers(spec):
        named = {}
        for port in container.get("ports") or []:
            if "name" in port:
                port_names.append(port["name"])
                named[port["name"]] = port["containerPort"]
                if len(port["name"]) > 15 or not _IANA_SVC_NAME.fullmatch(port["name"]):
                    found.append(f"{container['name']}: bad port name {port['name']!r}")
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                found.append(f"{container['name']}: mounts unknown volume {mount['name']!r}")
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind) or {}
            for action in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(action) or {}).get("port")
                if isinstance(port, str) and port not in named:
                    found.append(f"{container['name']}: {kind} names unknown port {port!r}")
                if isinstance(port, int) and not 0 < port < 65536:
                    found.append(f"{container['name']}: {kind} port {port} out of range")
    if len(port_names) != len(set(port_names)):
        found.append(f"duplicate port names: {port_names}")
    return found


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [c for c in pod["spec"]["containers"] if c["name"] == name]
    assert len(matches) == 1, f"expected one container {name!r}, got {len(matches)}"
    return matches[0]


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        v for v in pod["spec"].get("volumes") or [] if v["name"] == name
    ]
    assert len(matches) == 1, f"expected one volume {name!r}, got {len(matches)}"
    return matches[0]
