"""What a JWTPolicy's `.status` should say, and which Events a change deserves. Pure.

No kopf, no Kubernetes client, no clock of its own: the controller passes the
index entry (what was parsed and which generation is enforced), the key status
of each issuer of the enforced generation, the policy's conflicts, the sidecar
counts, the status now on the object and the current time. The output is the
status object of the CRD (manifests/crds/jwtpolicies.lastguard.dev.yaml).

Conditions (metav1.Condition shape), always these three, in this order:
- `Ready`: True when the current generation is valid and every issuer has keys.
  Reasons: `Valid`, `InvalidSpec` (the field-path problems, and which generation
  is still enforced, if any), `KeysUnavailable`, `KeysPending` (Unknown).
- `KeysReady`: about the enforced generation's issuers, detailed in `issuers[]`.
  Reasons: `KeysLoaded`, `NoIssuers`, `KeysUnavailable`, `KeysPending`, `NotEnforced`.
- `Conflicted`: True when another policy at the same level selects some of the
  same workloads; the message names the winner and why. Reasons: `NoConflict`,
  `Overridden` (this policy loses somewhere), `Governs` (it wins everywhere).

Invariants:
- Deterministic: the same inputs give the same status, lists sorted.
- A condition's lastTransitionTime changes only when its status changes, so
  computing the status again from unchanged inputs yields the status already
  written, and the controller writes nothing.
- Every string and list is cut to the CRD's bounds.
- Conflicts use the sidecar's own ranking (`lastguard.sidecar.policy.select`):
  a policy with a selector beats a namespace-wide one, then the oldest
  creationTimestamp, then the first name.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from lastguard.operator.index import Entry, PolicyIndex, PolicyKey
from lastguard.sidecar.jwks_cache import KeyStatus
from lastguard.sidecar.policy import select
from lastguard.sidecar.policy.model import JWTPolicy

READY = "Ready"
KEYS_READY = "KeysReady"
CONFLICTED = "Conflicted"

# Bounds well inside the CRD's (message 32768, lastError 4096, keyIds 256 x 256, lists 256).
MAX_MESSAGE = 8192
MAX_ERROR = 1024
MAX_KEY_IDS = 256
MAX_KEY_ID = 256
MAX_CONFLICTS = 256


# --- conflicts -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conflict:
    """Two enforced policies that could both select one pod, at the same level."""

    other: PolicyKey
    winner: PolicyKey
    #: Which rule decided: "creationTimestamp" (the winner is older) or "name".
    rule: str
    winner_created: str | None
    loser_created: str | None


@dataclass(frozen=True, slots=True)
class ConflictInfo:
    key: PolicyKey
    conflicts: tuple[Conflict, ...]  # sorted by `other`

    @property
    def others(self) -> tuple[PolicyKey, ...]:
        return tuple(c.other for c in self.conflicts)

    @property
    def lost(self) -> tuple[Conflict, ...]:
        return tuple(c for c in self.conflicts if c.winner != self.key)


def overlap(a: JWTPolicy, b: JWTPolicy) -> bool:
    """Whether one pod could be selected by both, at the same level."""
    if a.namespace != b.namespace or a.namespace_wide != b.namespace_wide:
        return False
    labels = dict(a.match_labels or ())
    return all(labels.get(k, v) == v for k, v in b.match_labels or ())


def conflicts(index: PolicyIndex) -> dict[PolicyKey, ConflictInfo]:
    """The conflicts of every enforced (good) policy that has any."""
    by_namespace: dict[str, list[tuple[PolicyKey, JWTPolicy]]] = defaultdict(list)
    for entry in sorted(index.entries.values(), key=lambda e: e.key):
        if entry.good is not None:
            by_namespace[entry.key[0]].append((entry.key, entry.good))
    found: dict[PolicyKey, list[Conflict]] = defaultdict(list)
    for members in by_namespace.values():
        for (key_a, a), (key_b, b) in combinations(members, 2):
            if not overlap(a, b):
                continue
            # A pod carrying both selectors' labels: the sidecar's own choice decides.
            labels = dict(a.match_labels or ()) | dict(b.match_labels or ())
            chosen = select.select([a, b], select.Workload.of(a.namespace, labels)).policy
            winner, loser = (a, b) if chosen is a else (b, a)
            same_age = winner.creation_timestamp == loser.creation_timestamp
            for mine, other in ((key_a, key_b), (key_b, key_a)):
                found[mine].append(
                    Conflict(
                        other=other,
                        winner=key_a if chosen is a else key_b,
                        rule="name" if same_age else "creationTimestamp",
                        winner_created=winner.creation_timestamp,
                        loser_created=loser.creation_timestamp,
                    )
                )
    return {
        key: ConflictInfo(key, tuple(sorted(c, key=lambda x: x.other))) for key, c in found.items()
    }


# --- the status --------------------------------------------------------------------


def desired_status(
    entry: Entry,
    *,
    keys: Mapping[str, KeyStatus],
    conflict: ConflictInfo | None = None,
    sidecars: tuple[int, int] | None = None,
    previous: Mapping[str, Any] | None = None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """The status for this entry. `keys` is by issuer, for the enforced generation's issuers.

    KeyStatus times are read as Unix time (the operator's KeyRegistry runs on
    the wall clock). `previous` is the status on the object, for transition times.
    """
    issuers = _issuers(entry, keys)
    keys_condition = _keys_condition(entry, issuers)
    conditions = [
        _ready_condition(entry, keys_condition),
        keys_condition,
        _conflicted_condition(entry, conflict),
    ]
    before = _conditions_by_type(previous)
    stamped = []
    for condition in conditions:
        old = before.get(condition["type"])
        keep = old is not None and old.get("status") == condition["status"]
        when = old.get("lastTransitionTime") if keep and old else None
        condition["lastTransitionTime"] = when if isinstance(when, str) else _rfc3339(now)
        if entry.generation is not None:
            condition["observedGeneration"] = entry.generation
        stamped.append(condition)

    status: dict[str, Any] = {}
    if entry.generation is not None:
        status["observedGeneration"] = entry.generation
    status["conditions"] = stamped
    status["issuers"] = [issuer.as_status() for issuer in issuers]
    others = conflict.others if conflict else ()
    status["conflicts"] = [f"{ns}/{name}" for ns, name in others][:MAX_CONFLICTS]
    if sidecars is not None:
        status["sidecars"] = {"current": max(0, sidecars[0]), "total": max(0, sidecars[1])}
    return status


def merge_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7396) that turns `current` into `desired`.

    Lists are replaced whole, as merge patches do; keys that `desired` lacks are
    set to null so that the API server removes them.
    """
    patch: dict[str, Any] = {}
    current = current or {}
    for key in current:
        if key not in desired:
            patch[key] = None
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            sub = merge_patch(old, value)
            if sub:
                patch[key] = sub
        elif old != value or key not in current:
            patch[key] = value
    return patch


