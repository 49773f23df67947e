"""The sidecar-injection webhook: a mutating admission webhook over HTTPS. An I/O edge.

`POST /inject` takes an `admission.k8s.io/v1` AdmissionReview and answers one with
the same `uid`; `GET /healthz` says the server is up. What gets injected is
decided by the pure `lastguard.operator.inject`.

Answers:
- a pod to inject: allowed, with a base64 JSONPatch (and warnings, if any);
- anything else that is well formed (no label, excluded namespace, already
  injected, not a pod CREATE): allowed, untouched;
- a pod that asks for injection but cannot have it (`InjectionRefused`): denied
  with the reason, so it never starts unprotected;
- an unexpected error while deciding: denied with code 500 and a pointer to the
  logs (fail closed; only pods that asked for injection reach this webhook);
- a malformed review (not JSON, not an AdmissionReview v1, no request, uid or
  object): HTTP 400 with a one-line JSON message, never a traceback.

Certificates (`--webhook-cert`, `--webhook-key`) are re-read when they change:
cert-manager or the chart rotates them in place. Every TLS handshake stats both
files (the server context's SNI callback, which OpenSSL calls with or without
SNI) and, when they changed, builds a new SSLContext and hands it to that
connection; a pair that fails to load is logged and the last good one stays.

Every replica serves the webhook, leader or not: it has no state.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from lastguard.operator import inject, inject_spec
from lastguard.operator.bootstrap import Protocol
from lastguard.sidecar.errors import LastguardError

log = logging.getLogger("lastguard.operator.webhook")

API_VERSION = "admission.k8s.io/v1"
INJECT_PATH = "/inject"
#: A pod is at most ~1.5 MiB in etcd; a review carries one object (CREATE has no oldObject).
MAX_REVIEW_BYTES = 4 * 1024 * 1024
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

INJECTIONS = Counter(
    "lastguard_operator_injections_total",
    "Admission reviews answered by the injection webhook, by result "
    "(injected, not-requested, already-injected, excluded-namespace, not-a-pod-create, "
    "refused, malformed, error).",
    ["result"],
)

_QUANTITY = re.compile(r"([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


class WebhookError(LastguardError):
    """The webhook cannot start: bad flags, or certificate files that do not load."""


class MalformedReview(LastguardError):
    """The request body is not an AdmissionReview v1 the API server would send."""


# --- the review (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Review:
    uid: str
    kind: tuple[str, str, str]  # group, version, kind
    operation: str
    namespace: str
    sub_resource: str
    object: Mapping[str, Any] | None

    @property
    def is_pod_create(self) -> bool:
        return (
            self.kind == ("", "v1", "Pod") and self.operation == "CREATE" and not self.sub_resource
        )


_JSON_TYPES: dict[type, str] = {dict: "an object", str: "a string"}


def _field(parent: Mapping[str, Any], key: str, kind: type, where: str, *, required: bool) -> Any:
    value = parent.get(key)
    if value is None and not required:
        return kind()
    if not isinstance(value, kind):
        problem = "is missing" if value is None else f"must be {_JSON_TYPES[kind]}"
        raise MalformedReview(f"{where}{key} {problem}")
    return value


def parse_review(body: bytes) -> Review:
    """The parts of an AdmissionReview request the webhook needs; raises MalformedReview."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MalformedReview(f"the body is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedReview("the body must be a JSON object (an AdmissionReview)")
    if document.get("kind") != "AdmissionReview":
        raise MalformedReview(f"kind must be AdmissionReview, got {document.get('kind')!r}")
    if document.get("apiVersion") != API_VERSION:
        raise MalformedReview(
            f"apiVersion must be {API_VERSION} (admissionReviewVersions: [v1]), "
            f"got {document.get('apiVersion')!r}"
        )
    request = _field(document, "request", dict, "", required=True)
    uid = _field(request, "uid", str, "request.", required=True)
    if not uid:
        raise MalformedReview("request.uid is empty")
    kind = _field(request, "kind", dict, "request.", required=True)
    group = _field(kind, "group", str, "request.kind.", required=False)
    version = _field(kind, "version", str, "request.kind.", required=True)
    kind_name = _field(kind, "kind", str, "request.kind.", required=True)
    operation = _field(request, "operation", str, "request.", required=True)
    namespace = _field(request, "namespace", str, "request.", required=False)
    review = Review(
        uid=uid,
        kind=(group, version, kind_name),
        operation=operation,
        namespace=namespace,
        sub_resource=_field(request, "subResource", str, "request.", required=False),
        object=None,
    )
    if not review.is_pod_create:
        return review
    pod = _field(request, "object", dict, "request.", required=True)
    if not namespace:
        # The API server always sets request.namespace for a pod; tolerate a hand-made review.
        metadata = pod.get("metadata")
        namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
        if not (isinstance(namespace, str) and namespace):
            raise MalformedReview("request.namespace is missing for a Pod")
    return dataclasses.replace(review, namespace=namespace, object=pod)


