"""The operator against an HTTP Kubernetes API (kmock, made strict in tests/support/kube.py).

Everything crosses real HTTP on 127.0.0.1: kopf lists and watches, the official
client patches status, posts Events and takes Leases, and JWKS come from a real
issuer. What kmock does not do by itself (resourceVersions, 409 Conflict, 410
Gone, the status subresource, outages) the ApiServer subclass adds; faults are
injected there before anything changes. Every wait is bounded (`eventually`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kmock
import pytest

from lastguard.operator import cluster_api, kube, leader
from tests.support.crd import status_problems
from tests.support.issuer import TestIssuer
from tests.support.kube import EVENTS, JWTPOLICIES, LEASES, ApiServer
from tests.support.operator import FAST, OperatorProcess, eventually, replica
from tests.support.policies import BAD_SPEC, BAD_SPEC_PROBLEM, policy

pytestmark = pytest.mark.e2e

T1, T2, T3 = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer() as server, kmock.Server(server):
        yield server


@pytest.fixture
async def issuer() -> AsyncIterator[TestIssuer]:
    async with TestIssuer() as iss:
        yield iss


def good(iss: TestIssuer, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"issuers": [{"issuer": iss.issuer, "jwksUri": iss.jwks_uri, **extra}]}
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    return spec


def status(api: ApiServer, name: str, namespace: str = "shop") -> dict[str, Any]:
    found: dict[str, Any] = api.object(JWTPOLICIES, namespace, name).get("status") or {}
    return found


def condition(api: ApiServer, name: str, kind: str = "Ready") -> tuple[str, str] | None:
    for c in status(api, name).get("conditions", []):
        if c["type"] == kind:
            return c["status"], c["reason"]
    return None


def events_for(api: ApiServer, name: str) -> list[tuple[str, str]]:
    return [
        (obj["type"], obj["reason"])
        for (resource, _, _), obj in api.objects.items()
        if resource == EVENTS and not obj.deleted and obj["involvedObject"]["name"] == name
    ]


def requests(api: ApiServer, action: kmock.action) -> list[kmock.Request]:
    """JWTPolicy requests of one kind, from kmock's request log."""
    return [q for q in api if q.action == action and q.resource == JWTPOLICIES]


def is_ready(api: ApiServer, name: str, expected: tuple[str, str] = ("True", "Valid")) -> bool:
    return condition(api, name) == expected


# --- list, watch, update, delete ----------------------------------------------------


async def test_lists_then_follows_updates_and_deletes(api: ApiServer, issuer: TestIssuer) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    await api.create(JWTPOLICIES, policy("b", spec_doc=BAD_SPEC))
    async with replica(api) as r:
        await eventually(lambda: r.entry_names() == ["a", "b"])
        await eventually(lambda: r.api.event_types("a")[:1] == ["LISTED"])  # kopf's list

        await api.create(JWTPOLICIES, policy("c", spec_doc=good(issuer, {"app": "web"})))
        await eventually(lambda: r.entry_names() == ["a", "b", "c"])

        await api.patch(JWTPOLICIES, "shop", "a", {"spec": BAD_SPEC})
        await eventually(lambda: r.controller.index.entries[("shop", "a")].generation == 2)
        a = r.controller.index.entries[("shop", "a")]
        assert (a.valid, a.good_generation) == (False, 1)  # the bad update keeps generation 1

        await api.delete(JWTPOLICIES, "shop", "c")
        await eventually(lambda: r.entry_names() == ["a", "b"])
        assert r.api.event_types("c")[-1] == "DELETED"
        # Sidecars were told about each change a sidecar could see (c added, c deleted).
        assert len(set(r.notified)) >= 3

        await eventually(lambda: is_ready(api, "a", ("False", "InvalidSpec")))
        ready = next(c for c in status(api, "a")["conditions"] if c["type"] == "Ready")
        assert BAD_SPEC_PROBLEM in ready["message"]
        assert "Generation 1 is still enforced." in ready["message"]
        assert status(api, "a")["observedGeneration"] == 2


async def test_watches_only_the_given_namespaces(api: ApiServer, issuer: TestIssuer) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    await api.create(JWTPOLICIES, policy("x", namespace="elsewhere", spec_doc=good(issuer)))
    async with replica(api, namespaces=("shop",)) as r:
        await r.controller.synced.wait()
        await eventually(lambda: is_ready(api, "a"))
        assert r.entry_names() == ["a"]
        assert "status" not in api.object(JWTPOLICIES, "elsewhere", "x")


