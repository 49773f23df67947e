"""The CA bundle publisher against an HTTP Kubernetes API (kmock, tests/support/kube.py).

`ClusterApi` lists namespaces and ConfigMaps and writes ConfigMaps over real
HTTP on 127.0.0.1; the CA file is a real file that tests rewrite the way the
kubelet does (a new file moved into place). Passes run every 50 ms; every wait
is bounded (`eventually`). The last test runs the operator process with
`--publish-ca-bundle`, wired as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kmock
import pytest

from lastguard.operator import ca_publisher, cluster_api, kube
from tests.support.certs import CertificateAuthority
from tests.support.kube import CONFIGMAPS, EVENTS, LEASES, NAMESPACES, ApiServer
from tests.support.operator import OperatorProcess, eventually

pytestmark = pytest.mark.e2e

ENABLED = {ca_publisher.INJECTION_LABEL: ca_publisher.INJECTION_ENABLED}
OURS = {ca_publisher.MANAGED_BY_LABEL: ca_publisher.MANAGED_BY}
NAME = "lastguard-ca"


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        yield server


def write_atomically(path: Path, data: bytes) -> None:
    """As the kubelet updates a Secret volume: readers see the old file or the new one."""
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


def ca_pem(name: str) -> bytes:
    return CertificateAuthority.create(name).cert_pem


@dataclass
class Running:
    publisher: ca_publisher.CaPublisher
    file: Path
    leader: list[bool]

    @property
    def bundle(self) -> str:
        return self.file.read_text()


@contextlib.asynccontextmanager
async def publishing(
    api: ApiServer, tmp_path: Path, *, leader: bool = True
) -> AsyncIterator[Running]:
    file = tmp_path / "ca.crt"
    if not file.exists():
        write_atomically(file, ca_pem("first"))
    client = cluster_api.ClusterApi(kube.Connection(server=str(api.url).rstrip("/"), insecure=True))
    leading = [leader]
    publisher = ca_publisher.CaPublisher(
        client,
        file,
        is_leader=lambda: leading[0],
        identity="replica-1",
        interval=0.05,
        retry_backoff=(0.05,),
    )
    task = asyncio.create_task(publisher.run(), name="test ca publisher")
    try:
        yield Running(publisher, file, leading)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client.close()


async def add_namespace(api: ApiServer, name: str, labels: dict[str, str] | None = None) -> None:
    await api.create(NAMESPACES, {"metadata": {"name": name, "labels": labels or {}}})


def configmap(api: ApiServer, namespace: str) -> dict[str, Any] | None:
    if not api.exists(CONFIGMAPS, namespace, NAME):
        return None
    return api.object(CONFIGMAPS, namespace, NAME)


def stored(api: ApiServer, namespace: str) -> dict[str, Any]:
    found = configmap(api, namespace)
    assert found is not None, f"no ConfigMap in {namespace}"
    return found


def has_bundle(api: ApiServer, namespace: str, bundle: str) -> bool:
    found = configmap(api, namespace)
    return found is not None and found.get("data") == {"ca.crt": bundle}


def writes(api: ApiServer, method: str, namespace: str) -> list[kmock.Request]:
    """ConfigMap writes (POST creates, PUT replaces) into one namespace, from kmock's log."""
    return [
        q
        for q in api
        if q.resource == CONFIGMAPS
        and str(q.method.value).upper() == method
        and q.namespace == namespace
    ]


async def passes(api: ApiServer, count: int = 3) -> None:
    """Waits until `count` more passes have listed ConfigMaps."""
    listed = len(api["list", CONFIGMAPS])
    await eventually(lambda: len(api["list", CONFIGMAPS]) >= listed + count)


# --- publishing ------------------------------------------------------------------------


async def test_labelled_namespaces_get_it_and_others_do_not(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    await add_namespace(api, "plain")
    await add_namespace(api, "off", {ca_publisher.INJECTION_LABEL: "disabled"})
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: has_bundle(api, "shop", p.bundle))
        found = configmap(api, "shop")
        assert found is not None and found["metadata"]["labels"] == OURS
        await passes(api)
        assert configmap(api, "plain") is None and configmap(api, "off") is None
        assert writes(api, "POST", "shop") and len(writes(api, "POST", "shop")) == 1
        assert not writes(api, "PUT", "shop")  # up to date: nothing more is written

        # Selected on the server (kmock ignores selectors; the publisher filters as well),
        # both lists from the API server's cache.
        listed = api["list", NAMESPACES][0].params
        assert listed == {
            "labelSelector": "lastguard.dev/injection=enabled",
            "resourceVersion": "0",
        }
        listed = api["list", CONFIGMAPS][0].params
        assert listed == {"fieldSelector": f"metadata.name={NAME}", "resourceVersion": "0"}

        # Labelled later: it gets one at the next pass.
        await api.patch(NAMESPACES, None, "plain", {"metadata": {"labels": ENABLED}})
        await eventually(lambda: has_bundle(api, "plain", p.bundle))


