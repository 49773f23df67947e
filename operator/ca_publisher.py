"""Publishes the CA bundle as ConfigMap `lastguard-ca` in every namespace with injection on.

Injected sidecars verify the operator's policy channel with the chart's CA, and
a pod can mount ConfigMaps of its own namespace only; so, like Istio's
istio-ca-root-cert, the operator copies the bundle (a PEM file the chart
mounts) into each namespace labelled `lastguard.dev/injection: enabled`, the
label the injection webhook's namespaceSelector matches.

The rules (`desired`, `plan`: pure, no I/O):
- A labelled namespace without the ConfigMap gets one, labelled
  `app.kubernetes.io/managed-by: lastguard`, with the bundle under `ca.crt`.
- A ConfigMap with that label is lastguard's: when its data is not exactly the
  bundle, it is replaced (with the resourceVersion read, so a concurrent
  writer gets a 409, not a lost update).
- A ConfigMap of that name without the label is someone else's: it is never
  written; the leader logs a warning and posts a Warning Event about it, once
  per object.
- A namespace that loses the label keeps its ConfigMap. It is never deleted,
  and while it exists it is still kept current, but it is not recreated once
  deleted. Pods injected while the label was on still mount it (they cannot
  restart without it) and must follow a CA rotation. Istio leaves its
  ConfigMaps behind too. To clean up, delete it.
- Terminating namespaces get nothing (the API server refuses creates there).

How (`CaPublisher`, an edge): only the leader works. Every `interval`, and at
once when this replica becomes the leader, one pass reads the CA file (small,
swapped atomically by the kubelet; a rotation shows in the next pass), lists
the labelled namespaces and the ConfigMaps of that name in all namespaces (two
requests, both served from the API server's watch cache), and writes the
difference. A periodic pass rather than watches: it holds no watch state, so a
deleted ConfigMap, a missed event, a 410 Gone or a change by hand are all
repaired by the next pass; it needs no cluster-wide ConfigMap stream (kopf
would stream every ConfigMap and filter locally); and it works whatever
namespaces the JWTPolicy watch is limited to. The price is latency: a new or
deleted ConfigMap appears within `interval`, during which pods that mount it
wait in ContainerCreating (the kubelet retries).

Failures: a 409 (or a 404 on replace) re-reads the object and decides again,
up to three times in a pass. A 5xx, 429, timeout or unreadable bundle makes the
next pass come sooner (`retry_backoff`, doubling). An invalid bundle file is
never published: the last good bundle stays in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import Counter, Gauge

from lastguard.operator import inject, kube

log = logging.getLogger("lastguard.operator.ca")

INJECTION_LABEL = inject.NAMESPACE_LABEL
INJECTION_ENABLED = inject.NAMESPACE_ENABLED
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "lastguard"
NOT_MANAGED_REASON = "CaBundleNotManaged"

WRITES = Counter(
    "lastguard_operator_ca_configmap_writes_total",
    "CA bundle ConfigMap writes by action (create, update) and result "
    "(ok, conflict, not_found, unavailable, rejected).",
    ["action", "result"],
)
PASSES = Counter(
    "lastguard_operator_ca_publish_passes_total",
    "CA bundle publishing passes by result (ok, error).",
    ["result"],
)
NOT_MANAGED = Gauge(
    "lastguard_operator_ca_configmaps_not_managed",
    "ConfigMaps of the CA bundle's name, in namespaces with injection enabled, "
    "that lastguard does not own and leaves alone.",
)
BUNDLE_VALID = Gauge(
    "lastguard_operator_ca_bundle_valid",
    "1 when the CA bundle file was last read as PEM certificates, else 0.",
)


# --- the pure core ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Which ConfigMap holds the bundle, and under which data key."""

    name: str = "lastguard-ca"
    key: str = "ca.crt"