# --- status, Events -----------------------------------------------------------------


async def test_status_converges_matches_the_crd_and_events_tell(
    api: ApiServer, issuer: TestIssuer
) -> None:
    await api.create(JWTPOLICIES, policy("old", created=T1, spec_doc=good(issuer)))
    await api.create(JWTPOLICIES, policy("new", created=T2, spec_doc=good(issuer)))
    await api.create(JWTPOLICIES, policy("broken", spec_doc=BAD_SPEC))
    async with replica(api) as r:
        await eventually(lambda: is_ready(api, "old") and is_ready(api, "new"))
        await eventually(lambda: is_ready(api, "broken", ("False", "InvalidSpec")))
        for name in ("old", "new", "broken"):
            assert status_problems(status(api, name)) == [], name

        assert condition(api, "new", "Conflicted") == ("True", "Overridden")
        assert condition(api, "old", "Conflicted") == ("True", "Governs")
        assert status(api, "new")["conflicts"] == ["shop/old"]
        issuers = status(api, "old")["issuers"]
        assert [(i["issuer"], i["ready"], i["lastError"]) for i in issuers] == [
            (issuer.issuer, True, "")
        ]
        assert sorted(issuers[0]["keyIds"]) == sorted(issuer.dev.kids)

        # Converged: further passes write nothing.
        written = len(r.api.patches)
        await asyncio.sleep(20 * FAST["status_interval"])
        assert len(r.api.patches) == written

        assert ("Normal", "Ready") in events_for(api, "old")
        assert ("Warning", "Conflict") in events_for(api, "new")
        assert events_for(api, "broken") == [("Warning", "InvalidSpec")]


async def test_wrong_jwks_uri_is_visible_on_the_resource(
    api: ApiServer, issuer: TestIssuer
) -> None:
    wrong = {"issuers": [{"issuer": issuer.issuer, "jwksUri": f"{issuer.url}/no-such-keys"}]}
    await api.create(JWTPOLICIES, policy("a", spec_doc=wrong))
    async with replica(api):
        await eventually(lambda: is_ready(api, "a", ("False", "KeysUnavailable")))
        (reported,) = status(api, "a")["issuers"]
        assert reported["ready"] is False and reported["keyIds"] == []
        assert "/no-such-keys: HTTP status 404" in reported["lastError"]
        # The Event follows the status write that caused it: it may land just after.
        await eventually(lambda: events_for(api, "a") == [("Warning", "KeysUnavailable")])

        await api.patch(JWTPOLICIES, "shop", "a", {"spec": good(issuer)})
        await eventually(lambda: is_ready(api, "a"))
        (reported,) = status(api, "a")["issuers"]
        assert reported["ready"] is True and reported["keyIds"] and reported["lastError"] == ""
        assert "lastFetchTime" in reported
        await eventually(lambda: events_for(api, "a")[-1:] == [("Normal", "Ready")])


# --- faults: 410, 409, 5xx -----------------------------------------------------------


async def test_410_gone_mid_watch_relists_and_loses_nothing(
    api: ApiServer, issuer: TestIssuer
) -> None:
    for name in ("a", "b", "c"):
        await api.create(JWTPOLICIES, policy(name, spec_doc=good(issuer)))
    async with replica(api) as r:
        await eventually(lambda: r.entry_names() == ["a", "b", "c"])
        await eventually(lambda: requests(api, kmock.action.WATCH))  # kopf is watching
        # The watch ends with 410 Gone and the relist fails once; meanwhile b goes,
        # a changes and d comes. The watch never reports b's deletion.
        api.fail("list", resource=JWTPOLICIES, status=500)
        await api.expire_history()
        await api.delete(JWTPOLICIES, "shop", "b")
        await api.patch(JWTPOLICIES, "shop", "a", {"spec": good(issuer, {"app": "web"})})
        await api.create(JWTPOLICIES, policy("d", spec_doc=good(issuer)))

        await eventually(lambda: r.entry_names() == ["a", "c", "d"])
        assert "DELETED" not in r.api.event_types("b")  # the resync found it gone
        await eventually(lambda: r.controller.index.entries[("shop", "a")].generation == 2)
        await eventually(lambda: all(is_ready(api, n) for n in ("a", "c", "d")))
        await eventually(lambda: len(requests(api, kmock.action.WATCH)) >= 2)  # kopf, again


