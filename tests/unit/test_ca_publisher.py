"""The CA bundle publisher: its pure rules as tables, then its passes at the adapter seam.

`desired` and `plan` decide, per namespace, what the ConfigMap should be; the
`CaPublisher` tests drive single passes against tests/support/fake_kube.py,
with errors scripted per call, so each retry path runs without a clock.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lastguard.operator import ca_publisher, flags, kube
from lastguard.operator import main as operator_main
from lastguard.operator.ca_publisher import Action
from tests.support.certs import CertificateAuthority
from tests.support.fake_kube import FakeKubeApi
from tests.support.operator import eventually

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
OURS = {ca_publisher.MANAGED_BY_LABEL: ca_publisher.MANAGED_BY}
ENABLED = {ca_publisher.INJECTION_LABEL: ca_publisher.INJECTION_ENABLED}
CA = "-----BEGIN CERTIFICATE-----\nnew\n-----END CERTIFICATE-----\n"
OLD = "-----BEGIN CERTIFICATE-----\nold\n-----END CERTIFICATE-----\n"


def configmap(
    namespace: str = "shop",
    *,
    data: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    name: str = "lastguard-ca",
    **meta: Any,
) -> dict[str, Any]:
    metadata = {"name": name, "namespace": namespace, "uid": f"uid-{namespace}", **meta}
    if labels is not None:
        metadata["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data or {}}


def namespace(name: str, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}, **meta}}


CREATED = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "lastguard-ca", "namespace": "shop", "labels": OURS},
    "data": {"ca.crt": CA},
}


# --- desired: one namespace ------------------------------------------------------------


@pytest.mark.parametrize(
    ("wanted", "existing", "action", "body"),
    [
        pytest.param(True, None, Action.CREATE, CREATED, id="labelled-absent-create"),
        pytest.param(
            True,
            configmap(data={"ca.crt": CA}, labels=OURS),
            Action.NONE,
            None,
            id="labelled-ours-current-nothing",
        ),
        pytest.param(
            True,
            configmap(
                data={"ca.crt": OLD},
                labels={**OURS, "team": "a"},
                resourceVersion="7",
                annotations={"note": "kept"},
                managedFields=[{"manager": "x"}],
            ),
            Action.UPDATE,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "lastguard-ca",
                    "namespace": "shop",
                    "uid": "uid-shop",
                    "resourceVersion": "7",
                    "annotations": {"note": "kept"},
                    "labels": {**OURS, "team": "a"},
                },
                "data": {"ca.crt": CA},
            },
            id="labelled-ours-stale-update-keeps-metadata",
        ),
        pytest.param(
            True,
            configmap(data={"ca.crt": CA, "extra": "x"}, labels=OURS),
            Action.UPDATE,
            ...,
            id="ours-extra-key-update",
        ),
        pytest.param(
            True,
            {**configmap(data={"ca.crt": CA}, labels=OURS), "binaryData": {"b": "AA=="}},
            Action.UPDATE,
            ...,
            id="ours-binary-data-update",
        ),
        pytest.param(
            True, configmap(data={"ca.crt": OLD}), Action.NOT_OURS, None, id="labelled-no-label"
        ),
        pytest.param(
            True,
            configmap(data={"ca.crt": OLD}, labels={ca_publisher.MANAGED_BY_LABEL: "Helm"}),
            Action.NOT_OURS,
            None,
            id="labelled-managed-by-someone-else",
        ),
        pytest.param(
            True,
            configmap(data={"ca.crt": CA}),
            Action.NOT_OURS,
            None,
            id="labelled-not-ours-even-if-current",
        ),
        pytest.param(False, None, Action.NONE, None, id="unlabelled-absent-nothing"),
        pytest.param(
            False,
            configmap(data={"ca.crt": OLD}, labels=OURS),
            Action.UPDATE,
            ...,
            id="label-removed-ours-kept-current",
        ),
        pytest.param(
            False, configmap(data={"ca.crt": OLD}), Action.NONE, None, id="unlabelled-not-ours"
        ),
    ],
)
def test_desired(wanted: bool, existing: dict[str, Any] | None, action: Action, body: Any) -> None:
    step = ca_publisher.desired("shop", CA, existing, wanted=wanted)
    assert (step.namespace, step.action, step.wanted) == ("shop", action, wanted)
    if body is not ...:
        assert step.body == body
    if action is Action.UPDATE:
        assert step.body is not None
        assert step.body["data"] == {"ca.crt": CA}
        assert step.body["metadata"]["labels"][ca_publisher.MANAGED_BY_LABEL] == "lastguard"
        assert "binaryData" not in step.body
        # Applying it gives a ConfigMap with nothing left to do.
        again = ca_publisher.desired("shop", CA, step.body, wanted=wanted)
        assert again.action is Action.NONE
    if existing is not None:
        assert step.uid == "uid-shop"


def test_desired_uses_the_target_name_and_key() -> None:
    target = ca_publisher.Target(name="mesh-ca", key="root.pem")
    step = ca_publisher.desired("shop", CA, None, wanted=True, target=target)
    assert step.body is not None
    assert step.body["metadata"]["name"] == "mesh-ca"
    assert step.body["data"] == {"root.pem": CA}
    current = configmap(name="mesh-ca", data={"root.pem": CA}, labels=OURS)
    assert ca_publisher.desired("shop", CA, current, wanted=True, target=target).action is (
        Action.NONE
    )


# --- plan: every namespace -------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespaces", "configmaps", "expected"),
    [
        pytest.param([], [], [], id="nothing"),
        pytest.param(
            [namespace("shop", ENABLED), namespace("bank", ENABLED)],
            [],
            [("bank", Action.CREATE), ("shop", Action.CREATE)],
            id="labelled-sorted",
        ),
        pytest.param(
            # The list's selector may not have been applied: filtered here too.
            [
                namespace("plain"),
                namespace("off", {ca_publisher.INJECTION_LABEL: "disabled"}),
                namespace("shop", ENABLED),
            ],
            [],
            [("off", Action.NONE), ("plain", Action.NONE), ("shop", Action.CREATE)],
            id="only-enabled",
        ),
        pytest.param(
            [namespace("gone", ENABLED, deletionTimestamp="2026-01-01T00:00:00Z")],
            [],
            [("gone", Action.NONE)],
            id="terminating-nothing",
        ),
        pytest.param(
            [namespace("shop", ENABLED)],
            [
                configmap("shop", data={"ca.crt": CA}, labels=OURS),
                configmap("shop", name="other-config", labels=OURS),
            ],
            [("shop", Action.NONE)],
            id="other-names-ignored",
        ),
        pytest.param(
            [namespace("shop", ENABLED)],
            [
                configmap("shop", data={"ca.crt": OLD}, labels=OURS),
                configmap("left", data={"ca.crt": OLD}, labels=OURS),
                configmap("theirs", data={"ca.crt": OLD}),
            ],
            [("left", Action.UPDATE), ("shop", Action.UPDATE), ("theirs", Action.NONE)],
            id="rotation-also-where-the-label-went",
        ),
        pytest.param(
            [namespace("shop", ENABLED)],
            [configmap("shop", data={"ca.crt": OLD}, labels={"app": "x"})],
            [("shop", Action.NOT_OURS)],
            id="not-ours",
        ),
    ],
)
def test_plan(
    namespaces: list[dict[str, Any]],
    configmaps: list[dict[str, Any]],
    expected: list[tuple[str, Action]],
) -> None:
    steps = ca_publisher.plan(namespaces, configmaps, CA)
    assert [(s.namespace, s.action) for s in steps] == expected


# --- the bundle file -------------------------------------------------------------------


def _pem(name: str = "lastguard test CA") -> bytes:
    return CertificateAuthority.create(name).cert_pem


KEY = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.PKCS8,
    serialization.NoEncryption(),
)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"", "not PEM certificates", id="empty"),
        pytest.param(b"not a certificate", "not PEM certificates", id="garbage"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "not PEM certificates",
            id="bad-der",
        ),
        pytest.param("caf\u00e9".encode(), "not PEM certificates", id="not-ascii"),
        pytest.param(KEY, "private key", id="a-key"),
        pytest.param(_pem() + KEY, "private key", id="a-certificate-and-its-key"),
    ],
)
def test_parse_bundle_refuses(data: bytes, problem: str) -> None:
    with pytest.raises(ca_publisher.BundleError, match=problem):
        ca_publisher.parse_bundle(data)


def test_parse_bundle_keeps_the_text_of_one_or_more_certificates() -> None:
    one, two = _pem("one"), _pem("two")
    assert ca_publisher.parse_bundle(one) == one.decode()
    assert ca_publisher.parse_bundle(one + two) == (one + two).decode()  # rotation overlap


# --- passes against the fake API -------------------------------------------------------


class Harness:
    def __init__(self, tmp_path: Path, *, leader: bool = True, interval: float = 0.02) -> None:
        self.api = FakeKubeApi()
        self.leader = leader
        self.file = tmp_path / "ca.crt"
        self.file.write_bytes(_pem("first"))
        self.publisher = ca_publisher.CaPublisher(
            self.api,
            self.file,
            is_leader=lambda: self.leader,
            identity="replica-1",
            now=lambda: NOW,
            interval=interval,
            retry_backoff=(0.01,),
        )

    @property
    def bundle(self) -> str:
        return self.file.read_text()

    def data(self, namespace: str = "shop") -> dict[str, str]:
        found: dict[str, str] = self.api.configmaps[(namespace, "lastguard-ca")]["data"]
        return found

    def writes(self) -> list[tuple[str, str]]:
        return [(verb, ns) for verb, ns, _ in self.api.configmap_writes]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


async def test_creates_where_labelled_then_has_nothing_to_do(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_namespace("bank", ENABLED)
    h.api.add_namespace("plain")
    result = await h.publisher.publish()
    assert sorted(result.created) == ["bank", "shop"] and not result.retry
    assert sorted(ns for ns, _ in h.api.configmaps) == ["bank", "shop"]
    assert h.data() == {"ca.crt": h.bundle}
    labels = h.api.configmaps[("shop", "lastguard-ca")]["metadata"]["labels"]
    assert labels == OURS

    again = await h.publisher.publish()
    assert (again.created, again.updated, again.failed) == ([], [], [])
    assert len(h.api.configmap_writes) == 2


async def test_rotation_updates_with_the_resource_version_read(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    await h.publisher.publish()
    read = h.api.configmaps[("shop", "lastguard-ca")]["metadata"]["resourceVersion"]

    h.file.write_bytes(_pem("first") + _pem("second"))
    result = await h.publisher.publish()
    assert result.updated == ["shop"]
    assert h.data() == {"ca.crt": h.bundle}
    verb, _, body = h.api.configmap_writes[-1]
    assert verb == "replace" and body["metadata"]["resourceVersion"] == read


async def test_a_bad_bundle_file_is_never_published(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.file.write_text("garbage")
    result = await h.publisher.publish()
    assert result.retry and h.api.configmap_writes == []
    assert h.api.calls["list_namespaces"] == 0  # nothing to publish: no lists either

    h.file.write_bytes(_pem("good"))
    good = h.bundle
    await h.publisher.publish()
    assert h.data() == {"ca.crt": good}

    # Broken (or gone) later: the last good bundle stays, and is restored if changed by hand.
    h.file.unlink()
    h.api.configmaps[("shop", "lastguard-ca")]["data"] = {"ca.crt": "edited"}
    result = await h.publisher.publish()
    assert result.updated == ["shop"] and h.data() == {"ca.crt": good}


async def test_someone_elses_configmap_is_left_alone_and_reported_once(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    theirs = h.api.add_configmap(configmap(data={"ca.crt": "theirs"}))
    for _ in range(2):
        result = await h.publisher.publish()
        assert result.not_ours == ["shop"]
    assert h.api.configmap_writes == []
    assert h.data() == {"ca.crt": "theirs"}
    (event,) = h.api.events
    assert (event.namespace, event.name, event.uid) == ("shop", "lastguard-ca", "uid-shop")
    assert (event.kind, event.api_version, event.type) == ("ConfigMap", "v1", "Warning")
    assert event.reason == "CaBundleNotManaged" and event.instance == "replica-1"
    assert "app.kubernetes.io/managed-by=lastguard" in event.message

    # Replaced by another of theirs (a new uid): reported again.
    del h.api.configmaps[("shop", "lastguard-ca")]
    h.api.add_configmap({**theirs, "metadata": {**theirs["metadata"], "uid": "uid-2"}})
    await h.publisher.publish()
    assert [e.uid for e in h.api.events] == ["uid-shop", "uid-2"]


async def test_an_event_that_cannot_be_posted_does_not_stop_the_pass(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_namespace("bank", ENABLED)
    h.api.add_configmap(configmap(data={"ca.crt": "theirs"}))
    h.api.script("event", kube.Unavailable("down", 503))
    result = await h.publisher.publish()
    assert result.created == ["bank"] and result.not_ours == ["shop"]


async def test_conflict_on_create_rereads_and_finds_it_done(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)

    async def another_replica_creates_it() -> None:
        h.api.add_configmap(configmap(data={"ca.crt": h.bundle}, labels=OURS))

    h.api.script("create_configmap", another_replica_creates_it())
    result = await h.publisher.publish()
    assert h.writes() == [("create", "shop")]
    assert h.api.calls["get_configmap"] == 1
    assert (result.created, result.failed, result.retry) == ([], [], False)


async def test_conflict_on_create_rereads_and_finds_it_not_ours(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)

    async def someone_creates_theirs() -> None:
        h.api.add_configmap(configmap(data={"ca.crt": "theirs"}))

    h.api.script("create_configmap", someone_creates_theirs())
    result = await h.publisher.publish()
    assert result.not_ours == ["shop"] and h.data() == {"ca.crt": "theirs"}


async def test_conflict_on_replace_rereads_and_replaces_again(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_configmap(configmap(data={"ca.crt": OLD}, labels=OURS))

    async def someone_adds_a_label() -> None:
        cm = h.api.configmaps[("shop", "lastguard-ca")]
        h.api.add_configmap({**cm, "metadata": {**cm["metadata"], "labels": {**OURS, "x": "y"}}})

    h.api.script("replace_configmap", someone_adds_a_label())
    result = await h.publisher.publish()
    assert result.updated == ["shop"] and h.writes() == [("replace", "shop")] * 2
    stored = h.api.configmaps[("shop", "lastguard-ca")]
    assert stored["data"] == {"ca.crt": h.bundle}
    assert stored["metadata"]["labels"] == {**OURS, "x": "y"}  # their change is kept


async def test_endless_conflicts_give_up_for_this_pass(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_configmap(configmap(data={"ca.crt": OLD}, labels=OURS))
    h.api.script("replace_configmap", *[kube.Conflict("raced", 409)] * 3)
    result = await h.publisher.publish()
    assert result.failed == ["shop"] and result.retry
    assert len(h.writes()) == 3
    result = await h.publisher.publish()
    assert result.updated == ["shop"]


async def test_deleted_between_list_and_replace_is_created(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_configmap(configmap(data={"ca.crt": OLD}, labels=OURS))

    async def someone_deletes_it() -> None:
        del h.api.configmaps[("shop", "lastguard-ca")]

    h.api.script("replace_configmap", someone_deletes_it())
    result = await h.publisher.publish()
    assert h.writes() == [("replace", "shop"), ("create", "shop")]
    assert result.created == ["shop"] and h.data() == {"ca.crt": h.bundle}


async def test_namespace_gone_before_the_create(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)

    async def namespace_deleted() -> None:
        del h.api.namespaces["shop"]

    h.api.script("create_configmap", namespace_deleted())
    result = await h.publisher.publish()
    assert (result.created, result.failed, result.retry) == ([], [], False)


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        pytest.param(kube.Unavailable("503", 503), True, id="unavailable-retried-soon"),
        pytest.param(kube.Rejected("403 forbidden", 403), False, id="rejected-next-pass"),
    ],
)
async def test_failed_writes(h: Harness, error: kube.ApiError, retry: bool) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.add_namespace("bank", ENABLED)
    h.api.script("create_configmap", error)
    result = await h.publisher.publish()
    assert (len(result.created), len(result.failed), result.retry) == (1, 1, retry)
    result = await h.publisher.publish()
    assert len(result.created) == 1 and not result.failed
    assert sorted(ns for ns, _ in h.api.configmaps) == ["bank", "shop"]


@pytest.mark.parametrize("method", ["list_namespaces", "list_configmaps"])
async def test_a_failed_list_writes_nothing(h: Harness, method: str) -> None:
    h.api.add_namespace("shop", ENABLED)
    h.api.script(method, kube.Unavailable("down", 500))
    result = await h.publisher.publish()
    assert result.retry and h.api.configmap_writes == []
    assert (await h.publisher.publish()).created == ["shop"]


async def test_a_lost_leadership_stops_the_writes_of_a_pass(h: Harness) -> None:
    h.api.add_namespace("shop", ENABLED)

    async def leadership_lost() -> None:
        h.leader = False

    h.api.script("list_configmaps", leadership_lost())
    await h.publisher.publish()
    assert h.api.configmap_writes == []


async def test_only_the_leader_publishes_and_a_new_leader_at_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, leader=False, interval=3600.0)  # only a wake-up starts a pass
    h.api.add_namespace("shop", ENABLED)
    task = asyncio.create_task(h.publisher.run())
    try:
        await asyncio.sleep(0)  # the first pass: not the leader
        assert h.api.calls["list_namespaces"] == 0
        h.leader = True
        h.publisher.leadership_changed(True)
        await eventually(lambda: ("shop", "lastguard-ca") in h.api.configmaps, timeout=2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_retries_soon_after_a_failure(tmp_path: Path) -> None:
    h = Harness(tmp_path, interval=3600.0)  # a second pass can only come from the backoff
    h.api.add_namespace("shop", ENABLED)
    h.api.script("create_configmap", kube.Unavailable("503", 503))
    task = asyncio.create_task(h.publisher.run())
    try:
        await eventually(lambda: ("shop", "lastguard-ca") in h.api.configmaps, timeout=2)
        assert h.writes() == [("create", "shop")] * 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- flags -----------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    flags.add_operator_arguments(parser)
    return parser.parse_args(["--insecure", *argv])


def test_flags_default_to_publishing_nothing() -> None:
    config = operator_main.config_from(_args())
    assert (config.ca_bundle, config.ca_configmap) == (None, "lastguard-ca")


def test_flags_name_the_bundle_and_the_configmap() -> None:
    config = operator_main.config_from(
        _args("--publish-ca-bundle", "/tls/ca.crt", "--ca-configmap-name", "mesh-ca")
    )
    assert (config.ca_bundle, config.ca_configmap) == (Path("/tls/ca.crt"), "mesh-ca")


@pytest.mark.parametrize("name", ["Upper", "-dash", "a..b", "x" * 254, ""])
def test_flags_refuse_a_configmap_name_kubernetes_would(name: str) -> None:
    with pytest.raises(SystemExit, match="not a ConfigMap name"):
        operator_main.config_from(_args(f"--ca-configmap-name={name}"))
