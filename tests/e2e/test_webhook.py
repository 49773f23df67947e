"""The injection webhook over real HTTPS, fed AdmissionReviews as kube-apiserver sends them.

The server is started from its command-line flags on 127.0.0.1:0, with a
certificate from a throwaway CA kept in a folder updated like a kubelet-mounted
Secret (tests/support/secret_volume.py), so rotation is tested the way
cert-manager does it. Patches are decoded, applied with `jsonpatch` and
validated against the Kubernetes 1.30 schema; the Envoy of envoy mode is
checked by the real Envoy binary.
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lastguard.operator import flags, inject, inject_spec, webhook
from lastguard.operator.webhook import WebhookError, WebhookHandle
from tests.support import admission, certs
from tests.support.admission import api_server_pod
from tests.support.envoy import envoy_binary
from tests.support.secret_volume import SecretVolume

pytestmark = pytest.mark.e2e

NS = "shop"
OWN_NAMESPACE = "lastguard-system"
IMAGE = "ghcr.io/lastguard/lastguard:0.1.0"
LABELS = {"app": "orders", "lastguard.dev/inject": "true"}


# --- the server and a client ---------------------------------------------------------------


@dataclass
class Tls:
    volume: SecretVolume
    ca: Path  # what the client trusts

    def rotate(self, folder: Path, name: str) -> Path:
        """New CA and certificate; returns the new CA's file."""
        authority = certs.CertificateAuthority.create(name)
        cert, key = authority.issue_server()
        self.volume.write({"tls.crt": cert, "tls.key": key})
        ca = folder / f"{name}.pem"
        ca.write_bytes(authority.cert_pem)
        return ca


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    volume = SecretVolume(tmp_path / "webhook-tls")
    files = Tls(volume, tmp_path / "unused")
    files.ca = files.rotate(tmp_path, "first-ca")
    return files


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_webhook_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
async def server(
    tls: Tls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[WebhookHandle]:
    # The operator's namespace as it finds it in a pod; excluded without a flag.
    namespace_file = tmp_path / "serviceaccount-namespace"
    namespace_file.write_text(OWN_NAMESPACE)
    monkeypatch.setattr(webhook, "SERVICE_ACCOUNT_NAMESPACE", namespace_file)
    args = parse_flags(
        "--webhook-listen", "127.0.0.1:0",
        "--webhook-cert", str(tls.volume.path("tls.crt")),
        "--webhook-key", str(tls.volume.path("tls.key")),
        "--webhook-exclude-namespace", "legacy",
        "--inject-image", IMAGE,
    )  # fmt: skip
    assert flags.webhook_enabled(args)
    handle = await webhook.start_webhook(args)
    yield handle
    await handle.close()


@dataclass
class Answer:
    status: int
    body: Any

    @property
    def response(self) -> dict[str, Any]:
        assert self.status == 200, self.body
        assert self.body["apiVersion"] == "admission.k8s.io/v1"
        assert self.body["kind"] == "AdmissionReview"
        return self.body["response"]  # type: ignore[no-any-return]


async def call(
    server: WebhookHandle,
    body: bytes | dict[str, Any],
    ca: Path,
    *,
    method: str = "POST",
    path: str = "/inject",
) -> Answer:
    """One request on a new TLS connection that trusts only `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    connector = aiohttp.TCPConnector(ssl=context, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method, server.url + path, data=data, headers={"Content-Type": "application/json"}
        ) as reply,
    ):
        text = await reply.text()
        try:
            return Answer(reply.status, json.loads(text))
        except json.JSONDecodeError:
            return Answer(reply.status, text)


# --- pods that get injected ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "containers"),
    [
        pytest.param(None, ["orders", "lastguard"], id="sidecar-mode"),
        pytest.param(
            {"lastguard.dev/mode": "envoy"},
            ["orders", "lastguard", "lastguard-envoy"],
            id="envoy-mode",
        ),
    ],
)
async def test_a_labelled_pod_comes_back_patched_as_documented(
    server: WebhookHandle, tls: Tls, annotations: dict[str, str] | None, containers: list[str]
) -> None:
    pod = api_server_pod(labels=LABELS, annotations=annotations)
    review = admission.review(pod, namespace=NS)

    response = (await call(server, review, tls.ca)).response

    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True
    patched = admission.apply(pod, admission.decode_patch(response))
    admission.validate(patched)
    assert admission.problems(patched) == []
    assert [c["name"] for c in patched["spec"]["containers"]] == containers
    sidecar = admission.container(patched, "lastguard")
    assert sidecar["image"] == IMAGE
    # The default policy server is the operator's Service in the operator's namespace.
    assert sidecar["args"][sidecar["args"].index("--policy-server") + 1] == (
        "lastguard-operator.lastguard-system.svc:15010"
    )
    assert sidecar["args"][sidecar["args"].index("--listen") + 1] == "127.0.0.1:9191"
    assert patched["metadata"]["annotations"]["lastguard.dev/injected"] == "true"
    # What the unit tests pin in detail is exactly what goes over the wire.
    config = inject_spec.InjectionConfig(
        IMAGE,
        "lastguard-operator.lastguard-system.svc:15010",
        excluded_namespaces=frozenset({"legacy", OWN_NAMESPACE}),
    )
    assert patched == admission.apply(pod, inject.patch_for(pod, NS, config) or [])


async def test_the_injected_envoy_command_line_is_accepted_by_envoy(
    server: WebhookHandle, tls: Tls
) -> None:
    annotations = {
        "lastguard.dev/mode": "envoy",
        "lastguard.dev/app-port": "3000",
        "lastguard.dev/envoy-port": "8000",
    }
    pod = api_server_pod(labels=LABELS, annotations=annotations, app_port=3000)
    response = (await call(server, admission.review(pod), tls.ca)).response
    envoy = admission.container(
        admission.apply(pod, admission.decode_patch(response)), "lastguard-envoy"
    )

    checked = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", *envoy["args"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "OK" in checked.stdout + checked.stderr


async def test_envoy_mode_warns_about_app_probes_on_the_app_port(
    server: WebhookHandle, tls: Tls
) -> None:
    pod = api_server_pod(labels=LABELS, annotations={"lastguard.dev/mode": "envoy"})
    pod["spec"]["containers"][0]["livenessProbe"] = {"httpGet": {"path": "/", "port": "http"}}

    response = (await call(server, admission.review(pod), tls.ca)).response

    assert response["allowed"] is True
    assert response["warnings"] == [
        "container orders: livenessProbe targets the app port 8081; probe the Envoy port 8080 "
        "instead"
    ]


async def test_a_dry_run_gets_the_same_patch(server: WebhookHandle, tls: Tls) -> None:
    pod = api_server_pod(labels=LABELS)
    real = (await call(server, admission.review(pod, uid="a"), tls.ca)).response
    dry = (await call(server, admission.review(pod, uid="a", dry_run=True), tls.ca)).response
    assert dry == real


async def test_an_injected_pod_sent_again_is_untouched(server: WebhookHandle, tls: Tls) -> None:
    # reinvocationPolicy: IfNeeded sends the pod again after other webhooks changed it.
    pod = api_server_pod(labels=LABELS)
    first = (await call(server, admission.review(pod), tls.ca)).response
    again = admission.apply(pod, admission.decode_patch(first))
    review = admission.review(again)
    assert (await call(server, review, tls.ca)).response == {
        "uid": review["request"]["uid"],
        "allowed": True,
    }


# --- pods and requests that are left alone -------------------------------------------------


@pytest.mark.parametrize(
    "review",
    [
        pytest.param(admission.review(api_server_pod(labels={"app": "orders"})), id="no-label"),
        pytest.param(
            admission.review(api_server_pod(labels=None, service_account_volume=False)),
            id="no-labels-no-volumes",
        ),
        pytest.param(
            admission.review(
                api_server_pod(namespace="kube-system", labels=LABELS), namespace="kube-system"
            ),
            id="kube-system",
        ),
        pytest.param(
            admission.review(
                api_server_pod(namespace=OWN_NAMESPACE, labels=LABELS), namespace=OWN_NAMESPACE
            ),
            id="operator-own-namespace",
        ),
        pytest.param(
            admission.review(api_server_pod(namespace="legacy", labels=LABELS), namespace="legacy"),
            id="excluded-by-flag",
        ),
        pytest.param(
            admission.review(api_server_pod(labels=LABELS), operation="UPDATE"),
            id="pod-update",
        ),
        pytest.param(
            admission.review(
                api_server_pod(labels=LABELS),
                operation="UPDATE",
                sub_resource="ephemeralcontainers",
            ),
            id="pod-subresource",
        ),
        pytest.param(
            admission.review(
                {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "orders"}},
                kind=("apps", "v1", "Deployment"),
                resource=("apps", "v1", "deployments"),
            ),
            id="not-a-pod",
        ),
        pytest.param(
            admission.review(None, operation="DELETE"),
            id="delete-without-object",
        ),
    ],
)
async def test_everything_else_is_allowed_untouched(
    server: WebhookHandle, tls: Tls, review: dict[str, Any]
) -> None:
    answer = await call(server, review, tls.ca)
    assert answer.response == {"uid": review["request"]["uid"], "allowed": True}


# --- refusals and malformed reviews --------------------------------------------------------


async def test_a_pod_that_cannot_be_injected_is_denied_with_the_reason(
    server: WebhookHandle, tls: Tls
) -> None:
    pod = api_server_pod(labels=LABELS, annotations={"lastguard.dev/mode": "istio"})
    review = admission.review(pod)

    response = (await call(server, review, tls.ca)).response

    assert response == {
        "uid": review["request"]["uid"],
        "allowed": False,
        "status": {
            "code": 400,
            "message": "lastguard cannot inject this pod: annotation lastguard.dev/mode: "
            "'istio' is not one of sidecar, envoy",
        },
    }


async def test_an_unexpected_error_denies_the_pod_cleanly(
    server: WebhookHandle, tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(inject, "decide", broken)
    review = admission.review(api_server_pod(labels=LABELS))

    response = (await call(server, review, tls.ca)).response

    # Fail closed: only pods that asked for lastguard reach the webhook.
    assert response == {
        "uid": review["request"]["uid"],
        "allowed": False,
        "status": {
            "code": 500,
            "message": (
                "lastguard: internal error while injecting this pod; see the operator's logs"
            ),
        },
    }


def _review_with(**changes: Any) -> dict[str, Any]:
    review = admission.review(api_server_pod(labels=LABELS))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = review
        for parent in parents:
            target = target[parent]
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    return review


_DELETE = object()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"", "the body is not JSON", id="empty"),
        pytest.param(b"{not json", "the body is not JSON", id="not-json"),
        pytest.param(b"\xff\xfe{}", "the body is not JSON", id="not-utf8"),
        pytest.param(b"[" * 100_000, "the body is not JSON", id="nested-too-deep"),
        pytest.param(b"[]", "the body must be a JSON object", id="array"),
        pytest.param(
            _review_with(kind="Pod"), "kind must be AdmissionReview, got 'Pod'", id="wrong-kind"
        ),
        pytest.param(
            _review_with(apiVersion="admission.k8s.io/v1beta1"),
            "apiVersion must be admission.k8s.io/v1",
            id="v1beta1",
        ),
        pytest.param(_review_with(request=_DELETE), "request is missing", id="no-request"),
        pytest.param(_review_with(request="x"), "request must be an object", id="request-string"),
        pytest.param(_review_with(request__uid=_DELETE), "request.uid is missing", id="no-uid"),
        pytest.param(_review_with(request__uid=""), "request.uid is empty", id="empty-uid"),
        pytest.param(_review_with(request__uid=42), "request.uid must be a string", id="int-uid"),
        pytest.param(_review_with(request__kind=_DELETE), "request.kind is missing", id="no-kind"),
        pytest.param(
            _review_with(request__operation=_DELETE),
            "request.operation is missing",
            id="no-operation",
        ),
        pytest.param(
            _review_with(request__object=_DELETE), "request.object is missing", id="no-object"
        ),
        pytest.param(
            _review_with(request__object=None), "request.object is missing", id="null-object"
        ),
        pytest.param(
            _review_with(request__object=["pod"]),
            "request.object must be an object",
            id="object-not-a-map",
        ),
        pytest.param(
            _review_with(request__object={"metadata": {"labels": LABELS}, "spec": {}}),
            "request.object: spec.containers: a pod needs at least one container",
            id="pod-without-containers",
        ),
        pytest.param(
            _review_with(request__namespace=_DELETE, request__object={"spec": {}}),
            "request.namespace is missing for a Pod",
            id="no-namespace",
        ),
    ],
)
async def test_a_malformed_review_is_a_clean_400(
    server: WebhookHandle, tls: Tls, body: bytes | dict[str, Any], message: str
) -> None:
    answer = await call(server, body, tls.ca)
    assert answer.status == 400
    assert answer.body["error"] == "malformed AdmissionReview"
    assert message in answer.body["message"]
    assert "Traceback" not in json.dumps(answer.body)


async def test_the_namespace_may_come_from_the_pod_when_the_request_lacks_it(
    server: WebhookHandle, tls: Tls
) -> None:
    review = _review_with(request__namespace=_DELETE)
    assert (await call(server, review, tls.ca)).response["patchType"] == "JSONPatch"
    kube_system = api_server_pod(namespace="kube-system", labels=LABELS)
    review = _review_with(request__namespace=_DELETE, request__object=kube_system)
    assert "patch" not in (await call(server, review, tls.ca)).response


async def test_a_review_bigger_than_any_pod_is_refused(server: WebhookHandle, tls: Tls) -> None:
    pod = api_server_pod(labels=LABELS, annotations={"big": "x" * (5 * 1024 * 1024)})
    assert (await call(server, admission.review(pod), tls.ca)).status == 413


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("GET", "/healthz", 200, id="healthz"),
        pytest.param("GET", "/inject", 405, id="get-inject"),
        pytest.param("POST", "/mutate", 404, id="unknown-path"),
    ],
)
async def test_other_routes(
    server: WebhookHandle, tls: Tls, method: str, path: str, status: int
) -> None:
    assert (await call(server, b"", tls.ca, method=method, path=path)).status == status


# --- certificates --------------------------------------------------------------------------


async def test_a_rotated_certificate_is_served_from_the_next_connection(
    server: WebhookHandle, tls: Tls, tmp_path: Path
) -> None:
    review = admission.review(api_server_pod(labels=LABELS))
    first_ca = tls.ca
    assert (await call(server, review, first_ca)).status == 200

    second_ca = tls.rotate(tmp_path, "second-ca")

    assert (await call(server, review, second_ca)).status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await call(server, review, first_ca)


async def test_a_broken_certificate_update_keeps_the_last_good_one(
    server: WebhookHandle, tls: Tls, tmp_path: Path
) -> None:
    review = admission.review(api_server_pod(labels=LABELS))
    cert, _ = certs.CertificateAuthority.create("other").issue_server()
    _, unrelated_key = certs.CertificateAuthority.create("other").issue_server()

    tls.volume.write({"tls.crt": cert, "tls.key": unrelated_key})  # key does not match
    assert (await call(server, review, tls.ca)).status == 200
    tls.volume.write({"tls.crt": b"not a certificate", "tls.key": b"nor a key"})
    assert (await call(server, review, tls.ca)).status == 200

    # ...and a good pair after the bad ones is picked up.
    third_ca = tls.rotate(tmp_path, "third-ca")
    assert (await call(server, review, third_ca)).status == 200


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["--webhook-cert", "c.pem", "--inject-image", IMAGE],
            "the webhook needs both --webhook-cert and --webhook-key",
            id="cert-without-key",
        ),
        pytest.param(
            ["--webhook-cert", "c.pem", "--webhook-key", "k.pem"],
            "the webhook needs --inject-image",
            id="no-image",
        ),
        pytest.param(
            ["--webhook-cert", "c", "--webhook-key", "k", "--inject-image", IMAGE],
            "give --inject-policy-server",
            id="no-namespace-no-policy-server",
        ),
        pytest.param(
            [
                "--webhook-cert", "c", "--webhook-key", "k", "--inject-image", IMAGE,
                "--inject-policy-server", "lg:15010", "--inject-memory-limit", "lots",
            ],
            "--inject-memory-limit: 'lots' is not a Kubernetes quantity",
            id="bad-quantity",
        ),
    ],
)  # fmt: skip
def test_bad_flags_are_named(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(webhook, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(WebhookError, match=message):
        webhook.config_from(parse_flags(*argv))


def test_without_certificate_flags_the_webhook_is_off() -> None:
    assert not flags.webhook_enabled(parse_flags())


async def test_certificate_files_that_do_not_load_stop_the_start(tmp_path: Path) -> None:
    args = parse_flags(
        "--webhook-listen", "127.0.0.1:0",
        "--webhook-cert", str(tmp_path / "missing.crt"),
        "--webhook-key", str(tmp_path / "missing.key"),
        "--inject-image", IMAGE,
        "--inject-policy-server", "lg:15010",
    )  # fmt: skip
    with pytest.raises(WebhookError, match="cannot load --webhook-cert"):
        await webhook.start_webhook(args)