# --- Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChange:
    """An Event to emit: type is "Normal" or "Warning"."""

    type: str
    reason: str
    message: str


def state_changes(
    previous: Mapping[str, Any] | None, desired: Mapping[str, Any]
) -> list[StateChange]:
    """Events for what changed between the status on the object and the desired one.

    Only Ready, Conflicted and (when Ready does not already say it) KeysReady
    count; a condition that keeps its status and reason is no news. A pending
    state (Unknown) is no news either: it is what every policy starts with.
    """
    before = _conditions_by_type(previous)
    after = _conditions_by_type(desired)
    changes: list[StateChange] = []

    def changed(kind: str) -> Mapping[str, Any] | None:
        new = after.get(kind)
        old = before.get(kind)
        if new is None or new.get("status") == "Unknown":
            return None
        if old is not None and (old.get("status"), old.get("reason")) == (
            new.get("status"),
            new.get("reason"),
        ):
            return None
        return new

    ready = changed(READY)
    if ready is not None:
        if ready["status"] == "True":
            changes.append(StateChange("Normal", "Ready", ready["message"]))
        else:
            changes.append(StateChange("Warning", ready["reason"], ready["message"]))
    keys = changed(KEYS_READY)
    said = ready is not None and ready.get("reason") == (keys or {}).get("reason")
    if keys is not None and keys["status"] == "False" and not said:
        changes.append(StateChange("Warning", keys["reason"], keys["message"]))
    conflicted = changed(CONFLICTED)
    if conflicted is not None:
        if conflicted["status"] == "True":
            changes.append(StateChange("Warning", "Conflict", conflicted["message"]))
        elif before.get(CONFLICTED, {}).get("status") == "True":
            changes.append(StateChange("Normal", "ConflictResolved", conflicted["message"]))
    return changes


# --- parts ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Issuer:
    issuer: str
    state: str  # "ready", "unavailable", "pending"
    kids: tuple[str, ...]
    error: str
    fetched_at: float | None

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "issuer": self.issuer,
            "ready": self.state == "ready",
            "keyIds": [_cut(kid, MAX_KEY_ID) for kid in self.kids[:MAX_KEY_IDS]],
            "lastError": self.error,
        }
        if self.fetched_at is not None:
            out["lastFetchTime"] = _rfc3339(
                datetime.datetime.fromtimestamp(self.fetched_at, tz=datetime.UTC)
            )
        return out