def review_response(
    uid: str,
    *,
    allowed: bool,
    patch: list[dict[str, Any]] | None = None,
    warnings: tuple[str, ...] = (),
    code: int | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """An AdmissionReview v1 answer."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch is not None:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()
        ).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    if code is not None or message is not None:
        response["status"] = {k: v for k, v in (("code", code), ("message", message)) if v}
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def _pod_name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or f"{metadata.get('generateName') or ''}*")


def admit(review: Review, config: inject_spec.InjectionConfig) -> tuple[str, dict[str, Any]]:
    """(result word, AdmissionReview answer) for a parsed review.

    Raises MalformedReview for an object that is not shaped like a Pod.
    """
    if not review.is_pod_create or review.object is None:
        return "not-a-pod-create", review_response(review.uid, allowed=True)
    try:
        decision = inject.decide(review.object, review.namespace, config)
    except inject.MalformedPod as exc:
        raise MalformedReview(f"request.object: {exc}") from exc
    except inject.InjectionRefused as exc:
        message = f"lastguard cannot inject this pod: {exc}"
        return "refused", review_response(review.uid, allowed=False, code=400, message=message)
    return decision.reason, review_response(
        review.uid, allowed=True, patch=decision.patch, warnings=decision.warnings
    )


# --- certificates --------------------------------------------------------------------------


def _fingerprint(*paths: Path) -> tuple[tuple[int, int, int, int], ...]:
    # A kubelet-mounted Secret changes by a symlink swap: new inode and mtime.
    out = []
    for path in paths:
        st = path.stat()
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class ReloadingTls:
    """A server SSLContext whose certificate follows the files on disk."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        try:
            self._seen = _fingerprint(cert, key)
            self.context = _server_context(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise WebhookError(
                f"cannot load --webhook-cert {cert} / --webhook-key {key}: {exc}"
            ) from exc
        self._current = self.context
        self.context.sni_callback = self._on_handshake

    def _on_handshake(self, connection: Any, _server_name: str | None, _: ssl.SSLContext) -> None:
        try:
            self._reload_if_changed()
        except Exception:  # a callback that raises aborts the handshake; keep serving
            log.exception("webhook certificate check failed; serving the last good one")
        if self._current is not self.context:
            connection.context = self._current

    def _reload_if_changed(self) -> None:
        try:
            seen = _fingerprint(self.cert, self.key)
        except OSError as exc:
            log.warning("webhook certificate files unreadable, serving the last good ones: %s", exc)
            return
        if seen == self._seen:
            return
        self._seen = seen  # a bad pair is reported once, then retried when the files change
        try:
            self._current = _server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("new webhook certificate does not load, serving the last good one: %s", exc)
            return
        log.info("webhook certificate reloaded", extra={"fields": {"cert": str(self.cert)}})


# --- flags ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    listen: str
    cert: Path
    key: Path
    injection: inject_spec.InjectionConfig


def _own_namespace() -> str | None:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return os.environ.get("POD_NAMESPACE") or None


def _resources(args: argparse.Namespace, prefix: str) -> inject_spec.Resources:
    values = {
        name: getattr(args, f"{prefix}_{name}")
        for name in ("cpu_request", "memory_request", "memory_limit")
    }
    for name, value in values.items():
        if value and not _QUANTITY.fullmatch(value):
            flag = f"--{prefix}-{name}".replace("_", "-")
            raise WebhookError(f"{flag}: {value!r} is not a Kubernetes quantity such as 64Mi")
    return inject_spec.Resources(**values)


def config_from(args: argparse.Namespace) -> WebhookConfig:
    if not (args.webhook_cert and args.webhook_key):
        raise WebhookError("the webhook needs both --webhook-cert and --webhook-key")
    if not args.inject_image:
        raise WebhookError("the webhook needs --inject-image (the lastguard sidecar image)")
    own = _own_namespace()
    excluded = set(args.webhook_exclude_namespace)
    if own:
        excluded.add(own)
    policy_server = args.inject_policy_server
    if not policy_server:
        if not own:
            raise WebhookError(
                "cannot tell the operator's namespace: give --inject-policy-server HOST:PORT"
            )
        policy_server = f"lastguard-operator.{own}.svc:15010"
    injection = inject_spec.InjectionConfig(
        image=args.inject_image,
        policy_server=policy_server,
        image_pull_policy=args.inject_image_pull_policy,
        ca_configmap=args.inject_ca_configmap,
        ca_key=args.inject_ca_key,
        envoy_image=args.inject_envoy_image,
        resources=_resources(args, "inject"),
        envoy_resources=_resources(args, "inject_envoy"),
        default_mode=inject_spec.Mode(args.inject_default_mode),
        default_protocol=Protocol(args.inject_default_protocol),
        log_level=args.inject_log_level,
        excluded_namespaces=frozenset(excluded),
    )
    return WebhookConfig(args.webhook_listen, args.webhook_cert, args.webhook_key, injection)


# --- the server ----------------------------------------------------------------------------


def build_app(config: inject_spec.InjectionConfig) -> web.Application:
    def malformed(exc: Exception) -> web.Response:
        INJECTIONS.labels("malformed").inc()
        log.warning("malformed admission review: %s", exc)
        body = {"error": "malformed AdmissionReview", "message": str(exc)}
        return web.json_response(body, status=400)

    async def inject_pod(request: web.Request) -> web.Response:
        body = await request.read()  # over MAX_REVIEW_BYTES: aiohttp answers 413
        try:
            review = parse_review(body)
        except MalformedReview as exc:
            return malformed(exc)
        try:
            result, answer = admit(review, config)
        except MalformedReview as exc:  # the object is not shaped like a Pod
            return malformed(exc)
        except Exception:
            # A bug while deciding. Deny rather than admit the pod unprotected (only pods
            # that ask for injection come here); the API server still gets a clean answer.
            INJECTIONS.labels("error").inc()
            log.exception("injection failed", extra={"fields": {"uid": review.uid}})
            message = "lastguard: internal error while injecting this pod; see the operator's logs"
            answer = review_response(review.uid, allowed=False, code=500, message=message)
            return web.json_response(answer)
        INJECTIONS.labels(result).inc()
        _log_result(review, result, answer)
        return web.json_response(answer)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app.router.add_post(INJECT_PATH, inject_pod)
    app.router.add_get("/healthz", healthz)
    return app


def _log_result(review: Review, result: str, answer: dict[str, Any]) -> None:
    if result == "not-a-pod-create":
        log.debug("ignored: not a pod CREATE", extra={"fields": {"uid": review.uid}})
        return
    fields = {
        "uid": review.uid,
        "namespace": review.namespace,
        "pod": _pod_name(review.object or {}),
        "result": result,
    }
    if result == "refused":
        fields["reason"] = answer["response"]["status"]["message"]
        log.warning("pod refused", extra={"fields": fields})
    elif result == "excluded-namespace":
        # The namespaceSelector should never have sent it: say so.
        log.warning("pod asks for injection in an excluded namespace", extra={"fields": fields})
    elif result == "injected":
        log.info("pod injected", extra={"fields": fields})
    else:
        log.debug("pod not injected", extra={"fields": fields})


@dataclass(slots=True)
class WebhookHandle:
    """A running webhook server: where it listens and how to stop it."""

    url: str
    port: int
    runner: web.AppRunner
    tls: ReloadingTls

    async def close(self) -> None:
        await self.runner.cleanup()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


async def serve(config: WebhookConfig) -> WebhookHandle:
    """Serves the webhook on config.listen (port 0: any free port)."""
    tls = ReloadingTls(config.cert, config.key)
    runner = web.AppRunner(build_app(config.injection), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    host, port = _split(config.listen)
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls.context).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    url = f"https://{f'[{host}]' if ':' in host else host}:{bound}"
    log.info(
        "injection webhook started",
        extra={
            "fields": {
                "listen": f"{host}:{bound}",
                "excluded_namespaces": sorted(
                    inject_spec.ALWAYS_EXCLUDED | config.injection.excluded_namespaces
                ),
                "default_mode": str(config.injection.default_mode),
                "default_protocol": str(config.injection.default_protocol),
            }
        },
    )
    return WebhookHandle(url, bound, runner, tls)


async def start_webhook(args: argparse.Namespace) -> WebhookHandle:
    """Starts the webhook from `add_webhook_arguments` flags; raises WebhookError on bad ones."""
    return await serve(config_from(args))