class Action(enum.StrEnum):
    CREATE = "create"
    UPDATE = "update"
    NOT_OURS = "not_ours"  # someone else's ConfigMap of that name: left alone, reported
    NONE = "none"  # up to date, or not ours to create


@dataclass(frozen=True, slots=True)
class Step:
    """What to do in one namespace. `body` is the ConfigMap to create or replace."""

    namespace: str
    action: Action
    #: The namespace asks for the bundle (labelled, not terminating).
    wanted: bool
    body: dict[str, Any] | None = None
    #: The uid of the ConfigMap there, if any.
    uid: str | None = None


def injection_enabled(namespace: Mapping[str, Any]) -> bool:
    meta = namespace.get("metadata") or {}
    labels = meta.get("labels") or {}
    return labels.get(INJECTION_LABEL) == INJECTION_ENABLED and not meta.get("deletionTimestamp")


def is_ours(configmap: Mapping[str, Any]) -> bool:
    labels = (configmap.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(MANAGED_BY_LABEL) == MANAGED_BY)


def desired(
    namespace: str,
    bundle: str,
    existing: Mapping[str, Any] | None,
    *,
    wanted: bool,
    target: Target = Target(),
) -> Step:
    """What to do with the ConfigMap in one namespace, given what is there."""
    if existing is None:
        if not wanted:
            return Step(namespace, Action.NONE, wanted)
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": target.name,
                "namespace": namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            },
            "data": {target.key: bundle},
        }
        return Step(namespace, Action.CREATE, wanted, body)
    meta = existing.get("metadata") or {}
    uid = meta.get("uid")
    if not is_ours(existing):
        # Outside labelled namespaces, a ConfigMap of that name is no concern of ours.
        return Step(namespace, Action.NOT_OURS if wanted else Action.NONE, wanted, uid=uid)
    if existing.get("data") == {target.key: bundle} and not existing.get("binaryData"):
        return Step(namespace, Action.NONE, wanted, uid=uid)
    # Everything on the object's metadata is kept (labels and annotations of others,
    # owner references, finalizers), and its resourceVersion makes the write conditional.
    kept = {k: v for k, v in meta.items() if k != "managedFields"}
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **kept,
            "name": target.name,
            "namespace": namespace,
            "labels": {**(meta.get("labels") or {}), MANAGED_BY_LABEL: MANAGED_BY},
        },
        "data": {target.key: bundle},
    }
    return Step(namespace, Action.UPDATE, wanted, body, uid)


def plan(
    namespaces: Iterable[Mapping[str, Any]],
    configmaps: Iterable[Mapping[str, Any]],
    bundle: str,
    target: Target = Target(),
) -> list[Step]:
    """One step per namespace that is labelled or has a ConfigMap of that name, sorted.

    Both inputs are filtered here as well, whatever selectors the lists used.
    """
    wanted = {
        (ns.get("metadata") or {}).get("name", ""): injection_enabled(ns) for ns in namespaces
    }
    existing: dict[str, Mapping[str, Any]] = {}
    for cm in configmaps:
        meta = cm.get("metadata") or {}
        if meta.get("name") == target.name and meta.get("namespace"):
            existing[meta["namespace"]] = cm
    steps = []
    for namespace in sorted(set(wanted) | set(existing)):
        if namespace:
            steps.append(
                desired(
                    namespace,
                    bundle,
                    existing.get(namespace),
                    wanted=wanted.get(namespace, False),
                    target=target,
                )
            )
    return steps


class BundleError(Exception):
    """The CA bundle file cannot be read, or is not PEM certificates."""


