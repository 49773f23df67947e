"""The operator's Kubernetes seam: what the rest of the operator knows of the API server.

`KubeApi` is the seam. The controller, the leader elector and the CA bundle
publisher depend on it only, so unit tests hand them a fake
(tests/support/fake_kube.py) and end-to-end tests run the real adapter,
`cluster_api.ClusterApi`, against an HTTP mock of the API server.

This module holds the seam's vocabulary and nothing that does I/O: the
`ApiError` types, the data that crosses the seam (`WatchEvent`, `Lease`,
`EventRecord`, `Connection`) and the `KubeApi` protocol. It imports neither
kopf nor the kubernetes client (tests/unit/test_layout.py pins this), so code
that needs only the seam does not load them.

Errors: a failed call raises one of this module's `ApiError` types, with the
client's exception as the cause: `Conflict` (409: re-read, then retry),
`NotFound` (404), `Unavailable` (5xx, 429, timeouts, refused connections: back
off and retry) or `Rejected` (any other 4xx: the same request will fail again).
`error_for` maps an HTTP status to its type.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

GROUP = "lastguard.dev"
VERSION = "v1alpha1"
PLURAL = "jwtpolicies"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "JWTPolicy"

# --- errors ----------------------------------------------------------------------------


class ApiError(Exception):
    """A Kubernetes API call failed. `status` is the HTTP status, 0 when there was none."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Conflict(ApiError):
    """409: the object changed since it was read (or already exists)."""


class NotFound(ApiError):
    """404: the object (or the resource type) does not exist."""


class Unavailable(ApiError):
    """The API server could not answer now (5xx, 429, timeout, connection): retry later."""


class Rejected(ApiError):
    """Any other 4xx (bad request, forbidden, invalid): retrying the same call will not help."""


def error_for(status: int, message: str) -> ApiError:
    """The ApiError type for an HTTP status."""
    if status == 409:
        return Conflict(message, status)
    if status == 404:
        return NotFound(message, status)
    if status == 0 or status == 429 or status >= 500:
        return Unavailable(message, status)
    return Rejected(message, status)


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A JWTPolicy event: type is LISTED (seen by a (re)list), ADDED, MODIFIED or DELETED."""

    type: str
    object: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Lease:
    """A coordination.k8s.io/v1 Lease, as leader election reads and writes it."""

    holder: str | None
    duration_seconds: int
    acquire_time: datetime.datetime | None = None
    renew_time: datetime.datetime | None = None
    transitions: int = 0
    resource_version: str | None = None

    def with_changes(self, **changes: Any) -> Lease:
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A core/v1 Event about one namespaced object: a JWTPolicy unless `kind` says otherwise."""

    namespace: str
    name: str
    uid: str | None
    type: str  # Normal or Warning
    reason: str
    message: str
    time: datetime.datetime
    component: str = "lastguard-operator"
    instance: str = ""
    kind: str = KIND
    api_version: str = API_VERSION


@dataclass(frozen=True, slots=True)
class Connection:
    """How to reach the API server, and which namespaces to watch."""

    #: None: the pod's service account in a cluster, else the kubeconfig (as kubectl does).
    server: str | None = None
    #: Skip TLS verification; only with an explicit `server` (tests, local development).
    insecure: bool = False
    #: Empty: every namespace.
    namespaces: tuple[str, ...] = ()
    request_timeout: float = 10.0
    #: Watch requests ask the server to end them after this long (they are then resumed).
    watch_timeout: int = 300


# --- the seam --------------------------------------------------------------------------

EventSink = Callable[[WatchEvent], None]


class KubeApi(Protocol):
    async def watch_policies(self, on_event: EventSink) -> None:
        """Lists, then watches JWTPolicies until cancelled, calling `on_event` in the loop.

        Events of one object arrive in order; every object of a (re)list arrives
        as LISTED. Never returns normally; API outages are retried inside.
        """
        ...

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every JWTPolicy in the watched namespaces, now."""
        ...

    async def get_policy(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_policy_status(
        self,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        *,
        resource_version: str | None,
    ) -> dict[str, Any]:
        """Merge-patches the status subresource; 409 if `resource_version` is stale."""
        ...

    async def create_event(self, event: EventRecord) -> None: ...

    async def get_lease(self, namespace: str, name: str) -> Lease | None: ...

    async def create_lease(self, namespace: str, name: str, lease: Lease) -> Lease:
        """Creates the Lease; `Conflict` if it exists."""
        ...

    async def replace_lease(self, namespace: str, name: str, lease: Lease) -> Lease:
        """Replaces the Lease; `Conflict` unless `lease.resource_version` is current."""
        ...

    async def list_namespaces(self, label_selector: str) -> list[dict[str, Any]]:
        """The namespaces the selector matches, as the API server's cache has them.

        The cache may lag a little behind the latest write; callers filter by label too.
        """
        ...

    async def list_configmaps(self, name: str) -> list[dict[str, Any]]:
        """The ConfigMaps called `name` in every namespace, as the API server's cache has them."""
        ...

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ConfigMap as it is now (not from the cache)."""
        ...

    async def create_configmap(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Creates the ConfigMap; `Conflict` if it exists, `NotFound` if the namespace does not."""
        ...

    async def replace_configmap(
        self, namespace: str, name: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Replaces the ConfigMap; `Conflict` unless the body's resourceVersion is current."""
        ...
