"""The Check pipeline: request in, Decision out. Always answers; fails closed.

Order: the workload's compiled policy (none: 403, or allow by flag), the first
matching rule, then by action: Allow and Deny decide at once; Authenticate and
Optional look for a token (missing: 401, or allowed on Optional), authenticate
it, check required scopes and claims, and build the allowed request's header
changes. Any `DenyError` becomes a denial at one boundary
(`Decision.from_error`); anything unexpected becomes a 500 denial, never an
allow and never a gRPC error.

On every allowed request every header lastguard can set is first removed from
the client's request, so `x-user` cannot be spoofed; headers actually set are
overwritten instead (Envoy applies removals after sets, so a header must not be
in both lists).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lastguard.sidecar import claims as claims_mod
from lastguard.sidecar import errors, extract
from lastguard.sidecar.authenticator import Authenticator
from lastguard.sidecar.compile import CompiledPolicy
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.policy.model import Action
from lastguard.sidecar.token_cache import VerifiedToken

log = logging.getLogger("lastguard.decisions")


class Authorizer:
    def __init__(
        self,
        authenticator: Authenticator,
        *,
        allow_without_policy: bool = False,
        log_claims: bool = False,
    ) -> None:
        self.authenticator = authenticator
        self.allow_without_policy = allow_without_policy
        self.log_claims = log_claims
        #: Swapped whole on reload (`install`); readers take one reference per request.
        self.policy: CompiledPolicy | None = None
        #: False until a policy set was installed (even one that selects nothing).
        self.ready = False

    def install(self, policy: CompiledPolicy | None) -> None:
        """Enforces `policy` from the next Check on (None: no policy selects the workload)."""
        self.policy = policy
        self.ready = True

    async def check(self, method: str, path: str, headers: Mapping[str, str]) -> Decision:
        policy = self.policy
        verified: VerifiedToken | None = None
        try:
            decision, verified = await self._decide(policy, method, path, headers)
        except errors.DenyError as exc:
            decision = Decision.from_error(exc)
        except Exception:
            log.exception("check failed unexpectedly; denying")
            decision = Decision.internal_error()
        if not decision.allowed:
            self._log_denial(decision, policy, method, path, verified)
        return decision

    async def _decide(
        self, policy: CompiledPolicy | None, method: str, path: str, headers: Mapping[str, str]
    ) -> tuple[Decision, VerifiedToken | None]:
        if policy is None:
            if not self.ready:
                raise errors.NotReady()
            if self.allow_without_policy:
                return Decision.allow("no_policy_allowed"), None
            raise errors.NoPolicy()
        rule = policy.rules.find(method, path)
        if rule.action is Action.ALLOW:
            return policy.allow_rule, None
        if rule.action is Action.DENY:
            raise errors.RuleDenied()

        found = extract.find_token(policy.locations, headers, path)
        if found is None:
            if rule.action is Action.OPTIONAL:
                return policy.allow_without_token, None
            raise errors.MissingToken()
        verified = await self.authenticator.authenticate(found, policy)
        try:
            claims_mod.require_scopes(verified.scopes, rule.required_scopes)
            claims_mod.require_claims(verified.claims, rule.required_claims)
        except errors.AccessError as exc:
            return Decision.from_error(exc), verified
        return self._allowed_memo(policy, found, verified, headers), verified

    @classmethod
    def _allowed_memo(
        cls,
        policy: CompiledPolicy,
        found: extract.FoundToken,
        verified: VerifiedToken,
        headers: Mapping[str, str],
    ) -> Decision:
        """The allowed Decision, reused for a cached token unless it depends on the request.

        The verified token belongs to one compiled policy (through its issuer), so the
        token location alone keys the memo; a cookie token's decision rewrites the
        request's other cookies and is never memoised.
        """
        if found.location.kind == "cookie":
            return cls._allowed(policy, found, verified, headers)
        decision: Decision | None = verified.memo.get(found.location)
        if decision is None:
            decision = cls._allowed(policy, found, verified, headers)
            verified.memo[found.location] = decision
        return decision

    @staticmethod
    def _allowed(
        policy: CompiledPolicy,
        found: extract.FoundToken,
        verified: VerifiedToken,
        headers: Mapping[str, str],
    ) -> Decision:
        config = verified.issuer.config
        to_set: list[tuple[str, str]] = []
        for out in config.output_claim_to_headers:
            value = claims_mod.header_value(claims_mod.claim_at(verified.claims, out.claim))
            if value is not None:
                to_set.append((out.header, value))
        if config.output_payload_to_header:
            to_set.append((config.output_payload_to_header, verified.payload_segment))

        to_remove = set(policy.output_headers)
        params: tuple[str, ...] = ()
        if not config.forward_original_token:
            loc = found.location
            if loc.kind == "header":
                to_remove.add(loc.name)
            elif loc.kind == "param":
                params = (loc.name,)
            else:
                rest = extract.cookie_header_without(headers.get("cookie", ""), loc.name)
                if rest:
                    to_set.append(("cookie", rest))
                else:
                    to_remove.add("cookie")
        to_remove.difference_update(name for name, _ in to_set)
        metadata: dict[str, Any] = {
            "policy": policy.key,
            "issuer": config.issuer,
            "claims": verified.claims,
        }
        return Decision.allow(
            "authenticated",
            headers_to_set=tuple(to_set),
            headers_to_remove=tuple(sorted(to_remove)),
            query_params_to_remove=params,
            metadata=metadata,
        )

    def _log_denial(
        self,
        decision: Decision,
        policy: CompiledPolicy | None,
        method: str,
        path: str,
        verified: VerifiedToken | None,
    ) -> None:
        fields: dict[str, Any] = {
            "decision": "deny",
            "status": decision.status,
            "reason": decision.reason,
            "policy": policy.key if policy else None,
            "method": method,
            # As sent, without the query string, which may carry a token (fromParams).
            "path": path.partition("?")[0].partition("#")[0],
        }
        if verified is not None:
            fields["issuer"] = verified.issuer.config.issuer
            if self.log_claims:
                fields["claims"] = verified.claims
        log.info("request denied", extra={"fields": fields})
