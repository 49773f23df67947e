"""`ClusterApi`: `kube.KubeApi` over a real API server, the one module that talks to it.

`ClusterApi` watches JWTPolicies with kopf, embedded in the caller's event
loop: standalone (no peering), kopf's own Events off, and a single
event-watching handler, which kopf neither retries nor records in the objects
(no finalizers, no annotations). What kopf does not offer (the reads of a
resync, status patches, Events, Leases, and the namespaces and ConfigMaps of
the CA bundle publisher) goes through the official `kubernetes` client; it is
synchronous, so every call runs in a worker thread.

Invariant: every failed call raises a `kube.ApiError` (`kube.error_for` the
HTTP status; `kube.Unavailable` when there was none) with the client's
exception as the cause. Only this module imports kopf or the kubernetes client;
the rest of the operator sees the seam in `kube`.

What kopf lacks, and what is done about it:
- It does not tell handlers that it relisted. After a watch ends with 410 Gone,
  kopf lists again, but an object deleted in the gap produces no DELETED
  event. Here every object of a (re)list arrives as a "LISTED" event, and the
  controller answers a relist with a full list of its own (`list_policies`).
- It escalates a request that still fails after its backoffs, which ends the
  operator. Here the backoffs never run out: an API server outage only delays
  the watch, and sidecars keep their last snapshot meanwhile.
- When it stops, kopf waits up to 5 s for, then cancels, every task created in
  the loop after it started (it cannot tell its own from others). Stop it last.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf
import kubernetes
import urllib3

from lastguard.operator import kube


class ClusterApi:
    """`KubeApi` over kopf (the watch) and the official client (everything else)."""

    def __init__(self, connection: kube.Connection) -> None:
        self.connection = connection
        self._client = kubernetes.client.ApiClient(_client_configuration(connection))
        self._custom = kubernetes.client.CustomObjectsApi(self._client)
        self._core = kubernetes.client.CoreV1Api(self._client)
        self._leases = kubernetes.client.CoordinationV1Api(self._client)
        #: Set once kopf runs (it has then installed its SIGINT/SIGTERM handlers).
        self.watch_started = asyncio.Event()

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    # --- watch (kopf) ---

    async def watch_policies(self, on_event: kube.EventSink) -> None:
        registry = kopf.OperatorRegistry()
        connection = self.connection

        @kopf.on.login(registry=registry)
        def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            if connection.server is not None:
                return kopf.ConnectionInfo(server=connection.server, insecure=connection.insecure)
            return kopf.login_via_client(**kwargs)

        @kopf.on.event(kube.GROUP, kube.VERSION, kube.PLURAL, registry=registry)
        async def _event(event: Mapping[str, Any], **_: Any) -> None:
            # kopf marks the objects of a (re)list with type None.
            on_event(kube.WatchEvent(type=event.get("type") or "LISTED", object=event["object"]))

        stop = asyncio.Event()
        operator = asyncio.ensure_future(
            kopf.operator(
                registry=registry,
                settings=_kopf_settings(connection),
                standalone=True,
                clusterwide=not connection.namespaces,
                namespaces=list(connection.namespaces),
                stop_flag=stop,
                ready_flag=self.watch_started,
            )
        )
        try:
            await asyncio.shield(operator)
        finally:
            # Cancelled (or kopf failed): stop kopf gracefully; a second cancel cuts it short.
            stop.set()
            try:
                await asyncio.shield(operator)
            except asyncio.CancelledError:
                operator.cancel()
                raise

    # --- reads and writes (official client) ---

    async def list_policies(self) -> list[dict[str, Any]]:
        if not self.connection.namespaces:
            listed = await self._call(
                self._custom.list_cluster_custom_object, kube.GROUP, kube.VERSION, kube.PLURAL
            )
            return list(listed.get("items") or [])
        items: list[dict[str, Any]] = []
        for namespace in self.connection.namespaces:
            listed = await self._call(
                self._custom.list_namespaced_custom_object,
                kube.GROUP,
                kube.VERSION,
                namespace,
                kube.PLURAL,
            )
            items.extend(listed.get("items") or [])
        return items

    async def get_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = await self._call(
                self._custom.get_namespaced_custom_object,
                kube.GROUP,
                kube.VERSION,
                namespace,
                kube.PLURAL,
                name,
            )
        except kube.NotFound:
            return None
        return obj

    async def patch_policy_status(
        self,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"status": dict(patch)}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        obj: dict[str, Any] = await self._call(
            self._custom.patch_namespaced_custom_object_status,
            kube.GROUP,
            kube.VERSION,
            namespace,
            kube.PLURAL,
            name,
            body,
            _content_type="application/merge-patch+json",
        )
        return obj

    async def create_event(self, event: kube.EventRecord) -> None:
        stamp = _rfc3339(event.time)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{event.name}.", "namespace": event.namespace},
            "involvedObject": {
                "apiVersion": event.api_version,
                "kind": event.kind,
                "namespace": event.namespace,
                "name": event.name,
                **({"uid": event.uid} if event.uid else {}),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": event.component},
            "reportingComponent": event.component,
            "reportingInstance": event.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        await self._call(
            self._core.create_namespaced_event, event.namespace, body, _preload_content=False
        )

    async def get_lease(self, namespace: str, name: str) -> kube.Lease | None:
        try:
            raw = await self._call(
                self._leases.read_namespaced_lease, name, namespace, _preload_content=False
            )
        except kube.NotFound:
            return None
        return _lease_from(json.loads(raw.data))

    async def create_lease(self, namespace: str, name: str, lease: kube.Lease) -> kube.Lease:
        raw = await self._call(
            self._leases.create_namespaced_lease,
            namespace,
            _lease_body(namespace, name, lease),
            _preload_content=False,
        )
        return _lease_from(json.loads(raw.data))

    async def replace_lease(self, namespace: str, name: str, lease: kube.Lease) -> kube.Lease:
        raw = await self._call(
            self._leases.replace_namespaced_lease,
            name,
            namespace,
            _lease_body(namespace, name, lease),
            _preload_content=False,
        )
        return _lease_from(json.loads(raw.data))

    # --- namespaces and ConfigMaps (the CA bundle publisher) ---

    async def list_namespaces(self, label_selector: str) -> list[dict[str, Any]]:
        # resourceVersion "0": served from the API server's watch cache, not a read of etcd.
        raw = await self._call(
            self._core.list_namespace,
            label_selector=label_selector,
            resource_version="0",
            _preload_content=False,
        )
        return list(json.loads(raw.data).get("items") or [])

    async def list_configmaps(self, name: str) -> list[dict[str, Any]]:
        # From the watch cache: a field selector cannot spare etcd a read of every ConfigMap.
        raw = await self._call(
            self._core.list_config_map_for_all_namespaces,
            field_selector=f"metadata.name={name}",
            resource_version="0",
            _preload_content=False,
        )
        return list(json.loads(raw.data).get("items") or [])

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            raw = await self._call(
                self._core.read_namespaced_config_map, name, namespace, _preload_content=False
            )
        except kube.NotFound:
            return None
        found: dict[str, Any] = json.loads(raw.data)
        return found

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        raw = await self._call(
            self._core.create_namespaced_config_map, namespace, dict(body), _preload_content=False
        )
        created: dict[str, Any] = json.loads(raw.data)
        return created

    async def replace_configmap(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        raw = await self._call(
            self._core.replace_namespaced_config_map,
            name,
            namespace,
            dict(body),
            _preload_content=False,
        )
        replaced: dict[str, Any] = json.loads(raw.data)
        return replaced

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Runs one client call in a worker thread; failures become ApiErrors."""
        kwargs.setdefault("_request_timeout", self.connection.request_timeout)
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except kubernetes.client.exceptions.ApiException as exc:
            raise kube.error_for(exc.status or 0, f"{_what(fn)}: {_reason(exc)}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise kube.Unavailable(f"{_what(fn)}: {type(exc).__name__}: {exc}") from exc


# --- helpers -----------------------------------------------------------------------------


def _client_configuration(connection: kube.Connection) -> kubernetes.client.Configuration:
    config = kubernetes.client.Configuration()
    if connection.server is not None:
        config.host = connection.server.rstrip("/")
        config.verify_ssl = not connection.insecure
        return config
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)  # type: ignore[no-untyped-call]
    return config