async def test_409_on_a_status_patch_is_retried_until_it_converges(
    api: ApiServer, issuer: TestIssuer
) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    api.fail("PATCH", resource=JWTPOLICIES, subresource="status", status=409, times=2)
    async with replica(api) as r:
        await eventually(lambda: is_ready(api, "a"))
        assert len(r.api.patches) >= 3
        assert len(requests(api, kmock.action.FETCH)) >= 2  # a re-read after each 409


async def test_a_real_conflict_rereads_the_object(api: ApiServer, issuer: TestIssuer) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    async with replica(api) as r:
        raced = []

        async def someone_else_writes_first(namespace: str, name: str) -> None:
            if not raced:  # a label change: a new resourceVersion, the same generation
                raced.append(name)
                await api.patch(JWTPOLICIES, namespace, name, {"metadata": {"labels": {"x": "y"}}})

        r.api.before_patch = someone_else_writes_first
        await eventually(lambda: is_ready(api, "a"))
        assert raced == ["a"]
        assert api.object(JWTPOLICIES, "shop", "a")["metadata"]["labels"] == {"x": "y"}


async def test_api_server_down_for_a_while(api: ApiServer, issuer: TestIssuer) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    await api.create(JWTPOLICIES, policy("b", spec_doc=good(issuer)))
    async with replica(api) as r:
        await eventually(lambda: is_ready(api, "a") and is_ready(api, "b"))
        snapshot = r.controller.index.good_policies()

        await api.set_down(True)
        # Meanwhile, through another API server replica: b breaks, c is created.
        await api.patch(JWTPOLICIES, "shop", "b", {"spec": BAD_SPEC})
        await api.create(JWTPOLICIES, policy("c", spec_doc=good(issuer)))
        failed_before = len(api["list", JWTPOLICIES]) + len(api["watch", JWTPOLICIES])
        await eventually(
            lambda: (
                len(api["list", JWTPOLICIES]) + len(api["watch", JWTPOLICIES]) >= failed_before + 2
            )
        )
        # Failed lists and watches lose no policy: what sidecars get stays.
        assert r.controller.index.good_policies() == snapshot

        await api.set_down(False)
        await eventually(lambda: r.entry_names() == ["a", "b", "c"], timeout=20)
        await eventually(lambda: is_ready(api, "c"), timeout=20)
        await eventually(lambda: is_ready(api, "b", ("False", "InvalidSpec")), timeout=20)
        assert status(api, "b")["observedGeneration"] == 2


async def test_status_writes_back_off_on_5xx_and_converge(
    api: ApiServer, issuer: TestIssuer
) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    api.fail("PATCH", resource=JWTPOLICIES, subresource="status", status=503, times=3)
    async with replica(api) as r:
        await eventually(lambda: is_ready(api, "a"))
        assert len(r.api.patches) == 4
        # While a write backs off, the watch goes on.
        await api.create(JWTPOLICIES, policy("b", spec_doc=good(issuer)))
        await eventually(lambda: "b" in r.entry_names())


# --- leader election ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(api: ApiServer, identity: str, clock: Clock) -> leader.LeaderElector:
    client = cluster_api.ClusterApi(kube.Connection(server=str(api.url).rstrip("/"), insecure=True))
    config = leader.ElectionConfig(namespace="ops", name="lastguard", identity=identity)
    return leader.LeaderElector(client, config, clock=clock)


def holder(api: ApiServer, name: str = "lastguard") -> str | None:
    found: str | None = api.object(LEASES, "ops", name)["spec"].get("holderIdentity")
    return found


