"""Sidecar injection: a pod in, a JSON patch out, applied and checked as the API server would.

Every patch is applied with `jsonpatch` (RFC 6902) to a pod shaped like the
ones kube-apiserver sends, then the result is validated against the
Kubernetes 1.30 schema (strict) and the API server's other rules.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from lastguard.operator import bootstrap, inject, inject_spec
from lastguard.operator.bootstrap import Protocol
from lastguard.operator.inject import InjectionRefused, MalformedPod
from lastguard.operator.inject_spec import InjectionConfig, Mode
from lastguard.sidecar import cli, podinfo
from tests.support import admission
from tests.support.admission import api_server_pod

ROOT = Path(__file__).resolve().parents[2]
NS = "shop"
LABEL = {"app": "orders", "pod-template-hash": "7d9f8c6b5", "lastguard.dev/inject": "true"}
CONFIG = InjectionConfig(
    image="ghcr.io/lastguard/lastguard:0.1.0",
    policy_server="lastguard-operator.lastguard-system.svc:15010",
    excluded_namespaces=frozenset({"lastguard-system"}),
)
#: The arguments of the injected sidecar's `lastguard` command, as documented.
SIDECAR_COMMAND_LINE = (
    "--log-level info sidecar"
    " --policy-server lastguard-operator.lastguard-system.svc:15010"
    " --policy-server-ca /etc/lastguard/ca/ca.crt"
    " --pod-info-dir /etc/lastguard/podinfo"
    " --snapshot-file /var/run/lastguard/snapshot.json"
    " --listen 127.0.0.1:9191"
    " --metrics-listen 0.0.0.0:9090"
    " --health-listen 0.0.0.0:9091"
)
ANNOTATION_PATHS = [
    "/metadata/annotations/lastguard.dev~1injected",
    "/metadata/annotations/lastguard.dev~1status",
]
PROBE_WARNING = (
    "container orders: readinessProbe targets the app port 8081; probe the Envoy port 8080 instead"
)
RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def injected(pod: dict[str, Any], config: InjectionConfig = CONFIG, ns: str = NS) -> dict[str, Any]:
    """`pod` after injection, checked to be a pod the API server accepts."""
    patch = inject.patch_for(pod, ns, config)
    assert patch is not None
    result = admission.apply(pod, patch)
    admission.validate(result)
    assert admission.problems(result) == []
    return result


# --- what an injected pod is -------------------------------------------------------------


def test_sidecar_mode_adds_the_lastguard_container_as_documented() -> None:
    pod = injected(api_server_pod(labels=LABEL))

    assert [c["name"] for c in pod["spec"]["containers"]] == ["orders", "lastguard"]
    sidecar = admission.container(pod, "lastguard")
    assert sidecar == {
        "name": "lastguard",
        "image": "ghcr.io/lastguard/lastguard:0.1.0",
        "imagePullPolicy": "IfNotPresent",
        "command": ["lastguard"],
        "args": SIDECAR_COMMAND_LINE.split(),
        "ports": [
            {"name": "lg-metrics", "containerPort": 9090, "protocol": "TCP"},
            {"name": "lg-health", "containerPort": 9091, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": 9091},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": 9091},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": RESTRICTED,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "lastguard-podinfo", "mountPath": "/etc/lastguard/podinfo", "readOnly": True},
            {"name": "lastguard-ca", "mountPath": "/etc/lastguard/ca", "readOnly": True},
            {"name": "lastguard-run", "mountPath": "/var/run/lastguard"},
        ],
    }
    assert [v["name"] for v in pod["spec"]["volumes"]] == [
        admission.SA_VOLUME,
        "lastguard-podinfo",
        "lastguard-ca",
        "lastguard-run",
    ]
    assert admission.volume(pod, "lastguard-ca") == {
        "name": "lastguard-ca",
        "configMap": {"name": "lastguard-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
    }
    assert admission.volume(pod, "lastguard-run") == {
        "name": "lastguard-run",
        "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"},
    }
    assert pod["metadata"]["annotations"] == {
        "lastguard.dev/injected": "true",
        "lastguard.dev/status": json.dumps(
            {
                "containers": ["lastguard"],
                "mode": "sidecar",
                "protocol": "grpc",
                "volumes": ["lastguard-podinfo", "lastguard-ca", "lastguard-run"],
            },
            separators=(",", ":"),
        ),
    }


def test_nothing_else_in_the_pod_changes() -> None:
    pod = api_server_pod(labels=LABEL, annotations={"lastguard.dev/mode": "envoy"})
    result = injected(pod)
    spec = result["spec"]
    spec["containers"] = [c for c in spec["containers"] if not c["name"].startswith("lastguard")]
    spec["volumes"] = [v for v in spec["volumes"] if not v["name"].startswith("lastguard-")]
    for key in ("lastguard.dev/injected", "lastguard.dev/status"):
        del result["metadata"]["annotations"][key]
    assert result == pod


def test_the_downward_api_volume_is_the_layout_the_sidecar_reads() -> None:
    pod = injected(api_server_pod(labels=LABEL))
    documented = yaml.safe_load(cli.POD_INFO_HELP.split("\n", 1)[1])["volumes"][0]
    assert admission.volume(pod, "lastguard-podinfo")["downwardAPI"] == documented["downwardAPI"]
    paths = [item["path"] for item in documented["downwardAPI"]["items"]]
    assert paths == [podinfo.NAMESPACE_FILE, podinfo.LABELS_FILE, podinfo.NAME_FILE]


def test_the_sidecar_arguments_are_accepted_by_the_sidecar_command() -> None:
    args = cli.build_parser().parse_args(inject_spec.sidecar_args(CONFIG))
    assert cli._sidecar_source_problem(args) is None
    assert args.listen == "127.0.0.1:9191"  # Check stays on loopback
    assert args.health_listen == "0.0.0.0:9091"  # what the kubelet probes


def test_envoy_mode_adds_an_envoy_with_the_shipped_bootstrap() -> None:
    pod = injected(api_server_pod(labels=LABEL, annotations={"lastguard.dev/mode": "envoy"}))

    assert [c["name"] for c in pod["spec"]["containers"]] == [
        "orders",
        "lastguard",
        "lastguard-envoy",
    ]
    envoy = admission.container(pod, "lastguard-envoy")
    assert envoy["image"] == inject_spec.DEFAULT_ENVOY_IMAGE
    assert envoy["command"] == ["envoy"]
    args = envoy["args"]
    assert args[0] == "--config-yaml"
    assert yaml.safe_load(args[1]) == yaml.safe_load(
        (ROOT / "manifests/envoy/envoy-sidecar.yaml").read_text()
    )
    assert args[2:] == ["--concurrency", "2", "--disable-hot-restart", "--log-level", "info"]
    assert envoy["ports"] == [{"name": "lg-http", "containerPort": 8080, "protocol": "TCP"}]
    assert envoy["readinessProbe"]["tcpSocket"] == {"port": 8080}
    assert envoy["livenessProbe"]["tcpSocket"] == {"port": 8080}
    assert envoy["securityContext"] == RESTRICTED
    assert "volumeMounts" not in envoy  # the bootstrap is in the arguments
    status = json.loads(pod["metadata"]["annotations"]["lastguard.dev/status"])
    assert status["mode"] == "envoy"
    assert status["containers"] == ["lastguard", "lastguard-envoy"]


def test_envoy_mode_ports_come_from_the_annotations() -> None:
    pod = injected(
        api_server_pod(
            labels=LABEL,
            app_port=3000,
            annotations={
                "lastguard.dev/mode": "envoy",
                "lastguard.dev/app-port": "3000",
                "lastguard.dev/envoy-port": "8443",
            },
        )
    )
    envoy = admission.container(pod, "lastguard-envoy")
    bootstrap = yaml.safe_load(envoy["args"][1])
    listener = bootstrap["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8443}
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    app_address = clusters["app"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert app_address["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 3000,
    }
    assert envoy["ports"][0]["containerPort"] == 8443
    assert envoy["readinessProbe"]["tcpSocket"] == {"port": 8443}


@pytest.mark.parametrize(
    ("protocol", "manifest"),
    [(Protocol.GRPC, "envoy-sidecar.yaml"), (Protocol.HTTP, "envoy-sidecar-http.yaml")],
)
def test_the_default_bootstrap_is_exactly_the_shipped_file(
    protocol: Protocol, manifest: str
) -> None:
    shipped = yaml.safe_load((ROOT / "manifests/envoy" / manifest).read_text())
    assert bootstrap.envoy_bootstrap(8081, 8080, protocol) == shipped


@pytest.mark.parametrize(
    ("default", "annotation", "protocol"),
    [
        pytest.param(Protocol.GRPC, None, Protocol.GRPC, id="default-grpc"),
        pytest.param(Protocol.GRPC, "http", Protocol.HTTP, id="annotation-http"),
        pytest.param(Protocol.HTTP, None, Protocol.HTTP, id="default-http"),
        pytest.param(Protocol.HTTP, "grpc", Protocol.GRPC, id="annotation-grpc-wins"),
    ],
)
def test_protocol_from_annotation_or_default(
    default: Protocol, annotation: str | None, protocol: Protocol
) -> None:
    config = InjectionConfig(CONFIG.image, CONFIG.policy_server, default_protocol=default)
    annotations = {"lastguard.dev/mode": "envoy"}
    if annotation:
        annotations["lastguard.dev/protocol"] = annotation
    pod = injected(api_server_pod(labels=LABEL, annotations=annotations), config)
    args = admission.container(pod, "lastguard")["args"]
    serves_http = args[-2:] == ["--http-listen", "127.0.0.1:9192"]
    assert serves_http == (protocol is Protocol.HTTP)
    envoy_config = yaml.safe_load(admission.container(pod, "lastguard-envoy")["args"][1])
    authz = envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext_authz = authz["typed_config"]["http_filters"][0]["typed_config"]
    assert ("http_service" in ext_authz) == (protocol is Protocol.HTTP)
    status = json.loads(pod["metadata"]["annotations"]["lastguard.dev/status"])
    assert status["protocol"] == str(protocol)


def test_an_unknown_protocol_is_refused() -> None:
    pod = api_server_pod(labels=LABEL, annotations={"lastguard.dev/protocol": "carrier-pigeon"})
    with pytest.raises(inject.InjectionRefused, match=r"lastguard\.dev/protocol"):
        inject.decide(pod, NS, CONFIG)


@pytest.mark.parametrize(
    ("default", "annotation", "mode"),
    [
        pytest.param(Mode.SIDECAR, None, Mode.SIDECAR, id="default-sidecar"),
        pytest.param(Mode.SIDECAR, "envoy", Mode.ENVOY, id="annotation-envoy"),
        pytest.param(Mode.ENVOY, None, Mode.ENVOY, id="default-envoy"),
        pytest.param(Mode.ENVOY, "sidecar", Mode.SIDECAR, id="annotation-sidecar-wins"),
    ],
)
def test_mode_from_annotation_or_default(default: Mode, annotation: str | None, mode: Mode) -> None:
    config = InjectionConfig(CONFIG.image, CONFIG.policy_server, default_mode=default)
    annotations = {"lastguard.dev/mode": annotation} if annotation else None
    decision = inject.decide(api_server_pod(labels=LABEL, annotations=annotations), NS, config)
    assert decision.mode is mode
    expected = ["lastguard"] + (["lastguard-envoy"] if mode is Mode.ENVOY else [])
    assert [op["value"]["name"] for op in decision.patch or [] if "containers" in op["path"]] == (
        expected
    )


def test_config_reaches_the_containers() -> None:
    config = InjectionConfig(
        image="registry.internal/lastguard:1.2.3",
        policy_server="lg.ops.svc:15010",
        image_pull_policy="Always",
        ca_configmap="corp-ca",
        ca_key="bundle.pem",
        envoy_image="registry.internal/envoy:1.40.0",
        resources=inject_spec.Resources("100m", "128Mi", ""),
        envoy_resources=inject_spec.Resources("", "", "512Mi"),
        log_level="warning",
    )
    annotations = {"lastguard.dev/mode": "envoy"}
    pod = injected(api_server_pod(labels=LABEL, annotations=annotations), config)
    sidecar = admission.container(pod, "lastguard")
    envoy = admission.container(pod, "lastguard-envoy")
    assert sidecar["image"] == "registry.internal/lastguard:1.2.3"
    assert sidecar["imagePullPolicy"] == envoy["imagePullPolicy"] == "Always"
    assert sidecar["args"][:2] == ["--log-level", "warning"]
    assert "lg.ops.svc:15010" in sidecar["args"]
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}}
    assert envoy["resources"] == {"limits": {"memory": "512Mi"}}
    assert envoy["image"] == "registry.internal/envoy:1.40.0"
    assert envoy["args"][-2:] == ["--log-level", "warning"]
    assert admission.volume(pod, "lastguard-ca")["configMap"] == {
        "name": "corp-ca",
        "items": [{"key": "bundle.pem", "path": "ca.crt"}],  # the sidecar always reads ca.crt
    }


# --- the patch itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod", "volume_paths", "annotation_paths"),
    [
        pytest.param(
            api_server_pod(labels=LABEL),
            ["/spec/volumes/-"] * 3,
            ["/metadata/annotations"],
            id="volumes-no-annotations",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, service_account_volume=False),
            ["/spec/volumes"],
            ["/metadata/annotations"],
            id="no-volumes-no-annotations",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, service_account_volume=False, volumes=None),
            ["/spec/volumes"],
            ["/metadata/annotations"],
            id="null-volumes",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, service_account_volume=False, volumes=[]),
            ["/spec/volumes/-"] * 3,
            ["/metadata/annotations"],
            id="empty-volumes",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations={"team": "shop"}),
            ["/spec/volumes/-"] * 3,
            ANNOTATION_PATHS,
            id="annotations-keys-escaped",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations={}),
            ["/spec/volumes/-"] * 3,
            ANNOTATION_PATHS,
            id="empty-annotations",
        ),
    ],
)
def test_patch_paths_create_lists_and_maps_that_are_missing(
    pod: dict[str, Any], volume_paths: list[str], annotation_paths: list[str]
) -> None:
    patch = inject.patch_for(pod, NS, CONFIG)
    assert patch is not None
    assert all(op["op"] == "add" for op in patch)
    paths = [op["path"] for op in patch]
    assert paths == ["/spec/containers/-", *volume_paths, *annotation_paths]
    result = injected(pod)
    annotations = result["metadata"]["annotations"]
    assert annotations["lastguard.dev/injected"] == "true"
    assert annotations.get("team") == (pod["metadata"].get("annotations") or {}).get("team")
    assert [v["name"] for v in result["spec"]["volumes"]][-3:] == [
        "lastguard-podinfo",
        "lastguard-ca",
        "lastguard-run",
    ]


@pytest.mark.parametrize(
    ("token", "escaped"),
    [
        pytest.param("lastguard.dev/injected", "lastguard.dev~1injected", id="slash"),
        pytest.param("a~b/c", "a~0b~1c", id="tilde-before-slash"),
        pytest.param("~1", "~01", id="tilde-one-stays-literal"),
        pytest.param("plain", "plain", id="plain"),
    ],
)
def test_json_pointer_escaping(token: str, escaped: str) -> None:
    assert inject.escape_pointer(token) == escaped


def test_the_same_pod_always_gets_the_same_patch() -> None:
    pod = api_server_pod(labels=LABEL, annotations={"lastguard.dev/mode": "envoy"})
    assert inject.patch_for(pod, NS, CONFIG) == inject.patch_for(pod, NS, CONFIG)


@pytest.mark.parametrize("mode", ["sidecar", "envoy"])
def test_an_injected_pod_is_not_injected_again(mode: str) -> None:
    pod = injected(api_server_pod(labels=LABEL, annotations={"lastguard.dev/mode": mode}))
    decision = inject.decide(pod, NS, CONFIG)
    assert (decision.patch, decision.reason) == (None, "already-injected")


def test_a_lastguard_native_sidecar_counts_as_injected() -> None:
    manual = {"name": "lastguard", "image": "x", "restartPolicy": "Always"}
    pod = api_server_pod(labels=LABEL, initContainers=[manual])
    assert inject.decide(pod, NS, CONFIG).reason == "already-injected"


def test_a_copied_injected_annotation_without_the_container_still_gets_injected() -> None:
    # e.g. `kubectl get pod -o yaml` edited and re-created: the annotation proves nothing.
    pod = api_server_pod(labels=LABEL, annotations={"lastguard.dev/injected": "true"})
    result = injected(pod)
    assert admission.container(result, "lastguard")
    assert result["metadata"]["annotations"]["lastguard.dev/injected"] == "true"


# --- pods that are left alone --------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "annotations"),
    [
        pytest.param(None, None, id="no-labels"),
        pytest.param({"app": "orders"}, None, id="other-labels"),
        pytest.param({"lastguard.dev/inject": "false"}, None, id="label-false"),
        pytest.param({"lastguard.dev/inject": "True"}, None, id="label-not-exactly-true"),
        pytest.param(
            {"app": "orders"}, {"lastguard.dev/inject": "true"}, id="annotation-not-label"
        ),
        pytest.param({"app": "orders"}, {"lastguard.dev/mode": "envoy"}, id="mode-without-label"),
    ],
)
def test_pods_that_do_not_ask_are_untouched(
    labels: dict[str, str] | None, annotations: dict[str, str] | None
) -> None:
    decision = inject.decide(api_server_pod(labels=labels, annotations=annotations), NS, CONFIG)
    assert (decision.patch, decision.reason) == (None, "not-requested")


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param("kube-system", id="kube-system"),
        pytest.param("kube-public", id="kube-public"),
        pytest.param("kube-node-lease", id="kube-node-lease"),
        pytest.param("lastguard-system", id="operator-namespace"),
    ],
)
def test_excluded_namespaces_are_never_injected(namespace: str) -> None:
    pod = api_server_pod(namespace=namespace, labels=LABEL)
    decision = inject.decide(pod, namespace, CONFIG)
    assert (decision.patch, decision.reason) == (None, "excluded-namespace")


def test_the_system_namespaces_cannot_be_configured_away() -> None:
    bare = InjectionConfig(CONFIG.image, CONFIG.policy_server, excluded_namespaces=frozenset())
    pod = api_server_pod(namespace="kube-system", labels=LABEL)
    assert inject.patch_for(pod, "kube-system", bare) is None
    assert inject.patch_for(api_server_pod(labels=LABEL), NS, bare) is not None


# --- pods that ask but cannot be injected --------------------------------------------------


def _envoy(**annotations: str) -> dict[str, str]:
    """Envoy-mode annotations; keyword `app_port="3000"` is lastguard.dev/app-port."""
    prefixed = {f"lastguard.dev/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return {"lastguard.dev/mode": "envoy", **prefixed}


@pytest.mark.parametrize(
    ("pod", "message"),
    [
        pytest.param(
            api_server_pod(labels=LABEL, annotations={"lastguard.dev/mode": "istio"}),
            "annotation lastguard.dev/mode: 'istio' is not one of sidecar, envoy",
            id="unknown-mode",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(app_port="http")),
            "annotation lastguard.dev/app-port: 'http' is not a port number (1-65535)",
            id="app-port-not-a-number",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(envoy_port="65536")),
            "annotation lastguard.dev/envoy-port: '65536' is not a port number (1-65535)",
            id="envoy-port-too-big",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(app_port="0")),
            "annotation lastguard.dev/app-port: '0' is not a port number (1-65535)",
            id="port-zero",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(app_port="08081")),
            "annotation lastguard.dev/app-port: '08081' is not a port number (1-65535)",
            id="port-leading-zero",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(app_port="8080")),
            "annotations lastguard.dev/app-port and lastguard.dev/envoy-port are both 8080",
            id="same-ports",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(envoy_port="9191")),
            "annotation lastguard.dev/envoy-port: port 9191 is taken by lastguard's ext_authz",
            id="envoy-port-is-check-port",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, annotations=_envoy(app_port="9901")),
            "annotation lastguard.dev/app-port: port 9901 is taken by Envoy's admin API",
            id="app-port-is-envoy-admin",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, app_port=9090),
            "container 'orders' declares port 9090, which lastguard's metrics needs in this pod",
            id="app-declares-metrics-port",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, app_port=8080, annotations=_envoy()),
            "container 'orders' declares port 8080, which Envoy's listener "
            "(lastguard.dev/envoy-port) needs",
            id="app-declares-envoy-port",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, hostNetwork=True),
            "a pod on the host network cannot be injected",
            id="host-network",
        ),
        pytest.param(
            api_server_pod(labels=LABEL, volumes=[{"name": "lastguard-run", "emptyDir": {}}]),
            "the pod already has a volume named 'lastguard-run'",
            id="volume-name-taken",
        ),
        pytest.param(
            api_server_pod(
                labels=LABEL,
                annotations=_envoy(),
                initContainers=[{"name": "lastguard-envoy", "image": "envoy"}],
            ),
            "the pod already has a container named 'lastguard-envoy'",
            id="envoy-container-name-taken",
        ),
    ],
)
def test_pods_that_cannot_be_injected_are_refused_with_the_reason(
    pod: dict[str, Any], message: str
) -> None:
    with pytest.raises(InjectionRefused) as caught:
        inject.patch_for(pod, NS, CONFIG)
    assert message in str(caught.value)


def test_the_app_may_declare_its_own_port_in_envoy_mode() -> None:
    pod = api_server_pod(labels=LABEL, app_port=8081, annotations=_envoy())
    assert inject.patch_for(pod, NS, CONFIG) is not None


@pytest.mark.parametrize(
    ("pod", "problem"),
    [
        pytest.param({"metadata": {"labels": LABEL}}, "spec.containers", id="no-spec"),
        pytest.param(
            {"metadata": {"labels": LABEL}, "spec": {"containers": []}},
            "spec.containers",
            id="no-containers",
        ),
        pytest.param(
            {"metadata": {"labels": ["a"]}, "spec": {"containers": [{"name": "a"}]}},
            "labels: expected an object",
            id="labels-not-a-map",
        ),
        pytest.param(
            {"metadata": {"labels": LABEL}, "spec": {"containers": "app"}},
            "spec.containers: expected a list",
            id="containers-not-a-list",
        ),
    ],
)
def test_objects_that_are_not_pods_are_malformed(pod: dict[str, Any], problem: str) -> None:
    with pytest.raises(MalformedPod, match=problem):
        inject.decide(pod, NS, CONFIG)


# --- warnings ------------------------------------------------------------------------------


def _probed(port: int | str) -> dict[str, Any]:
    pod = api_server_pod(labels=LABEL, annotations=_envoy())
    pod["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": port}}
    return pod


@pytest.mark.parametrize(
    ("pod", "warnings"),
    [
        pytest.param(
            _probed(8081),
            (PROBE_WARNING,),
            id="probe-on-app-port",
        ),
        pytest.param(
            _probed("http"),
            (PROBE_WARNING,),
            id="probe-on-named-app-port",
        ),
        pytest.param(_probed(8080), (), id="probe-on-envoy-port"),
        pytest.param(api_server_pod(labels=LABEL, annotations=_envoy()), (), id="no-probes"),
    ],
)
def test_envoy_mode_warns_about_app_probes_the_kubelet_cannot_reach(
    pod: dict[str, Any], warnings: tuple[str, ...]
) -> None:
    decision = inject.decide(pod, NS, CONFIG)
    assert decision.warnings == warnings
    assert all(len(w) <= 120 for w in warnings)  # the API server may cut longer warnings


# --- layering ------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["inject", "inject_spec"])
def test_inject_is_pure(module: str) -> None:
    tree = ast.parse((ROOT / f"operator/{module}.py").read_text())
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    allowed = {"__future__", "enum", "json", "re", "collections.abc", "dataclasses", "typing"}
    allowed |= {"lastguard.sidecar", "lastguard.sidecar.errors", "lastguard.operator.bootstrap"}
    allowed |= {"lastguard.operator.inject_spec"}
    assert imported <= allowed, imported - allowed