def parse_bundle(data: bytes) -> str:
    """The file's text, once it is known to hold PEM certificates and no private key.

    Every namespace can read what is published: a key must never get there.
    """
    if b"PRIVATE KEY-----" in data:
        raise BundleError("it holds a private key: not publishing it")
    try:
        text = data.decode("ascii")
        certificates = x509.load_pem_x509_certificates(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError("not PEM certificates") from exc
    if not certificates:  # cryptography raises instead, today; kept should that change
        raise BundleError("no certificate in it")
    return text


# --- the publisher ---------------------------------------------------------------------


@dataclass
class PassResult:
    """What one pass did. `retry`: something failed that may work soon (5xx, a bad read)."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    not_ours: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retry: bool = False


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Waits until `event` is set or `seconds` pass (not `wait_for`: see controller._wait)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class CaPublisher:
    def __init__(
        self,
        api: kube.KubeApi,
        bundle_file: Path,
        *,
        target: Target = Target(),
        is_leader: Callable[[], bool] = lambda: True,
        identity: str = "",
        now: Callable[[], datetime.datetime] = _utcnow,
        interval: float = 10.0,
        retry_backoff: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
        max_concurrent_writes: int = 8,
    ) -> None:
        self.api = api
        self.bundle_file = bundle_file
        self.target = target
        self._is_leader = is_leader
        self._identity = identity
        self._now = now
        self._interval = interval
        self._retry_backoff = tuple(retry_backoff) or (interval,)
        self._write_slots = asyncio.Semaphore(max_concurrent_writes)
        self._wake = asyncio.Event()
        #: The last good bundle, and the last reason the file could not be used.
        self.bundle: str | None = None
        self._bundle_problem: str | None = None
        #: ConfigMaps not ours already reported: (namespace, uid).
        self._reported: set[tuple[str, str | None]] = set()

    # --- running ---

    async def run(self) -> None:
        """Publishes while this replica leads, until cancelled."""
        failures = 0
        while True:
            if self._is_leader():
                result = await self.publish()
                failures = failures + 1 if result.retry else 0
            else:
                failures = 0
            delay = self._interval
            if failures:
                delay = min(delay, self._retry_backoff[min(failures, len(self._retry_backoff)) - 1])
            await _wait(self._wake, delay)
            self._wake.clear()

    def leadership_changed(self, leader: bool) -> None:
        """The elector's callback: a new leader publishes at once."""
        if leader:
            self._wake.set()

    # --- one pass ---

    async def publish(self) -> PassResult:
        """Reads the bundle, lists, and writes what differs. Leader only (the caller checks)."""
        result = PassResult()
        bundle = self.read_bundle()
        if bundle is None:
            PASSES.labels(result="error").inc()
            result.retry = True
            return result
        try:
            namespaces = await self.api.list_namespaces(f"{INJECTION_LABEL}={INJECTION_ENABLED}")
            configmaps = await self.api.list_configmaps(self.target.name)
        except kube.ApiError as exc:
            PASSES.labels(result="error").inc()
            log.warning("CA bundle: cannot list namespaces and ConfigMaps: %s", exc)
            result.retry = True
            return result
        steps = plan(namespaces, configmaps, bundle, self.target)
        writes = [s for s in steps if s.action in (Action.CREATE, Action.UPDATE)]
        await asyncio.gather(*(self._apply(step, bundle, result) for step in writes))
        await self._report_not_ours([s for s in steps if s.action is Action.NOT_OURS], result)
        PASSES.labels(result="error" if result.failed else "ok").inc()
        for what, names in (("created", result.created), ("updated", result.updated)):
            if names:
                log.info("CA bundle ConfigMap %s", what, extra={"fields": {"namespaces": names}})
        return result

    def read_bundle(self) -> str | None:
        """The bundle to publish: the file's, or the last good one if the file is bad now."""
        try:
            bundle = parse_bundle(self.bundle_file.read_bytes())
        except (OSError, BundleError) as exc:
            problem = f"{self.bundle_file}: {exc}"
            BUNDLE_VALID.set(0)
            if problem != self._bundle_problem:
                self._bundle_problem = problem
                kept = "keeping the last good bundle" if self.bundle else "publishing nothing"
                log.error("CA bundle unusable, %s: %s", kept, problem)
            return self.bundle
        BUNDLE_VALID.set(1)
        self._bundle_problem = None
        if bundle != self.bundle:
            digest = hashlib.sha256(bundle.encode()).hexdigest()[:16]
            log.info(
                "CA bundle %s",
                "changed" if self.bundle else "read",
                extra={"fields": {"file": str(self.bundle_file), "sha256": digest}},
            )
            self.bundle = bundle
        return bundle

    async def _apply(self, step: Step, bundle: str, result: PassResult) -> None:
        async with self._write_slots:
            for _ in range(3):  # re-reads after a 409; the next pass tries again after that
                if not self._is_leader():
                    return
                next_step = await self._write_once(step, bundle, result)
                if next_step is None:
                    return
                step = next_step
            result.failed.append(step.namespace)
            result.retry = True

    async def _write_once(self, step: Step, bundle: str, result: PassResult) -> Step | None:
        """One write; the step to try next after a 409 (decided on a re-read), else None."""
        namespace, name = step.namespace, self.target.name
        assert step.body is not None
        try:
            if step.action is Action.CREATE:
                await self.api.create_configmap(namespace, step.body)
                result.created.append(namespace)
            else:
                await self.api.replace_configmap(namespace, name, step.body)
                result.updated.append(namespace)
            WRITES.labels(action=step.action.value, result="ok").inc()
            return None
        except kube.Conflict:
            WRITES.labels(action=step.action.value, result="conflict").inc()
        except kube.NotFound as exc:
            WRITES.labels(action=step.action.value, result="not_found").inc()
            if step.action is Action.CREATE:
                log.info("CA bundle: namespace %s is gone: %s", namespace, exc)
                return None
            # Replace: deleted since the list; the re-read tells whether to create it.
        except kube.ApiError as exc:
            transient = isinstance(exc, kube.Unavailable)
            WRITES.labels(
                action=step.action.value, result="unavailable" if transient else "rejected"
            ).inc()
            log.warning("CA bundle: cannot %s %s/%s: %s", step.action, namespace, name, exc)
            result.failed.append(namespace)
            result.retry = result.retry or transient
            return None
        try:
            fresh = await self.api.get_configmap(namespace, name)
        except kube.ApiError as exc:
            log.warning("CA bundle: cannot re-read %s/%s: %s", namespace, name, exc)
            result.failed.append(namespace)
            result.retry = True
            return None
        again = desired(namespace, bundle, fresh, wanted=step.wanted, target=self.target)
        if again.action is Action.NOT_OURS:
            result.not_ours.append(namespace)  # created by someone else meanwhile
            return None
        return again if again.action in (Action.CREATE, Action.UPDATE) else None

    async def _report_not_ours(self, steps: list[Step], result: PassResult) -> None:
        NOT_MANAGED.set(len(steps))
        current = {(s.namespace, s.uid) for s in steps}
        self._reported &= current  # forget those gone or ours now: a new one is reported again
        for step in steps:
            result.not_ours.append(step.namespace)
            if (step.namespace, step.uid) in self._reported:
                continue
            self._reported.add((step.namespace, step.uid))
            message = (
                f"ConfigMap {step.namespace}/{self.target.name} is not labelled "
                f"{MANAGED_BY_LABEL}={MANAGED_BY}: lastguard leaves it alone and does not "
                f"keep its {self.target.key} current. Delete it to have lastguard publish "
                "the CA bundle here, or keep it current yourself."
            )
            log.warning("CA bundle: %s", message)
            record = kube.EventRecord(
                namespace=step.namespace,
                name=self.target.name,
                uid=step.uid,
                type="Warning",
                reason=NOT_MANAGED_REASON,
                message=message,
                time=self._now(),
                instance=self._identity,
                kind="ConfigMap",
                api_version="v1",
            )
            try:
                await self.api.create_event(record)
            except kube.ApiError as exc:
                log.warning("CA bundle: event about %s not posted: %s", step.namespace, exc)
