"""The operator's view of every JWTPolicy, and the snapshots sidecars receive. Pure.

Each policy is kept with its last raw object, its parse result, and its last
*good* model: when an update is invalid, the entry records the problems but
keeps distributing the previous good version, so a bad policy never replaces a
good one. A policy that was never valid is not distributed at all. The good
version belongs to one object: when a policy is deleted and created again under
the same name (a new uid), nothing of the old object is carried over, even if a
watch gap hid the deletion.

A sidecar's snapshot is the set of good policies in its namespace whose
selector matches its labels (the candidates); the sidecar picks the winner with
`lastguard.sidecar.store.choose`, the same code as in file mode. The snapshot
version is a digest of its documents, so it only changes when what a sidecar
would enforce changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.policy import select
from lastguard.sidecar.policy.model import JWTPolicy
from lastguard.sidecar.policy.parse import parse_policy

PolicyKey = tuple[str, str]  # (namespace, name)

#: Metadata a sidecar needs; everything else (managedFields, status...) is dropped.
_KEPT_METADATA = ("name", "namespace", "creationTimestamp", "generation", "uid")


def distributable(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a JWTPolicy object that is sent to sidecars (no status, lean metadata)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
        "spec": obj.get("spec"),
    }


def policy_key(obj: Mapping[str, Any]) -> PolicyKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "default")), str(meta.get("name", "")))


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Entry:
    key: PolicyKey
    generation: int | None
    #: Problems of the current generation; empty when it is valid.
    problems: tuple[str, ...]
    #: The last valid version (maybe an older generation), or None if never valid.
    good: JWTPolicy | None
    good_document: str | None
    good_generation: int | None
    uid: str | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    documents: tuple[str, ...]  # canonical JSON of each candidate policy

    @classmethod
    def of(cls, documents: Iterable[str]) -> Snapshot:
        docs = tuple(sorted(documents))
        digest = hashlib.sha256("\n".join(docs).encode()).hexdigest()[:16]
        return cls(version=digest, documents=docs)


@dataclass
class PolicyIndex:
    entries: dict[PolicyKey, Entry] = field(default_factory=dict)
    #: Increments on every change that can alter a snapshot.
    revision: int = 0

    def upsert(self, obj: Mapping[str, Any]) -> Entry:
        key = policy_key(obj)
        meta = obj.get("metadata") or {}
        generation = meta.get("generation") if isinstance(meta.get("generation"), int) else None
        uid = str(meta["uid"]) if meta.get("uid") is not None else None
        previous = self.entries.get(key)
        carried = previous
        if carried is not None and None not in (carried.uid, uid) and carried.uid != uid:
            carried = None  # another object under the same name: nothing carries over
        document = distributable(obj)
        try:
            policy = parse_policy(document)
        except PolicyError as exc:
            entry = Entry(
                key=key,
                generation=generation,
                problems=tuple(exc.problems),
                good=carried.good if carried else None,
                good_document=carried.good_document if carried else None,
                good_generation=carried.good_generation if carried else None,
                uid=uid,
            )
        else:
            entry = Entry(
                key=key,
                generation=generation,
                problems=(),
                good=policy,
                good_document=_canonical(document),
                good_generation=generation,
                uid=uid,
            )
        self.entries[key] = entry
        if (previous.good_document if previous else None) != entry.good_document:
            self.revision += 1
        return entry

    def delete(self, namespace: str, name: str) -> Entry | None:
        entry = self.entries.pop((namespace, name), None)
        if entry is not None and entry.good is not None:
            self.revision += 1
        return entry

    def replace_all(
        self, objs: Iterable[Mapping[str, Any]], keep: Collection[PolicyKey] = ()
    ) -> None:
        """After a relist: objects that are gone are deleted; the rest are upserted.

        Keys in `keep` are left as they are, listed or not: the caller knows of
        something newer about them than the list (an event that arrived while
        the list was being read).
        """
        seen: set[PolicyKey] = set()
        for obj in objs:
            key = policy_key(obj)
            seen.add(key)
            if key not in keep:
                self.upsert(obj)
        for key in list(self.entries):
            if key not in seen and key not in keep:
                self.delete(*key)

    def good_policies(self) -> list[JWTPolicy]:
        return [e.good for e in self.entries.values() if e.good is not None]

    def candidates(self, workload: select.Workload) -> list[Entry]:
        return sorted(
            (
                e
                for e in self.entries.values()
                if e.good is not None and select.selects(e.good, workload)
            ),
            key=lambda e: e.key,
        )

    def snapshot_for(self, workload: select.Workload) -> Snapshot:
        return Snapshot.of(e.good_document for e in self.candidates(workload) if e.good_document)
