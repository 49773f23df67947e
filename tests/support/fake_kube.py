"""An in-memory `lastguard.operator.kube.KubeApi`, for testing the controller at its seam.

Objects live in a dict; `emit` delivers a watch event to the controller the way
the adapter would; `script` queues errors (or awaitables) for the next calls of
one method, so each retry path can be driven step by step without a clock.
Namespaces and ConfigMaps (for the CA bundle publisher) live in their own
dicts; like tests/support/kube.py, the lists ignore selectors.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import defaultdict
from collections.abc import Awaitable, Mapping
from typing import Any

from lastguard.operator import kube
from tests.support.kube import merge_patch


class FakeKubeApi:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[kube.EventRecord] = []
        self.calls: dict[str, int] = defaultdict(int)
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self._script: dict[str, list[BaseException | Awaitable[None]]] = defaultdict(list)
        self._sink: kube.EventSink | None = None
        self._rv = itertools.count(100)
        self.leases: dict[tuple[str, str], kube.Lease] = {}
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.configmaps: dict[tuple[str, str], dict[str, Any]] = {}
        #: (verb, namespace, body) of every ConfigMap create and replace, in order.
        self.configmap_writes: list[tuple[str, str, dict[str, Any]]] = []

    # --- test controls ---

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Stores an object (as the API server would) without telling the watch."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[(meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    def add_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        self.namespaces[name] = {"metadata": {"name": name, "labels": dict(labels or {})}}

    def add_configmap(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Stores a ConfigMap (as another client would), with a uid and a resourceVersion."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["resourceVersion"] = str(next(self._rv))
        meta.setdefault("uid", f"uid-{meta['resourceVersion']}")
        self.configmaps[(meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    def emit(self, kind: str, obj: Mapping[str, Any]) -> None:
        assert self._sink is not None, "the controller is not watching"
        self._sink(kube.WatchEvent(kind, copy.deepcopy(dict(obj))))

    def script(self, method: str, *steps: BaseException | Awaitable[None]) -> None:
        """The next calls of `method` raise these errors (or first await these) in order."""
        self._script[method].extend(steps)

    async def _step(self, method: str) -> None:
        self.calls[method] += 1
        if self._script[method]:
            step = self._script[method].pop(0)
            if isinstance(step, BaseException):
                raise step
            await step

    # --- KubeApi ---

    async def watch_policies(self, on_event: kube.EventSink) -> None:
        self._sink = on_event
        await asyncio.Event().wait()

    async def list_policies(self) -> list[dict[str, Any]]:
        await self._step("list")
        return [copy.deepcopy(o) for o in self.objects.values()]

    async def get_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self._step("get")
        found = self.objects.get((namespace, name))
        return copy.deepcopy(found) if found else None

    async def patch_policy_status(
        self,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None,
    ) -> dict[str, Any]:
        self.patches.append((namespace, name, dict(patch)))
        await self._step("patch")
        obj = self.objects.get((namespace, name))
        if obj is None:
            raise kube.NotFound("not found", 404)
        if resource_version is not None and resource_version != obj["metadata"]["resourceVersion"]:
            raise kube.Conflict("stale resourceVersion", 409)
        new_status = merge_patch(obj.get("status"), dict(patch))
        obj["status"] = new_status
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return copy.deepcopy(obj)

    async def create_event(self, event: kube.EventRecord) -> None:
        await self._step("event")
        self.events.append(event)

    async def get_lease(self, namespace: str, name: str) -> kube.Lease | None:
        await self._step("get_lease")
        return self.leases.get((namespace, name))

    async def create_lease(self, namespace: str, name: str, lease: kube.Lease) -> kube.Lease:
        await self._step("create_lease")
        if (namespace, name) in self.leases:
            raise kube.Conflict("exists", 409)
        stored = lease.with_changes(resource_version=str(next(self._rv)))
        self.leases[(namespace, name)] = stored
        return stored

    async def replace_lease(self, namespace: str, name: str, lease: kube.Lease) -> kube.Lease:
        await self._step("replace_lease")
        current = self.leases.get((namespace, name))
        if current is None:
            raise kube.NotFound("not found", 404)
        if lease.resource_version != current.resource_version:
            raise kube.Conflict("stale resourceVersion", 409)
        stored = lease.with_changes(resource_version=str(next(self._rv)))
        self.leases[(namespace, name)] = stored
        return stored

    async def list_namespaces(self, label_selector: str) -> list[dict[str, Any]]:
        await self._step("list_namespaces")
        return [copy.deepcopy(ns) for ns in self.namespaces.values()]

    async def list_configmaps(self, name: str) -> list[dict[str, Any]]:
        await self._step("list_configmaps")
        return [copy.deepcopy(cm) for cm in self.configmaps.values()]

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        await self._step("get_configmap")
        found = self.configmaps.get((namespace, name))
        return copy.deepcopy(found) if found else None

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        self.configmap_writes.append(("create", namespace, copy.deepcopy(dict(body))))
        await self._step("create_configmap")
        if namespace not in self.namespaces:
            raise kube.NotFound(f"namespace {namespace} not found", 404)
        if (namespace, body["metadata"]["name"]) in self.configmaps:
            raise kube.Conflict("already exists", 409)
        created = copy.deepcopy(dict(body))
        created["metadata"].pop("uid", None)  # the server sets it
        return self.add_configmap(created)

    async def replace_configmap(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.configmap_writes.append(("replace", namespace, copy.deepcopy(dict(body))))
        await self._step("replace_configmap")
        current = self.configmaps.get((namespace, name))
        if current is None:
            raise kube.NotFound("not found", 404)
        wanted = body["metadata"].get("resourceVersion")
        if wanted != current["metadata"]["resourceVersion"]:
            raise kube.Conflict("stale resourceVersion", 409)
        replaced = copy.deepcopy(dict(body))
        replaced["metadata"]["uid"] = current["metadata"]["uid"]
        return self.add_configmap(replaced)
