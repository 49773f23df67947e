"""A Kubernetes API server for operator tests: kmock's emulator, made strict where it matters.

kmock's `KubernetesEmulator` serves an in-memory API over real HTTP on
127.0.0.1 (discovery, list, watch, get, create, patch, delete) and records
every request for assertions (`len(api["patch", ...])`, `api.objects[...]`).
It does not enforce resourceVersions, the status subresource, PUT or watch
resumption. `ApiServer` adds what the operator relies on:

- metadata the API server sets: uid, creationTimestamp, generation (bumped when
  the spec changes) and resourceVersion (one counter, new on every write);
- optimistic concurrency: a PATCH or PUT carrying a stale
  metadata.resourceVersion gets 409 Conflict and changes nothing, and so does
  a POST of an existing name;
- the status subresource of custom resources: PATCH/PUT of `.../status` change
  only `.status`, and writes to the object itself leave `.status` alone;
- JSON merge patches (RFC 7396: null removes a member, lists are replaced);
- PUT (replace) of a named object;
- watches from a resourceVersion, replayed from a history; `expire_history()`
  ends every open watch with an ERROR 410 Gone event and makes watches from
  older versions fail the same way, as after etcd compaction;
- faults: `fail(...)` answers the next matching requests with an error status
  before anything changes; `set_down(True)` answers every API request with
  500 and ends the open watches, until `set_down(False)`;
- the namespaces collection (`GET /api/v1/namespaces`, `/api/v1/namespaces/NAME`),
  whose paths kmock 0.8 cannot parse (it reads "namespaces" as a namespace prefix).

Not emulated: label and field selectors, schema validation (tests check the
status against the CRD with tests/support/crd.py), admission, server-side
apply, bookmarks, watch timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import parsing as kmock_parsing

JWTPOLICIES = kmock.resource("lastguard.dev", "v1alpha1", "jwtpolicies")
LEASES = kmock.resource("coordination.k8s.io", "v1", "leases")
EVENTS = kmock.resource("", "v1", "events")
NAMESPACES = kmock.resource("", "v1", "namespaces")
CONFIGMAPS = kmock.resource("", "v1", "configmaps")
#: Resources with a status subresource (writes to the object leave .status alone).
WITH_STATUS = {JWTPOLICIES}


@dataclass
class Fault:
    verb: str | None  # an HTTP method (PATCH) or a Kubernetes action (list, watch)
    resource: kmock.resource | None
    name: str | None
    subresource: str | None
    status: int
    times: int

    def matches(self, request: kmock.Request) -> bool:
        verbs = {str(request.method.value).upper()}
        if request.action is not None:
            verbs.add(str(request.action.value).upper())
        return (
            (self.verb is None or self.verb in verbs)
            and (self.resource is None or request.resource == self.resource)
            and (self.name is None or request.name == self.name)
            and (self.subresource is None or request.subresource == self.subresource)
        )


_kmock_parse_path = kmock_parsing.parse_path


def _parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock's path parser, plus the namespaces collection and its objects (see above)."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        name = parts[3] if len(parts) > 3 else None
        subresource = parts[4] if len(parts) > 4 else None
        return kmock_parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
    return _kmock_parse_path(path)


kmock_parsing.parse_path = _parse_path


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, message: str) -> kmock.KubernetesError:
    reasons = {404: "NotFound", 409: "Conflict", 410: "Expired", 500: "InternalError"}
    return kmock.KubernetesError(
        status=status, reason=reasons.get(status, "Error"), message=message, details={}
    )


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """See the module docstring. Use as `async with ApiServer() as api, kmock.Server(api):`."""

    _rv: int = attrs.field(default=0, init=False)
    _compacted: int = attrs.field(default=0, init=False)
    _history: list[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(
        factory=list, init=False
    )
    _changed: asyncio.Condition = attrs.field(factory=asyncio.Condition, init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)
    _down: bool = attrs.field(default=False, init=False)
    _epoch: int = attrs.field(default=0, init=False)
    _names: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        info = kmock.ResourceInfo
        self.resources[JWTPOLICIES] = info(
            kind="JWTPolicy", namespaced=True, subresources={"status"}, verbs={"list", "watch"}
        )
        self.resources[LEASES] = info(kind="Lease", namespaced=True)
        self.resources[EVENTS] = info(kind="Event", namespaced=True)
        self.resources[CONFIGMAPS] = info(kind="ConfigMap", namespaced=True)
        # kopf finds its core resources by discovery before it watches anything.
        self.resources[NAMESPACES] = info(kind="Namespace", namespaced=False)
        self.resources[
            kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        ] = info(kind="CustomResourceDefinition", namespaced=False)

    # --- fault controls ---

    def fail(
        self,
        verb: str | None = None,
        *,
        resource: kmock.resource | None = None,
        name: str | None = None,
        subresource: str | None = None,
        status: int = 500,
        times: int = 1,
    ) -> None:
        """Answers the next `times` matching requests with `status`, changing nothing.

        `verb` is an HTTP method ("PATCH") or a Kubernetes action ("list", "watch").
        """
        self._faults.append(
            Fault(verb and verb.upper(), resource, name, subresource, status, times)
        )

    async def set_down(self, down: bool) -> None:
        """While down, every API request gets 500; going down ends every open watch."""
        self._down = down
        await self._bump_epoch()

    async def expire_history(self) -> None:
        """Compaction: open watches end with 410 Gone; so do watches from older versions."""
        self._rv += 1
        self._compacted = self._rv
        await self._bump_epoch()

    # --- writes for tests: the same rules, but no faults and no outage (another client) ---

    async def create(self, resource: kmock.resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Creates an object, keeping a given uid or creationTimestamp (for ordering tests)."""
        async with self._lock:
            return await self._create(resource, obj["metadata"].get("namespace"), obj)

    async def patch(
        self, resource: kmock.resource, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """A merge patch; `namespace` None for a cluster-scoped object (a Namespace)."""
        return await self._direct("PATCH", resource, namespace, name, patch)

    async def delete(self, resource: kmock.resource, namespace: str | None, name: str) -> None:
        await self._direct("DELETE", resource, namespace, name, None)

    async def _direct(
        self,
        method: str,
        resource: kmock.resource,
        namespace: str | None,
        name: str,
        body: dict[str, Any] | None,
    ) -> dict[str, Any]:
        request = kmock.Request(
            method=method, resource=resource, namespace=namespace, name=name, data=body
        )
        async with self._lock:
            obj, _ = await self._write(method, request)
        return obj

    def object(self, resource: kmock.resource, namespace: str | None, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects[resource, namespace, name].raw)

    def exists(self, resource: kmock.resource, namespace: str | None, name: str) -> bool:
        key = (resource, namespace, name)
        return key in self.objects and not self.objects[key].deleted

    # --- request handling ---

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        response = await super().__call__(raw_request)
        # No keep-alive: a connection's server task ends with its response, so that
        # nothing of ours lingers when kopf stops (it waits for, then cancels, such tasks).
        response.force_close()
        return response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        is_api = request.url.path.startswith(("/api", "/apis"))
        if self._down and is_api:
            return await self._render_error(_error(500, "the API server is down (test)"))
        for fault in self._faults:
            if fault.times > 0 and fault.matches(request):
                fault.times -= 1
                return await self._render_error(_error(fault.status, "injected fault (test)"))
        method = str(request.method.value).upper()
        if request.resource is not None and method in ("POST", "PATCH", "PUT", "DELETE"):
            try:
                async with self._lock:
                    obj, status = await self._write(method, request)
            except kmock.KubernetesError as exc:
                return await self._render_error(exc)
            return aiohttp.web.json_response(obj, status=status)
        # Reads: kmock's dispatch (user reactions first, then the fallbacks below), minus
        # the emulator's own interception of writes, which the code above replaces.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _write(self, method: str, request: kmock.Request) -> tuple[dict[str, Any], int]:
        resource = request.resource
        assert resource is not None
        if method == "POST" and request.name is None:
            body = request.data if isinstance(request.data, dict) else {}
            return await self._create(resource, request.namespace, body), 201
        key = (resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise _error(404, f"{request.name} not found")
        current = self.object(*key)
        if method == "DELETE":
            self._rv += 1
            current["metadata"]["resourceVersion"] = str(self._rv)
            self.objects[key].delete()
            await self._record(resource, "DELETED", current)
            return current, 200
        body = request.data if isinstance(request.data, dict) else {}
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
            raise _error(409, "the object has been modified; apply your changes to the latest")
        new = merge_patch(current, body) if method == "PATCH" else copy.deepcopy(body)
        if resource in WITH_STATUS:
            if request.subresource == "status":
                new = {**current, "status": new.get("status")}
                if new["status"] is None:
                    del new["status"]
            else:
                new = {k: v for k, v in new.items() if k != "status"}
                if "status" in current:
                    new["status"] = current["status"]
        meta = new.setdefault("metadata", {})
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if fixed in current["metadata"]:
                meta[fixed] = current["metadata"][fixed]
        if new.get("spec") != current.get("spec") and "generation" in meta:
            meta["generation"] += 1
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self.objects[key].history.append(new)
        await self._record(resource, "MODIFIED", new)
        return copy.deepcopy(new), 200

    async def _create(
        self, resource: kmock.resource, namespace: str | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if namespace is not None:
            meta["namespace"] = namespace
        if not meta.get("name"):
            meta["name"] = f"{meta.get('generateName', 'obj-')}{next(self._names):05d}"
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise _error(409, f"{meta['name']} already exists")
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        if resource in WITH_STATUS:
            meta["generation"] = 1
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        await self._record(resource, "ADDED", obj)
        return copy.deepcopy(obj)

    async def _record(self, resource: kmock.resource, kind: str, obj: dict[str, Any]) -> None:
        self._history.append((self._rv, resource, {"type": kind, "object": copy.deepcopy(obj)}))
        async with self._changed:
            self._changed.notify_all()

    async def _bump_epoch(self) -> None:
        self._epoch += 1
        async with self._changed:
            self._changed.notify_all()

    # --- reads (kmock's fallbacks call these) ---

    def _matching(self, request: kmock.Request) -> list[dict[str, Any]]:
        return [
            copy.deepcopy(obj.raw)
            for (resource, namespace, _), obj in self.objects.items()
            if resource == request.resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
        ]

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        if request.resource not in list(self.resources):
            raise _error(404, "no such resource")
        async with self._lock:
            items = self._matching(request)
        return {"metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            raise _error(404, f"{request.name} not found")
        return self.object(*key)  # type: ignore[arg-type]

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now: a watch may stay silent for long
        since = request.params.get("resourceVersion")
        if since in (None, "", "0"):
            cursor = self._rv
            for obj in self._matching(request):
                yield {"type": "ADDED", "object": obj}
        else:
            cursor = int(since)
        while True:
            if cursor < self._compacted:
                yield {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": "Expired",
                        "message": f"too old resource version: {cursor} ({self._compacted})",
                        "code": 410,
                    },
                }
                return
            if self._down:
                return  # an API server going down closes every watch
            for rv, resource, event in list(self._history):
                if rv <= cursor:
                    continue
                cursor = rv
                namespace = event["object"].get("metadata", {}).get("namespace")
                if resource == request.resource and request.namespace in (None, namespace):
                    yield event
            raw = request._raw_request
            if raw is None or raw.transport is None or raw.transport.is_closing():
                return  # the client went away
            async with self._changed:
                # Not wait_for: on 3.11 it can swallow the cancellation of this stream.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await self._changed.wait()
