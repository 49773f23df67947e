"""Which JWTPolicy applies to a workload. Pure and deterministic.

A workload is a namespace and its pod labels. Candidates are the policies in
that namespace whose selector matches the labels; a policy without a selector
(or with empty matchLabels) matches every workload of its namespace.

The most specific policy wins: one whose selector matches beats a
namespace-wide one. Between policies at the same level, the oldest
(creationTimestamp) wins, then the lexically first name, the rule Istio uses for
conflicting resources. Losers are reported so the operator can tell the user.
Policies are not merged: exactly one policy governs a workload.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lastguard.sidecar.policy.model import JWTPolicy


@dataclass(frozen=True, slots=True)
class Workload:
    namespace: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, namespace: str, labels: Mapping[str, str]) -> Workload:
        return cls(namespace, tuple(sorted(labels.items())))


@dataclass(frozen=True, slots=True)
class Selection:
    policy: JWTPolicy | None
    #: Policies that also select the workload at the winner's level but lost the tie-break.
    conflicts: tuple[JWTPolicy, ...] = ()


def selects(policy: JWTPolicy, workload: Workload) -> bool:
    if policy.namespace != workload.namespace:
        return False
    if not policy.match_labels:
        return True
    labels = dict(workload.labels)
    return all(labels.get(k) == v for k, v in policy.match_labels)


def _rank(policy: JWTPolicy) -> tuple[int, str, str]:
    # Lower sorts first: specific before namespace-wide; a missing timestamp sorts last.
    return (1 if policy.namespace_wide else 0, policy.creation_timestamp or "~", policy.name)


def select(policies: Iterable[JWTPolicy], workload: Workload) -> Selection:
    candidates = sorted((p for p in policies if selects(p, workload)), key=_rank)
    if not candidates:
        return Selection(None)
    winner = candidates[0]
    conflicts = tuple(p for p in candidates[1:] if p.namespace_wide == winner.namespace_wide)
    return Selection(winner, conflicts)