async def test_a_changed_ca_file_updates_every_configmap(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    await add_namespace(api, "bank", ENABLED)
    async with publishing(api, tmp_path) as p:
        first = p.bundle
        await eventually(lambda: has_bundle(api, "shop", first) and has_bundle(api, "bank", first))
        uid = stored(api, "shop")["metadata"]["uid"]

        # Rotation: the new CA joins the old one, then the old one goes.
        write_atomically(p.file, first.encode() + ca_pem("second"))
        both = p.bundle
        await eventually(lambda: has_bundle(api, "shop", both) and has_bundle(api, "bank", both))
        write_atomically(p.file, ca_pem("third"))
        third = p.bundle
        await eventually(lambda: has_bundle(api, "shop", third) and has_bundle(api, "bank", third))

        assert stored(api, "shop")["metadata"]["uid"] == uid
        assert len(writes(api, "PUT", "shop")) == 2

        # A broken file later: the last good bundle stays published.
        write_atomically(p.file, b"-----BEGIN CERTIFICATE-----\ntruncated")
        await passes(api)
        assert has_bundle(api, "shop", third) and len(writes(api, "PUT", "shop")) == 2


async def test_a_deleted_configmap_is_recreated(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: has_bundle(api, "shop", p.bundle))
        uid = stored(api, "shop")["metadata"]["uid"]
        await api.delete(CONFIGMAPS, "shop", NAME)
        await eventually(lambda: has_bundle(api, "shop", p.bundle))
        assert stored(api, "shop")["metadata"]["uid"] != uid

        # Edited by hand: put back.
        await api.patch(CONFIGMAPS, "shop", NAME, {"data": {"ca.crt": "edited"}})
        await eventually(lambda: has_bundle(api, "shop", p.bundle))


async def test_a_namespace_that_loses_the_label_keeps_a_current_configmap(
    api: ApiServer, tmp_path: Path
) -> None:
    await add_namespace(api, "shop", ENABLED)
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: has_bundle(api, "shop", p.bundle))
        await api.patch(NAMESPACES, None, "shop", {"metadata": {"labels": None}})
        await passes(api)
        assert has_bundle(api, "shop", p.bundle)  # not deleted: injected pods mount it

        write_atomically(p.file, ca_pem("rotated"))
        rotated = p.bundle
        await eventually(lambda: has_bundle(api, "shop", rotated))  # still kept current

        await api.delete(CONFIGMAPS, "shop", NAME)
        await passes(api)
        assert configmap(api, "shop") is None  # but not recreated


async def test_someone_elses_configmap_is_not_overwritten(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    await add_namespace(api, "bank", ENABLED)
    theirs = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": NAME, "namespace": "shop", "labels": {"app": "theirs"}},
        "data": {"ca.crt": "their CA"},
    }
    await api.create(CONFIGMAPS, theirs)
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: has_bundle(api, "bank", p.bundle))
        await passes(api)
        assert stored(api, "shop")["data"] == {"ca.crt": "their CA"}
        assert not writes(api, "PUT", "shop") and not writes(api, "POST", "shop")

        events = [
            obj
            for (resource, _, _), obj in api.objects.items()
            if resource == EVENTS and not obj.deleted
        ]
        (event,) = events  # once, not once per pass
        assert event["type"] == "Warning" and event["reason"] == "CaBundleNotManaged"
        assert event["metadata"]["namespace"] == "shop"
        involved = event["involvedObject"]
        assert (involved["kind"], involved["apiVersion"], involved["name"]) == (
            "ConfigMap",
            "v1",
            NAME,
        )
        assert involved["uid"] == stored(api, "shop")["metadata"]["uid"]

        # Deleted by its owner: lastguard takes over the name.
        await api.delete(CONFIGMAPS, "shop", NAME)
        await eventually(lambda: has_bundle(api, "shop", p.bundle))


# --- faults ----------------------------------------------------------------------------


async def test_409_and_5xx_on_writes_are_retried(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    api.fail("POST", resource=CONFIGMAPS, status=503, times=2)
    api.fail("POST", resource=CONFIGMAPS, status=409, times=1)  # e.g. a stale cached list
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: has_bundle(api, "shop", p.bundle))
        assert len(writes(api, "POST", "shop")) == 4
        assert api["fetch", CONFIGMAPS]  # the 409 made it re-read

        api.fail("PUT", resource=CONFIGMAPS, status=409, times=2)
        api.fail("PUT", resource=CONFIGMAPS, status=500, times=2)
        write_atomically(p.file, ca_pem("rotated"))
        rotated = p.bundle
        await eventually(lambda: has_bundle(api, "shop", rotated))
        assert len(writes(api, "PUT", "shop")) == 5


async def test_api_server_down_then_back(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    await api.set_down(True)
    async with publishing(api, tmp_path) as p:
        await eventually(lambda: len(api["list", NAMESPACES]) >= 2)
        await api.set_down(False)
        await eventually(lambda: has_bundle(api, "shop", p.bundle))


async def test_only_the_leader_writes(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    async with publishing(api, tmp_path, leader=False) as p:
        await asyncio.sleep(0.3)  # six intervals: a follower does not even list
        assert not api["list", NAMESPACES] and configmap(api, "shop") is None
        p.leader[0] = True
        p.publisher.leadership_changed(True)
        await eventually(lambda: has_bundle(api, "shop", p.bundle))


# --- the process -----------------------------------------------------------------------


async def test_operator_process_publishes_as_leader(api: ApiServer, tmp_path: Path) -> None:
    await add_namespace(api, "shop", ENABLED)
    bundle = tmp_path / "ca.crt"
    write_atomically(bundle, ca_pem("process"))
    operator = await OperatorProcess.start(
        str(api.url),
        "--publish-ca-bundle", str(bundle),
        "--ca-configmap-name", "mesh-ca",
        "--ca-publish-interval", "0.1",
    )  # fmt: skip
    try:

        def published() -> bool:
            if not api.exists(CONFIGMAPS, "shop", "mesh-ca"):
                return False
            return bool(
                api.object(CONFIGMAPS, "shop", "mesh-ca")["data"] == {"ca.crt": bundle.read_text()}
            )

        await eventually(published, timeout=20)
        lease = api.object(LEASES, "ops", "lastguard-operator")
        assert lease["spec"]["holderIdentity"] == "operator-0"
        code, output = await operator.stop()
    finally:
        await operator.kill()
    assert code == 0, output
    assert not api.exists(CONFIGMAPS, "shop", NAME)  # only the name it was given
