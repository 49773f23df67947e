"""The Helm chart (charts/lastguard), rendered offline as `helm install` would render it.

Rendering goes through scripts/render_manifests.py (helm-python-sdk: Helm's own
engine, no binary, no cluster), the same code that writes manifests/install.yaml.
Each documented mode is rendered and every object checked:

- built-in kinds validate against Kubernetes' OpenAPI schemas (kubernetes_validate,
  strict: unknown fields are errors) for 1.30 and the newest version it ships;
  the few third-party kinds (cert-manager, prometheus-operator, Istio) have no
  schema there and are checked field by field in their own tests;
- RBAC is exactly the set of rules the operator's calls need;
- every container runs non-root, read-only, without privileges or capabilities;
- the webhook never touches system namespaces or lastguard's own;
- the operator's arguments are flags `lastguard operator` defines;
- values.schema.json refuses bad values, so `helm install` fails on them;
- manifests/install.yaml and the chart's CRD copy are what a fresh render gives;
- `helm upgrade` keeps generated certificates: `lookup` is served by a fake API
  server on 127.0.0.1 that knows Secrets only;
- the Istio samples (manifests/samples/istio/) agree with the chart and the injector.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "lastguard"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


render_manifests = _load_script("render_manifests")

K8S_VERSIONS = sorted({"1.30", kubernetes_validate.latest_version()})
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
CA_PEM = """-----BEGIN CERTIFICATE-----
MIIBdzCCAR2gAwIBAgIUJ2o7cB5GvSxWb1ZQ1nq8c8q3ZkQwCgYIKoZIzj0EAwIw
-----END CERTIFICATE-----
"""

# Kinds without a schema in kubernetes_validate: CRDs of other projects. Each is
# checked by the test named here.
THIRD_PARTY_KINDS = {
    ("cert-manager.io/v1", "Issuer"): "test_cert_manager_mode",
    ("cert-manager.io/v1", "Certificate"): "test_cert_manager_mode",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "test_service_monitor",
    ("networking.istio.io/v1", "ServiceEntry"): "test_istio_mode",
    ("security.istio.io/v1", "AuthorizationPolicy"): "test_istio_mode",
}

ISTIO = {
    "istio": {
        "enabled": True,
        "authorizationPolicies": [
            {"name": "orders", "namespace": "shop", "selector": {"matchLabels": {"app": "orders"}}},
            {"name": "catalog", "namespace": "shop", "rules": [{"to": [{"operation": {}}]}]},
        ],
    }
}
EXISTING_SECRET = {
    "tls": {"mode": "existingSecret", "existingSecret": {"name": "my-tls", "caBundle": CA_PEM}}
}

# Every documented mode, with the values that select it.
MODES = [
    pytest.param({}, id="defaults"),
    pytest.param({"tls": {"mode": "generate"}}, id="tls-generate"),
    pytest.param(EXISTING_SECRET, id="tls-existing-secret"),
    pytest.param({"tls": {"mode": "certManager"}}, id="tls-cert-manager"),
    pytest.param(
        {
            "tls": {
                "mode": "certManager",
                "certManager": {"issuerRef": {"name": "corp", "kind": "ClusterIssuer"}},
            }
        },
        id="tls-cert-manager-own-issuer",
    ),
    pytest.param(ISTIO, id="istio"),
    pytest.param({"metrics": {"serviceMonitor": {"enabled": True}}}, id="service-monitor"),
    pytest.param({"replicas": 1}, id="one-replica"),
    pytest.param({"replicas": 1, "leaderElection": {"enabled": False}}, id="no-leader-election"),
    pytest.param({"caBundle": {"publish": False}}, id="no-ca-publish"),
    pytest.param({"webhook": {"enabled": False}}, id="no-webhook"),
    pytest.param({"metrics": {"enabled": False}}, id="no-metrics"),
    pytest.param({"watchNamespaces": ["shop", "batch"]}, id="watch-namespaces"),
    pytest.param({"image": {"digest": "sha256:" + "a" * 64}}, id="image-digest"),
]


@functools.cache
def _render(values_json: str, release: str, namespace: str) -> Any:
    return render_manifests.render_chart(
        json.loads(values_json), release=release, namespace=namespace
    )


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = "lastguard",
    namespace: str = "lastguard-system",
) -> Any:
    return _render(json.dumps(values or {}, sort_keys=True), release, namespace)


def only(rendered: Any, kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = rendered.find(kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(rendered: Any) -> dict[str, Any]:
    containers: list[dict[str, Any]] = only(rendered, "Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


def flags(rendered: Any) -> dict[str, list[str]]:
    """The operator's `--name=value` arguments after the `operator` subcommand, by name."""
    args = operator_container(rendered)["args"]
    assert args[:2] == ["--log-level=info", "operator"]
    out: dict[str, list[str]] = {}
    for arg in args[2:]:
        name, _, value = arg.partition("=")
        out.setdefault(name, []).append(value)
    return out