async def test_leader_election_over_http(api: ApiServer) -> None:
    clock = Clock()
    one, two = elector(api, "one", clock), elector(api, "two", clock)

    assert await one.step() is True  # creates the Lease
    assert await two.step() is False
    assert holder(api) == "one"

    clock.now += 5
    assert await one.step() is True  # renews
    assert await two.step() is False  # sees the renewal
    clock.now += 14
    assert await two.step() is False  # 14 s since it saw the last renewal: not expired
    clock.now += 1
    assert await two.step() is True  # one stopped renewing: two takes over
    assert holder(api) == "two"
    assert api.object(LEASES, "ops", "lastguard")["spec"]["leaseTransitions"] == 1
    assert await one.step() is False and not one.is_leader

    # A write that loses the race (409) means someone else leads: step down at once.
    api.fail("PUT", resource=LEASES, status=409)
    assert await two.step() is False and not two.is_leader
    assert await two.step() is True

    # An API outage: the leader keeps leading until its renew deadline, then steps down.
    await api.set_down(True)
    clock.now += 5
    assert await two.step() is True
    clock.now += 5
    assert await two.step() is False
    await api.set_down(False)

    # Releasing hands over without waiting for the expiry.
    assert await two.step() is True
    await two.release()
    assert holder(api) is None
    assert await one.step() is True
    assert holder(api) == "one"


async def test_only_the_leader_writes_status(api: ApiServer, issuer: TestIssuer) -> None:
    # Two replicas in one event loop means two kopf instances: stopping the second
    # waits 5 s for the first one's tasks (kopf cannot tell them from its own).
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    clock = Clock()
    first, second = elector(api, "first", clock), elector(api, "second", clock)
    assert await first.step() is True
    assert await second.step() is False
    async with (
        replica(api, is_leader=lambda: first.is_leader, identity="first") as one,
        replica(api, is_leader=lambda: second.is_leader, identity="second") as two,
    ):
        await eventually(lambda: is_ready(api, "a"))
        await eventually(lambda: two.entry_names() == ["a"])
        assert one.api.patches and not two.api.patches

        await first.release()
        assert await second.step() is True
        two.controller.leadership_changed(True)
        written = len(one.api.patches)
        await api.patch(JWTPOLICIES, "shop", "a", {"spec": BAD_SPEC})
        await eventually(lambda: is_ready(api, "a", ("False", "InvalidSpec")))
        assert two.api.patches and len(one.api.patches) == written
        await eventually(lambda: ("Warning", "InvalidSpec") in events_for(api, "a"))


# --- the process ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_operator_process_serves_leads_and_stops_on_sigterm(
    api: ApiServer, issuer: TestIssuer
) -> None:
    await api.create(JWTPOLICIES, policy("a", spec_doc=good(issuer)))
    health, metrics = _free_port(), _free_port()
    operator = await OperatorProcess.start(
        str(api.url),
        "--health-listen", f"127.0.0.1:{health}",
        "--metrics-listen", f"127.0.0.1:{metrics}",
        "--status-interval", "0.1",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:

            async def readyz() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{health}/readyz") as response:
                        return response.status == 200
                return False

            await eventually(readyz, timeout=20)
            async with http.get(f"http://127.0.0.1:{health}/healthz") as response:
                assert response.status == 200
            await eventually(lambda: is_ready(api, "a"), timeout=20)
            expected = (
                # The first event is LISTED or, when kmock's watch replays the object
                # before kopf's list lands (seen under load), ADDED: either is counted.
                # The controller's own list can fill the index first, so wait for it.
                r'lastguard_operator_watch_events_total\{type="(LISTED|ADDED)"\} [1-9]',
                r'lastguard_operator_status_writes_total\{result="ok"\} [1-9]',
                r"lastguard_operator_leader 1\.0",
            )
            exposed = ""

            async def metrics_exposed() -> bool:
                nonlocal exposed
                async with http.get(f"http://127.0.0.1:{metrics}/metrics") as response:
                    exposed = await response.text()
                return all(re.search(pattern, exposed) for pattern in expected)

            try:
                await eventually(metrics_exposed, timeout=10)
            except AssertionError:
                missing = [p for p in expected if not re.search(p, exposed)]
                raise AssertionError(f"metrics missing {missing}") from None
        assert status(api, "a")["sidecars"] == {"current": 0, "total": 0}
        assert holder(api, "lastguard-operator") == "operator-0"
        renewed = api.object(LEASES, "ops", "lastguard-operator")["spec"]["renewTime"]
        assert datetime.datetime.fromisoformat(renewed).tzinfo is not None
        code, output = await operator.stop()
    finally:
        await operator.kill()
    assert code == 0, output
    assert holder(api, "lastguard-operator") is None  # released on the way out