class _Backoffs:
    """kopf's retry delays for failed API requests: 1 s doubling to 30 s, without end."""

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1, 2, 4, 8, 16), itertools.repeat(30.0))


def _kopf_settings(connection: kube.Connection) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False  # lastguard writes its own Events, about states
    settings.scanning.disabled = True  # exact namespaces; no RBAC to watch CRDs or namespaces
    settings.process.ultimate_exiting_timeout = None  # the process is lastguard's, not kopf's
    settings.networking.error_backoffs = _Backoffs()
    settings.networking.request_timeout = connection.request_timeout
    settings.watching.server_timeout = connection.watch_timeout
    settings.watching.client_timeout = connection.watch_timeout + 10
    return settings


def _lease_body(namespace: str, name: str, lease: kube.Lease) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if lease.resource_version is not None:
        meta["resourceVersion"] = lease.resource_version
    spec: dict[str, Any] = {
        "leaseDurationSeconds": lease.duration_seconds,
        "leaseTransitions": lease.transitions,
    }
    if lease.holder is not None:
        spec["holderIdentity"] = lease.holder
    if lease.acquire_time is not None:
        spec["acquireTime"] = _micro_time(lease.acquire_time)
    if lease.renew_time is not None:
        spec["renewTime"] = _micro_time(lease.renew_time)
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}


def _lease_from(raw: Mapping[str, Any]) -> kube.Lease:
    spec = raw.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    return kube.Lease(
        holder=spec.get("holderIdentity") or None,
        duration_seconds=duration if isinstance(duration, int) else 0,
        acquire_time=_parse_time(spec.get("acquireTime")),
        renew_time=_parse_time(spec.get("renewTime")),
        transitions=spec.get("leaseTransitions") or 0,
        resource_version=(raw.get("metadata") or {}).get("resourceVersion"),
    )


def _parse_time(value: object) -> datetime.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _micro_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _rfc3339(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _what(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", "call")


def _reason(exc: kubernetes.client.exceptions.ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"{exc.status} {body['message'][:300]}"
    return f"{exc.status} {exc.reason}"
