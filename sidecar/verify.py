"""`lastguard verify`: one decision, explained, without Envoy or a running sidecar.

Runs the very pipeline the sidecar runs (same store, authorizer and key
sources; keys are fetched over the network when the policy points at a
jwksUri or discovery), and reports the decision, the rule that matched and
why. The token itself is never printed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lastguard.sidecar.authenticator import Authenticator
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.fetch import HttpFetcher
from lastguard.sidecar.jwks_cache import KeyRegistry
from lastguard.sidecar.policy.parse import parse_documents
from lastguard.sidecar.policy.select import Workload
from lastguard.sidecar.store import PolicyStore


async def explain(
    policy_file: Path,
    workload: Workload | None,
    default_namespace: str,
    *,
    token: str | None,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    request_headers = {k.lower(): v for k, v in (headers or {}).items()}
    if token:
        request_headers["authorization"] = f"Bearer {token}"
    fetcher = HttpFetcher()
    registry = KeyRegistry(fetcher)
    authorizer = Authorizer(Authenticator())
    try:
        store = PolicyStore(authorizer, registry, workload)
        try:
            compiled = store.apply(parse_documents(policy_file.read_text(), default_namespace))
        except PolicyError as exc:
            return {"allowed": False, "reason": "invalid_policy", "problems": exc.problems}
        decision = await authorizer.check(method, path, request_headers)
    finally:
        await registry.close()
        await fetcher.close()
    result: dict[str, Any] = {
        "allowed": decision.allowed,
        "status": decision.status,
        "reason": decision.reason,
        "policy": compiled.key if compiled else None,
    }
    if compiled is not None:
        rule = compiled.rules.find(method, path)
        result["rule"] = {
            "action": rule.action.value,
            **{k: v for k, v in dataclasses.asdict(rule).items() if v and k != "action"},
        }
    if decision.allowed:
        result["headers_to_set"] = dict(decision.headers_to_set)
        result["headers_to_remove"] = list(decision.headers_to_remove)
        if decision.metadata:
            result["claims"] = decision.metadata.get("claims")
    else:
        result["error"] = decision.error
        result["description"] = decision.description
    return result