def pod_templates(rendered: Any) -> list[dict[str, Any]]:
    kinds = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
    return [o["spec"]["template"] for o in rendered.objects if o["kind"] in kinds]


# --- every object ----------------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS, ids=lambda v: f"k8s-{v}")
@pytest.mark.parametrize("values", MODES)
def test_every_object_is_a_valid_kubernetes_object(
    values: dict[str, Any], k8s_version: str
) -> None:
    rendered = render(values)
    assert rendered.objects
    for obj in [*rendered.objects, *(m.obj for m in rendered.crds)]:
        key = (obj["apiVersion"], obj["kind"])
        if key in THIRD_PARTY_KINDS:
            assert obj["metadata"]["name"] and obj["metadata"]["namespace"]
            continue
        kubernetes_validate.validate(obj, k8s_version, strict=True)


@pytest.mark.parametrize("values", MODES)
def test_objects_are_named_for_the_release(values: dict[str, Any]) -> None:
    rendered = render(values, release="edge", namespace="security")
    for m in rendered.manifests:
        meta = m.obj["metadata"]
        if m.kind == "AuthorizationPolicy":  # named and placed by the values
            continue
        assert meta["name"].startswith("edge-lastguard"), m.source
        if m.kind in CLUSTER_SCOPED:
            assert "namespace" not in meta
        else:
            assert meta["namespace"] == "security", f"{m.kind}/{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/instance"] == "edge"


def test_defaults_render_with_no_values() -> None:
    kinds = sorted(o["kind"] for o in render().objects)
    assert kinds == sorted([
        "ClusterRole", "ClusterRoleBinding", "Deployment", "MutatingWebhookConfiguration",
        "PodDisruptionBudget", "Role", "RoleBinding", "Secret", "Service", "Service", "Service",
        "ServiceAccount",
    ])  # fmt: skip


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = _pyproject_version()
    assert (chart["apiVersion"], chart["name"], chart["version"]) == ("v2", "lastguard", "0.1.0")
    assert chart["appVersion"] == project == "0.1.0"


def test_helm_lint_finds_nothing() -> None:
    report = helm_python.lint(CHART, strict=True, namespace="lastguard-system")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


# --- RBAC --------------------------------------------------------------------------------