def _issuers(entry: Entry, keys: Mapping[str, KeyStatus]) -> list[_Issuer]:
    if entry.good is None:
        return []
    out = []
    for issuer in sorted({i.issuer for i in entry.good.issuers}):
        status = keys.get(issuer)
        if status is None or (not status.ok and status.last_error is None):
            out.append(_Issuer(issuer, "pending", (), "", None))
            continue
        error = status.last_error or "; ".join(status.skipped)
        out.append(
            _Issuer(
                issuer,
                "ready" if status.ok else "unavailable",
                tuple(status.kids),
                _cut(error, MAX_ERROR),
                status.last_success_at,
            )
        )
    return out


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": _cut(message, MAX_MESSAGE)}


def _keys_condition(entry: Entry, issuers: Sequence[_Issuer]) -> dict[str, Any]:
    if entry.good is None:
        return _condition(
            KEYS_READY,
            "Unknown",
            "NotEnforced",
            "no generation of this policy is valid: no keys are fetched",
        )
    if not issuers:
        return _condition(KEYS_READY, "True", "NoIssuers", "this policy trusts no issuer")
    unavailable = [i for i in issuers if i.state == "unavailable"]
    pending = [i for i in issuers if i.state == "pending"]
    if unavailable:
        parts = [f"no keys for {i.issuer}: {i.error}" for i in unavailable]
        parts += [f"still fetching keys for {i.issuer}" for i in pending]
        return _condition(KEYS_READY, "False", "KeysUnavailable", "; ".join(parts))
    if pending:
        names = ", ".join(i.issuer for i in pending)
        return _condition(KEYS_READY, "Unknown", "KeysPending", f"fetching keys for {names}")
    stale = [
        f"{i.issuer}: refresh failed, the last good keys stay in use: {i.error}"
        for i in issuers
        if i.error and i.fetched_at is not None
    ]
    message = "every issuer has keys"
    if stale:
        message += "; " + "; ".join(stale)
    return _condition(KEYS_READY, "True", "KeysLoaded", message)


def _ready_condition(entry: Entry, keys_condition: Mapping[str, Any]) -> dict[str, Any]:
    if not entry.valid:
        what = f"generation {entry.generation}" if entry.generation is not None else "this version"
        message = f"{what} is invalid: " + "; ".join(entry.problems) + ". "
        if entry.good is None:
            message += "No generation of this policy was ever valid: it is not enforced."
        elif entry.good_generation is not None:
            message += f"Generation {entry.good_generation} is still enforced."
        else:
            message += "The last valid version is still enforced."
        return _condition(READY, "False", "InvalidSpec", message)
    if keys_condition["status"] == "False":
        return _condition(READY, "False", "KeysUnavailable", keys_condition["message"])
    if keys_condition["status"] == "Unknown":
        return _condition(READY, "Unknown", "KeysPending", keys_condition["message"])
    what = f"generation {entry.generation}" if entry.generation is not None else "this version"
    return _condition(
        READY, "True", "Valid", f"{what} is valid and enforced; {keys_condition['message']}"
    )


def _conflicted_condition(entry: Entry, conflict: ConflictInfo | None) -> dict[str, Any]:
    if conflict is None or not conflict.conflicts:
        return _condition(
            CONFLICTED,
            "False",
            "NoConflict",
            "no other policy selects the same workloads at the same level",
        )
    lost = conflict.lost
    if lost:
        parts = [
            f"{_name(c.winner)} wins over this policy {_BOTH}: {_why(c, mine=False)}" for c in lost
        ]
        won = [c for c in conflict.conflicts if c.winner == conflict.key]
        if won:
            parts.append("this policy wins over " + ", ".join(_name(c.other) for c in won))
        return _condition(CONFLICTED, "True", "Overridden", "; ".join(parts))
    parts = [
        f"this policy wins over {_name(c.other)} {_BOTH}: {_why(c, mine=True)}"
        for c in conflict.conflicts
    ]
    return _condition(CONFLICTED, "True", "Governs", "; ".join(parts))


_BOTH = "for the workloads both select"


def _why(conflict: Conflict, *, mine: bool) -> str:
    """Why the winner won, said from the point of view of this policy (`mine`: it won)."""
    if conflict.rule == "name":
        whose = "this policy's" if mine else "its"
        when = conflict.winner_created or "no creationTimestamp"
        return f"both have the same creationTimestamp ({when}) and {whose} name sorts first"
    winner = conflict.winner_created or "unknown"
    loser = conflict.loser_created or "no creationTimestamp"
    if mine:
        return f"this policy is older (created {winner}; {_name(conflict.other)}: {loser})"
    return f"it is older (created {winner}; this policy: {loser})"


def _name(key: PolicyKey) -> str:
    return f"{key[0]}/{key[1]}"


def _conditions_by_type(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    conditions = (status or {}).get("conditions")
    if not isinstance(conditions, list):
        return {}
    return {
        c["type"]: c
        for c in conditions
        if isinstance(c, Mapping) and isinstance(c.get("type"), str)
    }


def _rfc3339(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
