"""JWTPolicy documents for tests.

`document(**spec)` is a minimal valid policy (one issuer with a jwksUri) whose
spec fields can be replaced, and `with_issuer(**fields)` changes that issuer:
the parser and CRD tables are written with these. `policy(...)` builds an
object as the API server returns it (uid, generation, creationTimestamp,
resourceVersion), for operator tests; `BAD_SPEC` is a spec the parser rejects
with one known problem.
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "lastguard.dev/v1alpha1"
ISSUER = "https://idp.example"
BAD_SPEC: dict[str, Any] = {"issuers": [{"issuer": ISSUER, "jwksUri": "ftp://idp.example/keys"}]}
BAD_SPEC_PROBLEM = "spec.issuers[0].jwksUri: must be an http(s) URL"


def spec(
    *,
    labels: dict[str, str] | None = None,
    issuer: str = ISSUER,
    jwks_uri: str | None = None,
    audiences: list[str] | None = None,
) -> dict[str, Any]:
    issuer_doc: dict[str, Any] = {"issuer": issuer, "jwksUri": jwks_uri or f"{issuer}/jwks.json"}
    if audiences is not None:
        issuer_doc["audiences"] = audiences
    out: dict[str, Any] = {"issuers": [issuer_doc]}
    if labels is not None:
        out["selector"] = {"matchLabels": labels}
    return out


def policy(
    name: str,
    namespace: str = "shop",
    *,
    spec_doc: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    generation: int | None = 1,
    uid: str | None = None,
    created: str | None = "2024-01-01T00:00:00Z",
    resource_version: str | None = None,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}"}
    if generation is not None:
        meta["generation"] = generation
    if created is not None:
        meta["creationTimestamp"] = created
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "JWTPolicy",
        "metadata": meta,
        "spec": copy.deepcopy(spec_doc) if spec_doc is not None else spec(labels=labels),
    }
    if status is not None:
        obj["status"] = status
    return obj


def document(**spec: Any) -> dict[str, Any]:
    """A minimal valid JWTPolicy (namespace shop, name p) with `spec` fields replaced."""
    base: dict[str, Any] = {"issuers": [{"issuer": ISSUER, "jwksUri": f"{ISSUER}/jwks"}]}
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "JWTPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": base,
    }


def with_issuer(**fields: Any) -> dict[str, Any]:
    """`document()` with its issuer's `fields` changed (None is a null: absent when parsed)."""
    doc = document()
    doc["spec"]["issuers"][0].update(fields)
    return doc
