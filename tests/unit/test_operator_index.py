"""The operator's PolicyIndex: objects in, entries and sidecar snapshots out.

Each table row is a sequence of watch operations; the expectation is the entry
(or the snapshot) afterwards. The rules pinned here: a bad update keeps the last
good document, a policy never valid is not distributed, a re-created policy
carries nothing over, and a snapshot's version changes exactly when what the
sidecar would enforce changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from lastguard.operator import index as index_mod
from lastguard.operator.index import PolicyIndex
from lastguard.sidecar.policy.select import Workload
from tests.support.policies import BAD_SPEC, BAD_SPEC_PROBLEM, policy, spec

Op = Callable[[PolicyIndex], Any]
WEB = Workload.of("shop", {"app": "web"})


def up(name: str, **kwargs: Any) -> Op:
    obj = policy(name, **kwargs)
    return lambda ix: ix.upsert(obj)


def bad(name: str, **kwargs: Any) -> Op:
    return up(name, spec_doc=BAD_SPEC, **kwargs)


def delete(name: str, namespace: str = "shop") -> Op:
    return lambda ix: ix.delete(namespace, name)


def run(*ops: Op) -> PolicyIndex:
    ix = PolicyIndex()
    for op in ops:
        op(ix)
    return ix


# --- entries ------------------------------------------------------------------------

ENTRY_CASES = [
    # ops, (valid, problems, enforced generation or None)
    pytest.param([up("a")], (True, (), 1), id="valid-create"),
    pytest.param([bad("a")], (False, (BAD_SPEC_PROBLEM,), None), id="never-valid-is-not-enforced"),
    pytest.param(
        [up("a"), bad("a", generation=2)],
        (False, (BAD_SPEC_PROBLEM,), 1),
        id="bad-update-keeps-last-good",
    ),
    pytest.param(
        [up("a"), bad("a", generation=2), bad("a", generation=3)],
        (False, (BAD_SPEC_PROBLEM,), 1),
        id="two-bad-updates-keep-the-first-good",
    ),
    pytest.param(
        [up("a"), bad("a", generation=2), up("a", generation=3, labels={"app": "web"})],
        (True, (), 3),
        id="fixed-after-bad",
    ),
    pytest.param(
        [up("a", uid="first"), bad("a", uid="second")],
        (False, (BAD_SPEC_PROBLEM,), None),
        id="recreated-under-the-same-name-carries-nothing-over",
    ),
    pytest.param(
        [up("a", uid="first", generation=4), up("a", uid="second", generation=1)],
        (True, (), 1),
        id="recreated-valid-replaces",
    ),
    pytest.param(
        [up("a", generation=None), bad("a", generation=None)],
        (False, (BAD_SPEC_PROBLEM,), None),
        id="no-generation-still-keeps-the-good-model",
    ),
]


@pytest.mark.parametrize(("ops", "expected"), ENTRY_CASES)
def test_entry_after(ops: list[Op], expected: tuple[bool, tuple[str, ...], int | None]) -> None:
    entry = run(*ops).entries[("shop", "a")]
    valid, problems, enforced = expected
    assert (entry.valid, entry.problems, entry.good_generation) == (valid, problems, enforced)
    assert (entry.good is not None) == (entry.good_document is not None)
    if entry.good is None:
        assert entry.good_generation is None


def test_bad_update_distributes_the_last_good_document() -> None:
    ix = run(up("a", labels={"app": "web"}))
    good = ix.snapshot_for(WEB)
    ix.upsert(policy("a", spec_doc=BAD_SPEC, generation=2))
    assert ix.snapshot_for(WEB) == good
    assert json.loads(good.documents[0])["metadata"]["generation"] == 1


def test_distributed_document_is_lean() -> None:
    obj = policy("a", resource_version="77", status={"observedGeneration": 1})
    obj["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    obj["metadata"]["labels"] = {"team": "x"}
    ix = PolicyIndex()
    ix.upsert(obj)
    (document,) = ix.snapshot_for(Workload.of("shop", {})).documents
    assert json.loads(document) == {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {
            "name": "a",
            "namespace": "shop",
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "generation": 1,
            "uid": "uid-a",
        },
        "spec": spec(),
    }


def test_delete_forgets_and_reports_the_entry() -> None:
    ix = run(up("a"))
    assert ix.delete("shop", "a") is not None
    assert ix.entries == {}
    assert ix.delete("shop", "a") is None


# --- snapshots --------------------------------------------------------------------

SNAPSHOT_CASES = [
    # setup ops, change ops, whether the snapshot for shop/{app: web} changes
    pytest.param([up("a")], [up("a")], False, id="same-object-again"),
    pytest.param(
        [up("a")], [up("a", resource_version="2", status={"x": 1})], False, id="status-only"
    ),
    pytest.param([up("a")], [bad("a", generation=2)], False, id="bad-update"),
    pytest.param([up("a")], [up("b", namespace="other")], False, id="policy-in-another-namespace"),
    pytest.param([up("a")], [up("b", labels={"app": "api"})], False, id="policy-for-another-app"),
    pytest.param([up("a")], [bad("b")], False, id="never-valid-policy-added"),
    pytest.param([up("a"), bad("b")], [delete("b")], False, id="never-valid-policy-deleted"),
    pytest.param(
        [up("a")], [up("a", generation=2, labels={"app": "web"})], True, id="spec-changed"
    ),
    pytest.param([up("a")], [up("b", labels={"app": "web"})], True, id="candidate-added"),
    pytest.param([up("a"), up("b")], [delete("b")], True, id="candidate-deleted"),
    pytest.param(
        [up("a")],
        [up("a", uid="new", generation=1)],
        True,
        id="recreated-with-a-new-uid",
    ),
]


@pytest.mark.parametrize(("setup", "change", "changes"), SNAPSHOT_CASES)
def test_snapshot_version_changes_only_with_the_candidates(
    setup: list[Op], change: list[Op], changes: bool
) -> None:
    ix = run(*setup)
    before, revision = ix.snapshot_for(WEB), ix.revision
    for op in change:
        op(ix)
    after = ix.snapshot_for(WEB)
    assert (after.version != before.version) is changes
    assert (after.documents != before.documents) is changes
    if not changes:
        assert after == before
    if changes:
        assert ix.revision > revision


def test_revision_stays_for_changes_no_sidecar_can_see() -> None:
    ix = run(up("a"))
    revision = ix.revision
    for op in (up("a", resource_version="9"), bad("a", generation=2), bad("z"), delete("z")):
        op(ix)
    assert ix.revision == revision


def test_snapshot_is_independent_of_insertion_order() -> None:
    one = run(up("a"), up("b", labels={"app": "web"}))
    two = run(up("b", labels={"app": "web"}), up("a"))
    assert one.snapshot_for(WEB) == two.snapshot_for(WEB)


CANDIDATE_CASES = [
    pytest.param(Workload.of("shop", {"app": "web"}), ["ns-wide", "web"], id="specific-and-wide"),
    pytest.param(Workload.of("shop", {"app": "api"}), ["ns-wide"], id="only-wide"),
    pytest.param(Workload.of("other", {"app": "web"}), [], id="other-namespace"),
]


@pytest.mark.parametrize(("workload", "names"), CANDIDATE_CASES)
def test_candidates(workload: Workload, names: list[str]) -> None:
    ix = run(up("web", labels={"app": "web"}), up("ns-wide"), bad("broken"))
    assert [e.key[1] for e in ix.candidates(workload)] == names
    assert len(ix.snapshot_for(workload).documents) == len(names)


# --- relists ----------------------------------------------------------------------


def test_replace_all_deletes_what_is_gone_and_updates_the_rest() -> None:
    ix = run(up("a"), up("b"))
    ix.replace_all([policy("a", generation=2, labels={"app": "web"}), policy("c")])
    assert sorted(ix.entries) == [("shop", "a"), ("shop", "c")]
    assert ix.entries[("shop", "a")].generation == 2


def test_replace_all_leaves_kept_keys_alone() -> None:
    # "b" was deleted and "n" created by events that arrived while the list was read.
    ix = run(up("a"), up("n"))
    listed = [policy("a"), policy("b")]
    ix.replace_all(listed, keep={("shop", "b"), ("shop", "n")})
    assert sorted(ix.entries) == [("shop", "a"), ("shop", "n")]


def test_policy_key_defaults_the_namespace() -> None:
    assert index_mod.policy_key({"metadata": {"name": "x"}}) == ("default", "x")
