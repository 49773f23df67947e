"""The controller at its adapter seam: a fake KubeApi, a fake clock, no network.

Each test drives one path step by step (events in, a resync, a status pass)
and checks what the controller did to the (fake) API server and to the index.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lastguard.operator import controller as controller_mod
from lastguard.operator import kube
from lastguard.sidecar import errors, fetch, jwks_cache
from lastguard.sidecar.devissuer import DevIssuer
from tests.support.fake_kube import FakeKubeApi
from tests.support.operator import eventually
from tests.support.policies import BAD_SPEC, policy

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
INLINE = {"issuers": [{"issuer": "https://inline.example", "jwks": json.dumps(DevIssuer().jwks())}]}
REMOTE = {"issuers": [{"issuer": "https://down.example", "jwksUri": "https://down.example/k"}]}


class DownFetcher:
    async def get_json(self, url: str, timeout: float) -> fetch.FetchedDocument:
        raise errors.KeyFetchError(f"{url}: cannot connect (refused)")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, *, leader: bool = True) -> None:
        self.api = FakeKubeApi()
        self.clock = Clock()
        self.leader = leader
        self.notified = 0
        self.registry = jwks_cache.KeyRegistry(DownFetcher(), clock=lambda: 1_700_000_000.0)
        self.ctl = controller_mod.Controller(
            self.api,
            self.registry,
            on_change=self._notify,
            is_leader=lambda: self.leader,
            now=lambda: NOW,
            clock=self.clock,
            write_backoff=(1.0, 2.0),
            status_interval=0.01,
            relist_delay=0.0,
        )

    def _notify(self) -> None:
        self.notified += 1

    def seed(self, *objs: dict[str, Any]) -> list[dict[str, Any]]:
        """Objects on the server, and the controller has seen them (a LISTED event each)."""
        stored = [self.api.add(obj) for obj in objs]
        for obj in stored:
            self.ctl.on_event(kube.WatchEvent("LISTED", obj))
        return stored

    async def reconcile(self) -> int:
        started = self.ctl.reconcile()
        await self.ctl.writes_done()
        return started

    def status(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.api.objects[("shop", name)].get("status") or {}
        return found


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.registry.close()


def ready(status: dict[str, Any]) -> tuple[str, str]:
    c = next(c for c in status["conditions"] if c["type"] == "Ready")
    return c["status"], c["reason"]


# --- index and resyncs --------------------------------------------------------------


async def test_resync_leaves_alone_what_events_changed_during_the_list(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE), policy("b", spec_doc=INLINE))
    gate = asyncio.Event()
    h.api.script("list", gate.wait())
    listing = asyncio.create_task(h.ctl.resync())  # reads the server as it is now: a, b
    await asyncio.sleep(0)
    h.api.add(policy("n", spec_doc=INLINE))
    h.ctl.on_event(kube.WatchEvent("ADDED", policy("n", spec_doc=INLINE)))
    h.ctl.on_event(kube.WatchEvent("DELETED", policy("b", spec_doc=INLINE)))
    del h.api.objects[("shop", "n")]  # the list answers with the state before both events
    gate.set()
    await listing
    assert sorted(h.ctl.index.entries) == [("shop", "a"), ("shop", "n")]
    assert h.ctl.synced.is_set()


async def test_resync_removes_what_the_watch_never_reported(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE), policy("gone", spec_doc=INLINE))
    del h.api.objects[("shop", "gone")]  # deleted during a watch gap: no DELETED event
    await h.ctl.resync()
    assert sorted(h.ctl.index.entries) == [("shop", "a")]


async def test_relists_and_replaced_objects_ask_for_a_resync() -> None:
    h = Harness()
    task = asyncio.create_task(h.ctl.run())
    try:
        await h.ctl.synced.wait()
        lists = h.api.calls["list"]
        obj = h.api.add(policy("a", spec_doc=INLINE))
        h.api.emit("LISTED", obj)  # kopf relisted
        await eventually(lambda: h.api.calls["list"] > lists)

        lists = h.api.calls["list"]
        h.api.emit("DELETED", policy("a", uid="an-older-object"))  # late news of another uid
        assert ("shop", "a") in h.ctl.index.entries
        await eventually(lambda: h.api.calls["list"] > lists)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.registry.close()


async def test_sidecars_hear_only_about_changes_they_could_see(h: Harness) -> None:
    (a,) = h.seed(policy("a", spec_doc=INLINE))
    heard = h.notified
    h.ctl.on_event(kube.WatchEvent("MODIFIED", {**a, "status": {"observedGeneration": 1}}))
    h.ctl.on_event(kube.WatchEvent("ADDED", policy("bad", spec_doc=BAD_SPEC)))
    assert h.notified == heard
    h.ctl.on_event(kube.WatchEvent("MODIFIED", policy("a", generation=2, spec_doc=BAD_SPEC)))
    assert h.notified == heard  # a bad update keeps the good version
    h.ctl.on_event(kube.WatchEvent("DELETED", a))
    assert h.notified == heard + 1


async def test_keys_are_fetched_for_the_enforced_issuers_only(h: Harness) -> None:
    h.seed(policy("a", spec_doc=REMOTE), policy("b", spec_doc=INLINE))
    assert sorted(h.registry.statuses()) == ["https://down.example", "https://inline.example"]
    h.ctl.on_event(kube.WatchEvent("DELETED", policy("a")))
    assert sorted(h.registry.statuses()) == ["https://inline.example"]


# --- status writes ------------------------------------------------------------------


async def test_writes_the_status_once(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE))
    assert await h.reconcile() == 1
    assert ready(h.status("a")) == ("True", "Valid")
    h.ctl.on_event(kube.WatchEvent("MODIFIED", h.api.objects[("shop", "a")]))
    assert await h.reconcile() == 0
    assert len(h.api.patches) == 1
    assert [(e.type, e.reason) for e in h.api.events] == [("Normal", "Ready")]


async def test_followers_write_nothing() -> None:
    h = Harness(leader=False)
    h.seed(policy("a", spec_doc=INLINE))
    assert await h.reconcile() == 0
    assert h.api.patches == [] and h.api.events == []
    h.leader = True
    h.ctl.leadership_changed(True)
    assert await h.reconcile() == 1
    await h.registry.close()


async def test_a_conflict_rereads_and_tries_again(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE))
    # Someone else wrote the object after the controller saw it: a new resourceVersion.
    h.api.objects[("shop", "a")]["metadata"]["labels"] = {"x": "y"}
    h.api.objects[("shop", "a")]["metadata"]["resourceVersion"] = "999"
    await h.reconcile()
    assert len(h.api.patches) == 2 and h.api.calls["get"] == 1
    assert ready(h.status("a")) == ("True", "Valid")


async def test_a_newer_generation_on_the_server_waits_for_the_watch(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE))
    h.api.script("patch", kube.Conflict("stale", 409))
    h.api.objects[("shop", "a")]["metadata"]["generation"] = 2  # the watch has not said so yet
    await h.reconcile()
    assert len(h.api.patches) == 1  # nothing written about generation 1 over generation 2
    h.ctl.on_event(kube.WatchEvent("MODIFIED", h.api.objects[("shop", "a")]))
    await h.reconcile()
    assert h.status("a")["observedGeneration"] == 2


async def test_unavailable_backs_off_per_policy(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE), policy("b", spec_doc=INLINE))
    h.api.script("patch", kube.Unavailable("503", 503))
    await h.reconcile()  # a fails and waits 1 s; b is written
    assert ready(h.status("b")) == ("True", "Valid") and h.status("a") == {}
    assert await h.reconcile() == 0
    h.clock.now += 1.0
    assert await h.reconcile() == 1
    assert ready(h.status("a")) == ("True", "Valid")


async def test_rejected_writes_back_off_too(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE))
    h.api.script("patch", kube.Rejected("422 invalid", 422), kube.Rejected("422 invalid", 422))
    await h.reconcile()
    h.clock.now += 1.0
    await h.reconcile()
    assert await h.reconcile() == 0  # the second failure waits 2 s
    h.clock.now += 2.0
    assert await h.reconcile() == 1


async def test_a_failed_event_does_not_undo_the_write(h: Harness) -> None:
    h.seed(policy("a", spec_doc=REMOTE))
    await eventually(lambda: h.registry.statuses()["https://down.example"].last_error)
    h.api.script("event", kube.Unavailable("500", 500))
    await h.reconcile()
    assert ready(h.status("a")) == ("False", "KeysUnavailable")
    assert h.api.events == []
    assert await h.reconcile() == 0  # converged: the Event is not retried


async def test_a_deleted_policy_is_not_written(h: Harness) -> None:
    h.seed(policy("a", spec_doc=INLINE))
    del h.api.objects[("shop", "a")]
    await h.reconcile()
    assert h.api.events == []
