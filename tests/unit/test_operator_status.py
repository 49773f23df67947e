"""What the operator writes in a JWTPolicy's status: tables of spec, keys and conflicts in,
conditions out.

Every status produced here is also checked against the CRD's status schema
(tests/support/crd.py), as the API server would check it.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from lastguard.operator import status
from lastguard.operator.index import Entry, PolicyIndex
from lastguard.sidecar.jwks_cache import KeyStatus
from tests.support.crd import status_problems
from tests.support.policies import BAD_SPEC, BAD_SPEC_PROBLEM, ISSUER, policy

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(minutes=5)
FETCHED = datetime.datetime(2026, 1, 2, 3, 0, 0, tzinfo=datetime.UTC).timestamp()
OTHER = "https://other.example"


def keys_ok(*kids: str, error: str | None = None) -> KeyStatus:
    return KeyStatus(
        source=f"{ISSUER}/jwks.json",
        kids=kids or ("k1",),
        ok=True,
        last_error=error,
        last_success_at=FETCHED,
        last_attempt_at=FETCHED,
    )


def keys_failed(error: str = "https://idp.example/jwks.json: HTTP status 404") -> KeyStatus:
    return KeyStatus(
        source=f"{ISSUER}/jwks.json",
        kids=(),
        ok=False,
        last_error=error,
        last_success_at=None,
        last_attempt_at=FETCHED,
    )


PENDING = KeyStatus(
    source="x", kids=(), ok=False, last_error=None, last_success_at=None, last_attempt_at=None
)


def entry_after(*objs: dict[str, Any]) -> Entry:
    ix = PolicyIndex()
    entry = None
    for obj in objs:
        entry = ix.upsert(obj)
    assert entry is not None
    return entry


def compute(entry: Entry, keys: dict[str, KeyStatus], **kwargs: Any) -> dict[str, Any]:
    out = status.desired_status(entry, keys=keys, now=kwargs.pop("now", NOW), **kwargs)
    assert status_problems(out) == []
    return out


def conditions(out: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in out["conditions"]}


def message(out: dict[str, Any], kind: str) -> str:
    return next(c["message"] for c in out["conditions"] if c["type"] == kind)


TWO_ISSUERS = {
    "issuers": [
        {"issuer": ISSUER, "jwksUri": f"{ISSUER}/jwks.json"},
        {"issuer": OTHER, "jwksUri": f"{OTHER}/jwks.json"},
    ]
}
NO_ISSUERS = {"defaultAction": "Deny", "rules": [{"paths": ["/healthz"], "action": "Allow"}]}

# objects (in watch order), key status by issuer -> Ready, KeysReady, message fragments
STATUS_CASES = [
    pytest.param(
        [policy("a")],
        {ISSUER: keys_ok("k1", "k2")},
        ("True", "Valid"),
        ("True", "KeysLoaded"),
        ["generation 1 is valid and enforced"],
        id="valid-with-keys",
    ),
    pytest.param(
        [policy("a")],
        {ISSUER: keys_failed()},
        ("False", "KeysUnavailable"),
        ("False", "KeysUnavailable"),
        [f"no keys for {ISSUER}: https://idp.example/jwks.json: HTTP status 404"],
        id="wrong-jwks-uri-is-visible",
    ),
    pytest.param(
        [policy("a")],
        {ISSUER: PENDING},
        ("Unknown", "KeysPending"),
        ("Unknown", "KeysPending"),
        [f"fetching keys for {ISSUER}"],
        id="keys-not-fetched-yet",
    ),
    pytest.param(
        [policy("a")],
        {},
        ("Unknown", "KeysPending"),
        ("Unknown", "KeysPending"),
        [f"fetching keys for {ISSUER}"],
        id="issuer-not-in-the-registry-yet",
    ),
    pytest.param(
        [policy("a", spec_doc=TWO_ISSUERS)],
        {ISSUER: keys_ok(), OTHER: keys_failed("down")},
        ("False", "KeysUnavailable"),
        ("False", "KeysUnavailable"),
        [f"no keys for {OTHER}: down"],
        id="one-issuer-of-two-without-keys",
    ),
    pytest.param(
        [policy("a", spec_doc=TWO_ISSUERS)],
        {ISSUER: keys_failed("down"), OTHER: PENDING},
        ("False", "KeysUnavailable"),
        ("False", "KeysUnavailable"),
        [f"no keys for {ISSUER}: down", f"still fetching keys for {OTHER}"],
        id="failed-and-pending",
    ),
    pytest.param(
        [policy("a")],
        {ISSUER: keys_ok(error="timed out after 5s")},
        ("True", "Valid"),
        ("True", "KeysLoaded"),
        [f"{ISSUER}: refresh failed, the last good keys stay in use: timed out after 5s"],
        id="stale-keys-still-ready",
    ),
    pytest.param(
        [policy("a", spec_doc=NO_ISSUERS)],
        {},
        ("True", "Valid"),
        ("True", "NoIssuers"),
        ["this policy trusts no issuer"],
        id="allow-deny-only-policy",
    ),
    pytest.param(
        [policy("a", spec_doc=BAD_SPEC)],
        {},
        ("False", "InvalidSpec"),
        ("Unknown", "NotEnforced"),
        [
            f"generation 1 is invalid: {BAD_SPEC_PROBLEM}.",
            "No generation of this policy was ever valid: it is not enforced.",
        ],
        id="never-valid",
    ),
    pytest.param(
        [policy("a"), policy("a", generation=2, spec_doc=BAD_SPEC)],
        {ISSUER: keys_ok()},
        ("False", "InvalidSpec"),
        ("True", "KeysLoaded"),
        [f"generation 2 is invalid: {BAD_SPEC_PROBLEM}.", "Generation 1 is still enforced."],
        id="bad-update-says-which-generation-is-enforced",
    ),
    pytest.param(
        [policy("a"), policy("a", generation=2, spec_doc=BAD_SPEC)],
        {ISSUER: keys_failed()},
        ("False", "InvalidSpec"),
        ("False", "KeysUnavailable"),
        ["Generation 1 is still enforced."],
        id="invalid-spec-outranks-keys",
    ),
]


@pytest.mark.parametrize(("objs", "keys", "ready", "keys_ready", "fragments"), STATUS_CASES)
def test_conditions(
    objs: list[dict[str, Any]],
    keys: dict[str, KeyStatus],
    ready: tuple[str, str],
    keys_ready: tuple[str, str],
    fragments: list[str],
) -> None:
    out = compute(entry_after(*objs), keys)
    got = conditions(out)
    assert (got["Ready"], got["KeysReady"]) == (ready, keys_ready)
    assert got["Conflicted"] == ("False", "NoConflict")
    text = message(out, "Ready") + " | " + message(out, "KeysReady")
    for fragment in fragments:
        assert fragment in text
    assert out["observedGeneration"] == objs[-1]["metadata"]["generation"]
    assert {c["observedGeneration"] for c in out["conditions"]} == {out["observedGeneration"]}


def test_issuers_report_key_ids_errors_and_fetch_time() -> None:
    entry = entry_after(policy("a", spec_doc=TWO_ISSUERS))
    out = compute(entry, {ISSUER: keys_ok("k2", "k1"), OTHER: keys_failed("refused")})
    assert out["issuers"] == [
        {
            "issuer": ISSUER,
            "ready": True,
            "keyIds": ["k2", "k1"],
            "lastError": "",
            "lastFetchTime": "2026-01-02T03:00:00Z",
        },
        {"issuer": OTHER, "ready": False, "keyIds": [], "lastError": "refused"},
    ]


def test_skipped_keys_show_as_the_issuers_error() -> None:
    skipped = KeyStatus(
        source="inline",
        kids=("good",),
        ok=True,
        last_error=None,
        last_success_at=None,
        last_attempt_at=None,
        skipped=("kid 'hs': symmetric keys are never used",),
    )
    out = compute(entry_after(policy("a")), {ISSUER: skipped})
    assert out["issuers"][0]["lastError"] == "kid 'hs': symmetric keys are never used"
    assert "lastFetchTime" not in out["issuers"][0]


def test_issuers_of_the_enforced_generation_are_reported() -> None:
    entry = entry_after(policy("a"), policy("a", generation=2, spec_doc=BAD_SPEC))
    assert [i["issuer"] for i in compute(entry, {})["issuers"]] == [ISSUER]
    assert compute(entry_after(policy("a", spec_doc=BAD_SPEC)), {})["issuers"] == []


def test_bounds_hold_for_huge_inputs() -> None:
    many = tuple(f"kid-{i}-" + "x" * 300 for i in range(400))
    out = compute(entry_after(policy("a")), {ISSUER: keys_ok(*many, error="e" * 10_000)})
    issuer = out["issuers"][0]
    assert len(issuer["keyIds"]) == 256
    assert max(len(k) for k in issuer["keyIds"]) <= 256
    assert len(issuer["lastError"]) <= 4096


def test_sidecars_are_reported_when_known() -> None:
    entry = entry_after(policy("a"))
    assert compute(entry, {ISSUER: keys_ok()}, sidecars=(2, 3))["sidecars"] == {
        "current": 2,
        "total": 3,
    }
    assert "sidecars" not in compute(entry, {ISSUER: keys_ok()})


# --- transitions --------------------------------------------------------------------


def test_recomputing_from_unchanged_inputs_changes_nothing() -> None:
    entry = entry_after(policy("a"))
    first = compute(entry, {ISSUER: keys_ok()})
    again = compute(entry, {ISSUER: keys_ok()}, previous=first, now=LATER)
    assert again == first
    assert status.merge_patch(first, again) == {}


TRANSITION_CASES = [
    # keys before, keys after, whether Ready's lastTransitionTime moves
    pytest.param(keys_ok(), keys_ok("k9"), False, id="new-key-ids-same-status"),
    pytest.param(keys_ok(), keys_ok(error="refresh failed"), False, id="stale-keys-same-status"),
    pytest.param(keys_ok(), keys_failed(), True, id="ready-to-unavailable"),
    pytest.param(keys_failed(), keys_ok(), True, id="unavailable-to-ready"),
    pytest.param(PENDING, keys_failed(), True, id="pending-to-unavailable"),
]


@pytest.mark.parametrize(("before", "after", "moves"), TRANSITION_CASES)
def test_last_transition_time_moves_only_with_the_status(
    before: KeyStatus, after: KeyStatus, moves: bool
) -> None:
    entry = entry_after(policy("a"))
    first = compute(entry, {ISSUER: before})
    second = compute(entry, {ISSUER: after}, previous=first, now=LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Ready"] == ("2026-01-02T03:09:05Z" if moves else "2026-01-02T03:04:05Z")
    assert times["Conflicted"] == "2026-01-02T03:04:05Z"


def test_reason_change_with_the_same_status_keeps_the_time() -> None:
    # False/KeysUnavailable -> False/InvalidSpec: same status, so the same transition time.
    first = compute(entry_after(policy("a")), {ISSUER: keys_failed()})
    bad = entry_after(policy("a"), policy("a", generation=2, spec_doc=BAD_SPEC))
    second = compute(bad, {ISSUER: keys_failed()}, previous=first, now=LATER)
    ready = next(c for c in second["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["lastTransitionTime"]) == ("InvalidSpec", "2026-01-02T03:04:05Z")


def test_a_garbled_previous_status_is_ignored() -> None:
    previous = {"conditions": [{"type": "Ready", "status": "True"}, "junk", {"no": "type"}]}
    out = compute(entry_after(policy("a")), {ISSUER: keys_ok()}, previous=previous)
    assert out["conditions"][0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"


# --- conflicts ----------------------------------------------------------------------

T1, T2 = "2024-01-01T00:00:00Z", "2024-02-01T00:00:00Z"

# (name, labels or None, creationTimestamp) of two policies in "shop" -> winner or None
CONFLICT_CASES = [
    pytest.param(
        ("a", None, T2), ("b", None, T1), "b", "creationTimestamp", id="both-wide-older-wins"
    ),
    pytest.param(("a", {"app": "web"}, T2), ("b", None, T1), None, None, id="different-levels"),
    pytest.param(
        ("a", {"app": "web"}, T1), ("b", {"app": "api"}, T1), None, None, id="contradicting-labels"
    ),
    pytest.param(
        ("a", {"app": "web"}, T2),
        ("b", {"tier": "x"}, T1),
        "b",
        "creationTimestamp",
        id="disjoint-keys",
    ),
    pytest.param(
        ("a", {"app": "web"}, T1),
        ("b", {"app": "web", "tier": "x"}, T2),
        "a",
        "creationTimestamp",
        id="subset-selector",
    ),
    pytest.param(("b", None, T1), ("a", None, T1), "a", "name", id="same-age-first-name-wins"),
    pytest.param(
        ("a", None, None), ("b", None, T2), "b", "creationTimestamp", id="no-timestamp-loses"
    ),
]


@pytest.mark.parametrize(("first", "second", "winner", "rule"), CONFLICT_CASES)
def test_conflicts(
    first: tuple[str, dict[str, str] | None, str | None],
    second: tuple[str, dict[str, str] | None, str | None],
    winner: str | None,
    rule: str | None,
) -> None:
    ix = PolicyIndex()
    for name, labels, created in (first, second):
        ix.upsert(policy(name, labels=labels, created=created))
    found = status.conflicts(ix)
    if winner is None:
        assert found == {}
        return
    a, b = ("shop", first[0]), ("shop", second[0])
    assert found[a].others == (b,) and found[b].others == (a,)
    for info in found.values():
        (conflict,) = info.conflicts
        assert (conflict.winner, conflict.rule) == (("shop", winner), rule)


def test_conflicts_ignore_other_namespaces_and_never_valid_policies() -> None:
    ix = PolicyIndex()
    ix.upsert(policy("a"))
    ix.upsert(policy("b", namespace="other"))
    ix.upsert(policy("c", spec_doc=BAD_SPEC))
    assert status.conflicts(ix) == {}


def test_conflicts_use_the_enforced_generation() -> None:
    # "b" is now invalid but its previous, namespace-wide version is still enforced.
    ix = PolicyIndex()
    ix.upsert(policy("a", created=T2))
    ix.upsert(policy("b", created=T1))
    ix.upsert(policy("b", created=T1, generation=2, spec_doc=BAD_SPEC))
    assert status.conflicts(ix)[("shop", "a")].lost[0].winner == ("shop", "b")


def test_conflicted_condition_names_the_winner_and_why() -> None:
    ix = PolicyIndex()
    ix.upsert(policy("young", created=T2))
    ix.upsert(policy("old", created=T1))
    ix.upsert(policy("older-api", labels={"app": "api"}, created=T1))
    found = status.conflicts(ix)
    loser = compute(
        ix.entries[("shop", "young")], {ISSUER: keys_ok()}, conflict=found[("shop", "young")]
    )
    winner = compute(
        ix.entries[("shop", "old")], {ISSUER: keys_ok()}, conflict=found[("shop", "old")]
    )
    alone = compute(ix.entries[("shop", "older-api")], {ISSUER: keys_ok()}, conflict=None)

    assert conditions(loser)["Conflicted"] == ("True", "Overridden")
    assert message(loser, "Conflicted") == (
        "shop/old wins over this policy for the workloads both select: it is older "
        f"(created {T1}; this policy: {T2})"
    )
    assert loser["conflicts"] == ["shop/old"]
    assert conditions(winner)["Conflicted"] == ("True", "Governs")
    assert message(winner, "Conflicted") == (
        "this policy wins over shop/young for the workloads both select: this policy is older "
        f"(created {T1}; shop/young: {T2})"
    )
    assert conditions(alone)["Conflicted"] == ("False", "NoConflict")
    assert alone["conflicts"] == []
    # A conflict does not make a valid policy with keys any less Ready.
    assert conditions(loser)["Ready"] == ("True", "Valid")


def test_tie_on_creation_time_is_explained_by_name() -> None:
    ix = PolicyIndex()
    ix.upsert(policy("b", created=T1))
    ix.upsert(policy("a", created=T1))
    found = status.conflicts(ix)
    out = compute(ix.entries[("shop", "b")], {ISSUER: keys_ok()}, conflict=found[("shop", "b")])
    assert message(out, "Conflicted").endswith(
        f"both have the same creationTimestamp ({T1}) and its name sorts first"
    )


def test_a_policy_can_win_one_conflict_and_lose_another() -> None:
    ix = PolicyIndex()
    ix.upsert(policy("mid", labels={"app": "web"}, created=T2))
    ix.upsert(policy("old", labels={"tier": "x"}, created=T1))
    ix.upsert(policy("new", labels={"app": "web", "zone": "a"}, created="2024-03-01T00:00:00Z"))
    info = status.conflicts(ix)[("shop", "mid")]
    out = compute(ix.entries[("shop", "mid")], {ISSUER: keys_ok()}, conflict=info)
    assert conditions(out)["Conflicted"] == ("True", "Overridden")
    assert message(out, "Conflicted").endswith("; this policy wins over shop/new")
    assert out["conflicts"] == ["shop/new", "shop/old"]


# --- merge patches ------------------------------------------------------------------

PATCH_CASES = [
    pytest.param(None, {"a": 1}, {"a": 1}, id="from-nothing"),
    pytest.param({"a": 1}, {"a": 1}, {}, id="unchanged"),
    pytest.param({"a": 1, "b": 2}, {"a": 1}, {"b": None}, id="removed-key-is-nulled"),
    pytest.param({"s": {"x": 1, "y": 2}}, {"s": {"x": 1}}, {"s": {"y": None}}, id="nested"),
    pytest.param({"l": [1, 2]}, {"l": [2]}, {"l": [2]}, id="lists-replaced-whole"),
    pytest.param({"s": 1}, {"s": {"x": 1}}, {"s": {"x": 1}}, id="scalar-to-object"),
]


@pytest.mark.parametrize(("current", "desired", "patch"), PATCH_CASES)
def test_merge_patch(
    current: dict[str, Any] | None, desired: dict[str, Any], patch: dict[str, Any]
) -> None:
    assert status.merge_patch(current, desired) == patch


# --- Events -------------------------------------------------------------------------


def snapshot_status(
    keys: KeyStatus | None, *, bad: bool = False, conflict: bool = False
) -> dict[str, Any]:
    ix = PolicyIndex()
    ix.upsert(policy("a", created=T2))
    if bad:
        ix.upsert(policy("a", created=T2, generation=2, spec_doc=BAD_SPEC))
    if conflict:
        ix.upsert(policy("b", created=T1))
    info = status.conflicts(ix).get(("shop", "a"))
    return compute(ix.entries[("shop", "a")], {ISSUER: keys} if keys else {}, conflict=info)


EVENT_CASES = [
    pytest.param(None, snapshot_status(PENDING), [], id="first-status-pending-is-no-news"),
    pytest.param(None, snapshot_status(keys_ok()), [("Normal", "Ready")], id="became-ready"),
    pytest.param(
        snapshot_status(PENDING),
        snapshot_status(keys_ok()),
        [("Normal", "Ready")],
        id="keys-arrived",
    ),
    pytest.param(
        snapshot_status(keys_ok()), snapshot_status(keys_ok("k2")), [], id="key-rotation-is-no-news"
    ),
    pytest.param(
        snapshot_status(keys_ok()),
        snapshot_status(keys_failed()),
        [("Warning", "KeysUnavailable")],
        id="keys-lost",
    ),
    pytest.param(
        snapshot_status(keys_ok()),
        snapshot_status(keys_ok(), bad=True),
        [("Warning", "InvalidSpec")],
        id="became-invalid",
    ),
    pytest.param(
        snapshot_status(keys_ok(), bad=True),
        snapshot_status(keys_failed(), bad=True),
        [("Warning", "KeysUnavailable")],
        id="keys-lost-while-invalid",
    ),
    pytest.param(
        snapshot_status(keys_ok()),
        snapshot_status(keys_ok(), conflict=True),
        [("Warning", "Conflict")],
        id="conflict-appeared",
    ),
    pytest.param(
        snapshot_status(keys_ok(), conflict=True),
        snapshot_status(keys_ok()),
        [("Normal", "ConflictResolved")],
        id="conflict-resolved",
    ),
]


@pytest.mark.parametrize(("before", "after", "expected"), EVENT_CASES)
def test_state_changes(
    before: dict[str, Any] | None, after: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    changes = status.state_changes(before, after)
    assert [(c.type, c.reason) for c in changes] == expected
    assert all(c.message for c in changes)