def rules(obj: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    return [
        (group, resource, tuple(rule.get("resourceNames", ())), tuple(rule["verbs"]))
        for rule in obj["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    ]


OPERATOR_RULES = [
    ("lastguard.dev", "jwtpolicies", (), ("get", "list", "watch")),
    ("lastguard.dev", "jwtpolicies/status", (), ("patch",)),
    ("", "events", (), ("create",)),
]
CA_PUBLISHER_RULES = [
    ("", "configmaps", (), ("create",)),
    ("", "configmaps", ("lastguard-ca",), ("get", "list", "update")),
    ("", "namespaces", (), ("list",)),
]
LEASE_RULES = [
    ("coordination.k8s.io", "leases", (), ("create",)),
    ("coordination.k8s.io", "leases", ("lastguard-operator",), ("get", "update")),
]


@pytest.mark.parametrize(
    ("values", "cluster_rules", "lease_rules"),
    [
        pytest.param({}, OPERATOR_RULES + CA_PUBLISHER_RULES, LEASE_RULES, id="defaults"),
        pytest.param(
            {"caBundle": {"publish": False}}, OPERATOR_RULES, LEASE_RULES, id="no-ca-publish"
        ),
        pytest.param(
            {"replicas": 1, "leaderElection": {"enabled": False}},
            OPERATOR_RULES + CA_PUBLISHER_RULES,
            None,
            id="no-leader-election",
        ),
    ],
)
def test_rbac_grants_exactly_what_the_operator_uses(
    values: dict[str, Any], cluster_rules: list[Any], lease_rules: list[Any] | None
) -> None:
    rendered = render(values)
    account = only(rendered, "ServiceAccount")["metadata"]["name"]
    assert only(rendered, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account

    assert rules(only(rendered, "ClusterRole")) == cluster_rules
    binding = only(rendered, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lastguard-operator"
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": "lastguard-system"}
    ]

    if lease_rules is None:
        assert not rendered.find("Role") and not rendered.find("RoleBinding")
        assert "--no-leader-election" in flags(rendered)
        return
    role = only(rendered, "Role")
    assert role["metadata"]["namespace"] == "lastguard-system"
    assert rules(role) == lease_rules
    assert only(rendered, "RoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    lease = flags(rendered)
    assert lease["--lease-name"] == ["lastguard-operator"]
    assert lease["--lease-namespace"] == ["lastguard-system"]


# --- the operator's pod ------------------------------------------------------------------

RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("values", MODES)
def test_every_container_is_locked_down(values: dict[str, Any]) -> None:
    templates = pod_templates(render(values))
    assert templates
    for template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostNetwork" not in pod and "hostPID" not in pod
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            context = container["securityContext"]
            assert {k: context.get(k) for k in RESTRICTED_CONTAINER} == RESTRICTED_CONTAINER
            assert context.get("privileged", False) is False
            assert "memory" in container["resources"]["limits"]


#: Flags the chart passes that `lastguard operator` does not define yet. The operator
#: publishes ConfigMap lastguard-ca from this file (caBundle.publish).
PENDING_FLAGS: set[str] = set()


def operator_parser() -> argparse.ArgumentParser:
    """`lastguard operator`'s parser: the operator's flags and the injection webhook's."""
    from lastguard.sidecar import cli

    subcommands = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    parser: argparse.ArgumentParser = subcommands.choices["operator"]
    return parser


@pytest.mark.parametrize("values", MODES)
def test_operator_flags_are_the_operators(values: dict[str, Any]) -> None:
    """The operator accepts the chart's arguments: known flags, valid values."""
    args = operator_container(render(values))["args"][2:]
    known, unknown = operator_parser().parse_known_args(
        [a.replace("$(POD_NAME)", "lastguard-operator-0") for a in args]
    )
    assert {u.partition("=")[0] for u in unknown} <= PENDING_FLAGS, unknown
    main = pytest.importorskip("lastguard.operator.main")
    config = main.config_from(known)
    assert config.tls is not None and str(config.tls.cert).endswith("/tls.crt")
    assert config.identity == "lastguard-operator-0"
    if any(a.startswith("--webhook-cert=") for a in args):
        webhook = pytest.importorskip("lastguard.operator.webhook")
        injection = webhook.config_from(known).injection
        assert injection.policy_server == "lastguard-operator.lastguard-system.svc:15010"
        assert injection.excluded_namespaces >= {"lastguard-system"}


@pytest.mark.parametrize(
    ("values", "mode"),
    [
        pytest.param({}, "envoy", id="defaults"),
        pytest.param({"istio": {"enabled": True}}, "sidecar", id="istio"),
        pytest.param({"webhook": {"inject": {"defaultMode": "sidecar"}}}, "sidecar", id="given"),
        pytest.param(
            {"istio": {"enabled": True}, "webhook": {"inject": {"defaultMode": "envoy"}}},
            "envoy",
            id="istio-given",
        ),
    ],
)
def test_injection_mode(values: dict[str, Any], mode: str) -> None:
    """Without Istio a pod needs lastguard's Envoy; with it, Istio's proxy is there."""
    assert flags(render(values))["--inject-default-mode"] == [mode]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_injection_protocol(protocol: str) -> None:
    values = {} if protocol == "grpc" else {"webhook": {"inject": {"defaultProtocol": "http"}}}
    assert flags(render(values))["--inject-default-protocol"] == [protocol]


def test_operator_arguments() -> None:
    rendered = render()
    container = operator_container(rendered)
    f = flags(rendered)
    tls_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
    assert f["--listen"] == ["0.0.0.0:15010"]
    assert f["--tls-cert"] == f["--webhook-cert"] == [f"{tls_dir}/tls.crt"]
    assert f["--tls-key"] == f["--webhook-key"] == [f"{tls_dir}/tls.key"]
    assert f["--publish-ca-bundle"] == [f"{tls_dir}/ca.crt"]
    assert "--insecure" not in f
    assert f["--leader-election"] == [""]
    assert f["--webhook-listen"] == ["0.0.0.0:9443"]
    assert f["--inject-image"] == ["ghcr.io/lastguard/lastguard:0.1.0"] == [container["image"]]
    assert f["--inject-envoy-image"] == ["docker.io/envoyproxy/envoy:v1.40.0"]
    assert f["--inject-policy-server"] == ["lastguard-operator.lastguard-system.svc:15010"]
    assert "--namespace" not in f  # every namespace
    # The pod's name comes from the downward API, through the environment.
    assert f["--pod-name"] == ["$(POD_NAME)"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}

    assert flags(render({"watchNamespaces": ["shop", "batch"]}))["--namespace"] == ["shop", "batch"]
    assert "--publish-ca-bundle" not in flags(render({"caBundle": {"publish": False}}))
    assert not {
        k for k in flags(render({"webhook": {"enabled": False}})) if "webhook" in k or "inject" in k
    }
    assert "--metrics-listen" not in flags(render({"metrics": {"enabled": False}}))
    digest = "sha256:" + "b" * 64
    pinned = render({"image": {"digest": digest}})
    assert operator_container(pinned)["image"] == f"ghcr.io/lastguard/lastguard@{digest}"
    assert flags(pinned)["--inject-image"] == [f"ghcr.io/lastguard/lastguard@{digest}"]


def test_probes_use_the_health_port() -> None:
    rendered = render()
    container = operator_container(rendered)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 15010, "webhook": 9443, "metrics": 9090, "health": 8080}
    assert flags(rendered)["--health-listen"] == ["0.0.0.0:8080"]
    assert flags(rendered)["--metrics-listen"] == ["0.0.0.0:9090"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}


@pytest.mark.parametrize(
    ("values", "replicas", "pdb"),
    [
        pytest.param({}, 2, True, id="defaults"),
        pytest.param({"replicas": 1}, 1, False, id="one-replica"),
        pytest.param({"replicas": 3}, 3, True, id="three"),
        pytest.param(
            {"replicas": 3, "podDisruptionBudget": {"enabled": False}}, 3, False, id="pdb-off"
        ),
    ],
)
def test_replicas_and_disruption_budget(values: dict[str, Any], replicas: int, pdb: bool) -> None:
    rendered = render(values)
    deployment = only(rendered, "Deployment")
    assert deployment["spec"]["replicas"] == replicas
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budgets = rendered.find("PodDisruptionBudget")
    if not pdb:
        assert budgets == []
        return
    assert [b["spec"]["minAvailable"] for b in budgets] == [1]
    assert budgets[0]["spec"]["selector"] == deployment["spec"]["selector"]


def test_several_replicas_need_leader_election() -> None:
    with pytest.raises(helm_python.HelmRenderError, match="leaderElection"):
        render({"replicas": 2, "leaderElection": {"enabled": False}})


# --- Services ----------------------------------------------------------------------------


def test_services_reach_the_operator() -> None:
    rendered = render()
    selector = only(rendered, "Deployment")["spec"]["selector"]["matchLabels"]
    services = {s["metadata"]["name"]: s for s in rendered.find("Service")}
    assert set(services) == {"lastguard-operator", "lastguard-webhook", "lastguard-metrics"}
    for service in services.values():
        assert service["spec"]["selector"] == selector
    ports = {
        name: [(p["port"], p["targetPort"]) for p in s["spec"]["ports"]]
        for name, s in services.items()
    }
    assert ports == {
        "lastguard-operator": [(15010, "grpc")],
        "lastguard-webhook": [(443, "webhook")],
        "lastguard-metrics": [(9090, "metrics")],
    }
    assert services["lastguard-operator"]["spec"]["ports"][0]["appProtocol"] == "grpc"
    assert render({"metrics": {"enabled": False}}).find("Service", "lastguard-metrics") == []
    assert render({"webhook": {"enabled": False}}).find("Service", "lastguard-webhook") == []


def test_service_monitor() -> None:
    rendered = render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    )
    monitor = only(rendered, "ServiceMonitor")
    service = rendered.find("Service", "lastguard-metrics")[0]
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["lastguard-system"]}
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    for other in rendered.find("Service"):
        if other is not service:
            assert not selected.items() <= other["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert render().find("ServiceMonitor") == []


# --- the webhook -------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", ["lastguard-system", "security"])
def test_webhook_selects_opted_in_pods_outside_system_namespaces(namespace: str) -> None:
    rendered = render(namespace=namespace)
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    excluded = ["kube-system", "kube-public", "kube-node-lease", namespace]
    assert hook["namespaceSelector"] == {
        "matchExpressions": [
            {"key": "lastguard.dev/injection", "operator": "In", "values": ["enabled"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
        ]
    }
    assert hook["objectSelector"] == {"matchLabels": {"lastguard.dev/inject": "true"}}
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] <= 10
    assert hook["clientConfig"]["service"] == {
        "name": "lastguard-webhook", "namespace": namespace, "path": "/inject", "port": 443
    }  # fmt: skip
    # The webhook itself refuses the same namespaces, should the selector be edited.
    assert flags(rendered)["--webhook-exclude-namespace"] == excluded


def test_webhook_extra_excluded_namespaces() -> None:
    rendered = render({"webhook": {"excludeNamespaces": ["istio-system", "kube-system"]}})
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    values = hook["namespaceSelector"]["matchExpressions"][1]["values"]
    assert values == [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "lastguard-system",
        "istio-system",
    ]
    assert flags(rendered)["--webhook-exclude-namespace"] == values


def test_no_webhook() -> None:
    assert render({"webhook": {"enabled": False}}).find("MutatingWebhookConfiguration") == []


# --- TLS ---------------------------------------------------------------------------------

SERVICE_NAMES = [
    f"{service}{suffix}"
    for service in ("lastguard-operator", "lastguard-webhook")
    for suffix in (
        "",
        ".lastguard-system",
        ".lastguard-system.svc",
        ".lastguard-system.svc.cluster.local",
    )
]


def mounted_secret(rendered: Any) -> str:
    volumes = only(rendered, "Deployment")["spec"]["template"]["spec"]["volumes"]
    return str(next(v["secret"]["secretName"] for v in volumes if v["name"] == "tls"))


def test_generate_mode_makes_a_ca_the_webhook_and_sidecars_trust() -> None:
    rendered = render({"tls": {"mode": "generate"}})
    secret = only(rendered, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == mounted_secret(rendered) == "lastguard-tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert set(data) == {"ca.crt", "tls.crt", "tls.key"}
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]

    ca = x509.load_pem_x509_certificate(data["ca.crt"])
    cert = x509.load_pem_x509_certificate(data["tls.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == SERVICE_NAMES
    # The sidecars dial this name, and verify it against the certificate.
    policy_server = flags(rendered)["--inject-policy-server"][0].rpartition(":")[0]
    assert policy_server in SERVICE_NAMES
    # New certificates restart the operator, which reads its gRPC certificate at start.
    annotations = only(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/tls" in annotations


def test_existing_secret_mode() -> None:
    rendered = render(EXISTING_SECRET)
    assert rendered.find("Secret") == []
    assert mounted_secret(rendered) == "my-tls"
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).decode() == CA_PEM
    # Offline there is no Secret to read the CA from: the value is required.
    with pytest.raises(helm_python.HelmRenderError, match="caBundle"):
        render({"tls": {"mode": "existingSecret", "existingSecret": {"name": "my-tls"}}})
    # Without the webhook nothing needs the CA here.
    render(
        {
            "tls": {"mode": "existingSecret", "existingSecret": {"name": "my-tls"}},
            "webhook": {"enabled": False},
        }
    )


@pytest.mark.parametrize(
    ("issuer_ref", "expected_issuer"),
    [
        pytest.param(
            {}, {"name": "lastguard-ca", "kind": "Issuer", "group": "cert-manager.io"}, id="own-ca"
        ),
        pytest.param(
            {"name": "corp", "kind": "ClusterIssuer"},
            {"name": "corp", "kind": "ClusterIssuer", "group": "cert-manager.io"},
            id="given-issuer",
        ),
    ],
)
def test_cert_manager_mode(issuer_ref: dict[str, str], expected_issuer: dict[str, str]) -> None:
    rendered = render({"tls": {"mode": "certManager", "certManager": {"issuerRef": issuer_ref}}})
    assert rendered.find("Secret") == []
    certificates = {c["metadata"]["name"]: c for c in rendered.find("Certificate")}
    serving = certificates["lastguard-serving"]
    assert serving["spec"]["secretName"] == mounted_secret(rendered)
    assert serving["spec"]["dnsNames"] == SERVICE_NAMES
    assert serving["spec"]["issuerRef"] == expected_issuer
    assert serving["spec"]["privateKey"]["rotationPolicy"] == "Always"
    assert {"secretName", "dnsNames", "issuerRef", "duration", "renewBefore"} <= set(
        serving["spec"]
    )

    webhook = only(rendered, "MutatingWebhookConfiguration")
    assert webhook["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": "lastguard-system/lastguard-serving"
    }
    assert "caBundle" not in webhook["webhooks"][0]["clientConfig"]
    assert "checksum/tls" not in only(rendered, "Deployment")["spec"]["template"]["metadata"].get(
        "annotations", {}
    )

    issuers = {i["metadata"]["name"]: i["spec"] for i in rendered.find("Issuer")}
    if issuer_ref:
        assert issuers == {} and set(certificates) == {"lastguard-serving"}
        return
    # A self-signed root, a CA certificate from it, and the Issuer that signs with that CA.
    assert issuers == {
        "lastguard-selfsigned": {"selfSigned": {}},
        "lastguard-ca": {"ca": {"secretName": "lastguard-ca"}},
    }
    ca = certificates["lastguard-ca"]["spec"]
    assert ca["isCA"] is True and ca["secretName"] == "lastguard-ca"
    assert ca["issuerRef"]["name"] == "lastguard-selfsigned"


# --- lookup: what `helm upgrade` finds in the cluster -------------------------------------


class FakeApiServer:
    """Just enough of an API server for Helm's `lookup` of Secrets: discovery and GETs."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if path == "/version":
                    self.answer(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
                elif path == "/api":
                    self.answer(200, {"kind": "APIVersions", "versions": ["v1"]})
                elif path == "/apis":
                    self.answer(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
                elif path == "/api/v1":
                    secrets = {"name": "secrets", "singularName": "secret", "namespaced": True,
                               "kind": "Secret", "verbs": ["get", "list"]}  # fmt: skip
                    self.answer(200, {"kind": "APIResourceList", "groupVersion": "v1",
                                      "resources": [secrets]})  # fmt: skip
                elif parts[:3] == ["api", "v1", "namespaces"] and parts[4:5] == ["secrets"]:
                    secret = fake.secrets.get((parts[3], parts[5]))
                    if secret is not None:
                        self.answer(200, secret)
                    else:
                        self.answer(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                          "reason": "NotFound", "code": 404})  # fmt: skip
                else:
                    self.answer(404, {"kind": "Status", "apiVersion": "v1", "code": 404})

            def answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, secret: dict[str, Any]) -> None:
        meta = secret["metadata"]
        self.secrets[meta["namespace"], meta["name"]] = secret


@pytest.fixture
def cluster() -> Iterator[FakeApiServer]:
    api = FakeApiServer()
    thread = threading.Thread(target=api.server.serve_forever, daemon=True)
    thread.start()
    yield api
    api.server.shutdown()
    api.server.server_close()
    thread.join()


def tls_state(rendered: Any) -> tuple[dict[str, str], str, str]:
    """The generated Secret's data, the webhook's caBundle, the pod's checksum annotation."""
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    template = only(rendered, "Deployment")["spec"]["template"]
    return (
        only(rendered, "Secret")["data"],
        hook["clientConfig"]["caBundle"],
        template["metadata"]["annotations"]["checksum/tls"],
    )


def test_upgrade_keeps_generated_certificates(cluster: FakeApiServer) -> None:
    installed = render_manifests.render_chart({})
    cluster.add(only(installed, "Secret"))
    upgraded = render_manifests.render_chart({}, kube_apiserver=cluster.url)
    # Same certificates, same caBundle, and no restart of the operator.
    assert tls_state(upgraded) == tls_state(installed)


def test_upgrade_makes_new_certificates_for_new_names(cluster: FakeApiServer) -> None:
    installed = render_manifests.render_chart({})
    cluster.add(only(installed, "Secret"))
    # clusterDomain changes the names the certificate must carry.
    upgraded = render_manifests.render_chart(
        {"clusterDomain": "corp.local"}, kube_apiserver=cluster.url
    )
    secret, ca_bundle, checksum = tls_state(upgraded)
    assert secret["ca.crt"] != only(installed, "Secret")["data"]["ca.crt"]
    assert ca_bundle == secret["ca.crt"]
    assert checksum != tls_state(installed)[2]
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["tls.crt"]))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "lastguard-operator.lastguard-system.svc.corp.local" in names.get_values_for_type(
        x509.DNSName
    )


def test_install_makes_certificates_when_there_is_no_secret(cluster: FakeApiServer) -> None:
    first = render_manifests.render_chart({}, kube_apiserver=cluster.url)
    second = render_manifests.render_chart({}, kube_apiserver=cluster.url)
    assert tls_state(first)[0]["ca.crt"] != tls_state(second)[0]["ca.crt"]


def test_existing_secret_ca_is_read_from_the_cluster(cluster: FakeApiServer) -> None:
    ca = base64.b64encode(CA_PEM.encode()).decode()
    cluster.add({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                 "metadata": {"name": "my-tls", "namespace": "lastguard-system"},
                 "data": {"ca.crt": ca, "tls.crt": "eA==", "tls.key": "eA=="}})  # fmt: skip
    values = {"tls": {"mode": "existingSecret", "existingSecret": {"name": "my-tls"}}}
    rendered = render_manifests.render_chart(values, kube_apiserver=cluster.url)
    [hook] = only(rendered, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["caBundle"] == ca


# --- Istio -------------------------------------------------------------------------------


def test_istio_mode() -> None:
    rendered = render(ISTIO)
    entry = only(rendered, "ServiceEntry")["spec"]
    assert entry["hosts"] == ["lastguard.local"]
    assert entry["endpoints"] == [{"address": "127.0.0.1"}]
    assert entry["ports"] == [{"name": "grpc", "number": 9191, "protocol": "GRPC"}]
    assert entry["resolution"] == "STATIC"

    policies = {p["metadata"]["name"]: p for p in rendered.find("AuthorizationPolicy")}
    assert set(policies) == {"orders", "catalog"}
    for policy in policies.values():
        assert policy["metadata"]["namespace"] == "shop"
        assert policy["spec"]["action"] == "CUSTOM"
        assert policy["spec"]["provider"] == {"name": "lastguard"}
    assert policies["orders"]["spec"]["selector"] == {"matchLabels": {"app": "orders"}}
    assert policies["orders"]["spec"]["rules"] == [{}]  # every request
    assert policies["catalog"]["spec"]["rules"] == [{"to": [{"operation": {}}]}]
    assert "selector" not in policies["catalog"]["spec"]

    # The provider is Istio's mesh config: NOTES.txt shows the snippet to add.
    [provider] = notes_mesh_config(rendered.notes)["extensionProviders"]
    assert provider["name"] == "lastguard"
    assert provider["envoyExtAuthzGrpc"] == {
        "service": "lastguard.local",
        "port": 9191,
        "timeout": "1s",
        "failOpen": False,  # fail closed, as lastguard's own Envoy config does
        "statusOnError": "503",
    }
    assert render().find("ServiceEntry") == [] and render().find("AuthorizationPolicy") == []


def test_istio_shared_service() -> None:
    shared = "lastguard-authz.shop.svc.cluster.local"
    rendered = render(
        {
            "istio": {
                "enabled": True,
                "serviceEntry": {"enabled": False},
                "provider": {"service": shared},
            }
        }
    )
    assert rendered.find("ServiceEntry") == []
    assert f"service: {shared}" in rendered.notes


# --- manifests/samples/istio ------------------------------------------------------------

ISTIO_SAMPLES = ROOT / "manifests" / "samples" / "istio"


def sample(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ISTIO_SAMPLES / name).read_text()) if d]


def notes_mesh_config(notes: str) -> dict[str, Any]:
    snippet = notes[notes.index("meshConfig:") :]
    mesh: dict[str, Any] = yaml.safe_load(snippet[: snippet.index("\n\n")])["meshConfig"]
    return mesh


@pytest.mark.parametrize(
    "name", sorted(p.name for p in ISTIO_SAMPLES.glob("*.yaml") if p.name != "mesh-config.yaml")
)
def test_istio_samples_are_valid(name: str) -> None:
    from lastguard.sidecar.policy import parse

    for obj in sample(name):
        if obj["kind"] == "JWTPolicy":
            parse.parse_policy(obj)
        elif (obj["apiVersion"], obj["kind"]) not in THIRD_PARTY_KINDS:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] == "ConfigMap":
            for text in obj["data"].values():
                assert parse.parse_documents(text)


def test_istio_samples_agree_with_the_chart() -> None:
    rendered = render(ISTIO)
    mesh = yaml.safe_load((ISTIO_SAMPLES / "mesh-config.yaml").read_text())["meshConfig"]
    per_pod, shared = mesh["extensionProviders"]
    notes = notes_mesh_config(rendered.notes)
    assert per_pod == notes["extensionProviders"][0]
    assert mesh["pathNormalization"] == notes["pathNormalization"]

    [entry] = sample("service-entry.yaml")
    assert entry["spec"] == only(rendered, "ServiceEntry")["spec"]
    assert entry["spec"]["hosts"] == [per_pod["envoyExtAuthzGrpc"]["service"]]
    assert [p["number"] for p in entry["spec"]["ports"]] == [per_pod["envoyExtAuthzGrpc"]["port"]]
    inject = pytest.importorskip("lastguard.operator.inject")
    # Where injected sidecars listen.
    assert per_pod["envoyExtAuthzGrpc"]["port"] == inject.CHECK_PORT

    [policy] = sample("authorization-policy.yaml")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"] == {"name": per_pod["name"]}
    from_chart = {
        "name": "orders-lastguard",
        "namespace": "shop",
        "selector": policy["spec"]["selector"],
    }
    values = {"istio": {"enabled": True, "authorizationPolicies": [from_chart]}}
    assert policy["spec"] == only(render(values), "AuthorizationPolicy")["spec"]

    objects = {(o["kind"], o["metadata"]["name"]): o for o in sample("shared-service.yaml")}
    service = objects["Service", "lastguard-authz"]
    host = f"lastguard-authz.{service['metadata']['namespace']}.svc.cluster.local"
    assert shared["envoyExtAuthzGrpc"]["service"] == host
    assert shared["envoyExtAuthzGrpc"]["port"] == service["spec"]["ports"][0]["port"]
    assert objects["AuthorizationPolicy", "catalog-lastguard"]["spec"]["provider"] == {
        "name": shared["name"]
    }
    from lastguard.sidecar import cli

    [container] = objects["Deployment", "lastguard-authz"]["spec"]["template"]["spec"]["containers"]
    args = cli.build_parser().parse_args(container["args"])
    assert cli._sidecar_source_problem(args) is None
    assert args.listen == f"0.0.0.0:{service['spec']['ports'][0]['port']}"


def test_istio_workload_sample_gets_lastguard_beside_istios_proxy() -> None:
    inject = pytest.importorskip("lastguard.operator.inject")
    webhook = pytest.importorskip("lastguard.operator.webhook")
    known, _ = operator_parser().parse_known_args(operator_container(render(ISTIO))["args"][2:])
    config = webhook.config_from(known).injection
    deployment, policy = sample("workload.yaml")
    template = deployment["spec"]["template"]
    decision = inject.decide(template, deployment["metadata"]["namespace"], config)
    assert (decision.reason, str(decision.mode)) == ("injected", "sidecar")
    added = [op["value"]["name"] for op in decision.patch if op["path"] == "/spec/containers/-"]
    assert added == ["lastguard"]  # no second Envoy
    assert (
        policy["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    )


# --- NOTES -------------------------------------------------------------------------------


def test_notes_say_what_to_do_next() -> None:
    notes = render().notes
    for step in [
        "kubectl label namespace shop lastguard.dev/injection=enabled",
        '"lastguard.dev/inject":"true"',
        "kubectl apply -f jwtpolicy.yaml",
        "kubectl -n shop get jwtp",
        "lastguard verify",
        "kubectl apply -f manifests/crds/",
    ]:
        assert step in notes
    assert "meshConfig" not in notes
    assert "create configmap lastguard-ca" in render({"caBundle": {"publish": False}}).notes


# --- values.schema.json ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"replicas": "two"}, id="replicas-not-a-number"),
        pytest.param({"replicas": 0}, id="no-replicas"),
        pytest.param({"replica": 2}, id="unknown-top-level-key"),
        pytest.param({"image": {"tga": "1"}}, id="unknown-nested-key"),
        pytest.param({"image": {"digest": "latest"}}, id="digest-not-a-digest"),
        pytest.param({"tls": {"mode": "selfSigned"}}, id="unknown-tls-mode"),
        pytest.param({"tls": {"mode": "existingSecret"}}, id="existing-secret-without-name"),
        pytest.param(
            {"tls": {"certManager": {"issuerRef": {"kind": "Issuer", "nam": "x"}}}},
            id="issuer-typo",
        ),
        pytest.param({"webhook": {"failurePolicy": "Maybe"}}, id="bad-failure-policy"),
        pytest.param({"webhook": {"timeoutSeconds": 60}}, id="webhook-timeout-too-long"),
        pytest.param({"webhook": {"excludeNamespaces": ["Not_A_Namespace"]}}, id="bad-namespace"),
        pytest.param({"ports": {"grpc": 70000}}, id="port-out-of-range"),
        pytest.param({"leaderElection": {"enabled": "yes"}}, id="boolean-as-string"),
        pytest.param({"metrics": {"serviceMonitor": {"interval": "often"}}}, id="bad-interval"),
        pytest.param(
            {"istio": {"authorizationPolicies": [{"name": "a"}]}}, id="policy-without-namespace"
        ),
        pytest.param({"caBundle": {"publish": True, "name": "x"}}, id="ca-bundle-unknown-key"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_schema_is_strict() -> None:
    """Every object the chart defines refuses keys it does not know."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = {  # Kubernetes and Istio types, passed through as given
        "resources", "podSecurityContext", "securityContext", "podAnnotations", "podLabels",
        "nodeSelector", "affinity", "annotations", "labels", "matchLabels", "rules[]",
    }  # fmt: skip

    def walk(node: dict[str, Any], name: str) -> None:
        if node.get("type") == "object" and name not in open_objects:
            assert node.get("additionalProperties") is False, name
        for key, sub in node.get("properties", {}).items():
            walk(sub, key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{name}[]")

    walk(schema, "(values)")
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(chart_values) == set(schema["properties"])


# --- generated files ---------------------------------------------------------------------


def test_chart_crds_are_the_manifests_crds() -> None:
    sources = sorted(p.name for p in (ROOT / "manifests" / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sources
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (
            ROOT / "manifests" / "crds" / name
        ).read_bytes()


def test_install_yaml_is_a_fresh_render() -> None:
    assert render_manifests.stale_files() == [], "run `make manifests`"


def test_install_yaml() -> None:
    text = render_manifests.install_yaml()
    assert text == render_manifests.install_yaml()  # deterministic
    assert text.startswith("# lastguard:") and "GENERATED by `make manifests`" in text
    assert "tls.mode=certManager" in text.split("---", 1)[0]
    objects = [o for o in yaml.safe_load_all(text) if o]
    assert (
        objects[0]["kind"] == "Namespace" and objects[0]["metadata"]["name"] == "lastguard-system"
    )
    assert objects[1]["kind"] == "CustomResourceDefinition"
    assert not [o for o in objects if o["kind"] == "Secret"]  # no key material in the repository
    cluster_scoped = {"Namespace", "CustomResourceDefinition", *CLUSTER_SCOPED}
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in THIRD_PARTY_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == "lastguard-system"


def _pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])
