"""Compiles a JWTPolicy into the structure the Check path reads. No I/O.

Everything that can be decided per policy is decided here, once per load, never
per request: issuers indexed by `iss`, audiences and algorithms as frozensets,
the union of token locations, the compiled rule table, the list of headers
lastguard sets (which are always stripped from client requests so they cannot
be spoofed), and the constant decisions of token-less allows. Key sources are
bound through an injected `source_for`, so the compiled policy holds direct
references and the hot path does no lookups by configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lastguard.sidecar import extract, match
from lastguard.sidecar.claims import normalize_audience
from lastguard.sidecar.decision import Decision
from lastguard.sidecar.jwks_cache import KeySource
from lastguard.sidecar.policy import model


@dataclass(frozen=True, slots=True, eq=False)
class CompiledIssuer:
    """An issuer ready for the hot path. Identity (not equality) keys the token cache."""

    config: model.Issuer
    keys: KeySource
    audiences: frozenset[str]
    algorithms: frozenset[str]
    locations: frozenset[extract.Location]


@dataclass(frozen=True, slots=True, eq=False)
class CompiledPolicy:
    policy: model.JWTPolicy
    issuers: dict[str, CompiledIssuer]
    locations: tuple[extract.Location, ...]
    rules: match.RuleTable
    #: Every header an allowed request may carry from lastguard: removed from client input.
    output_headers: tuple[str, ...]
    #: The constant decisions of `Allow` rules and of `Optional` without a token.
    allow_rule: Decision
    allow_without_token: Decision

    @property
    def key(self) -> str:
        return self.policy.key


def compile_policy(
    policy: model.JWTPolicy, source_for: Callable[[model.Issuer], KeySource]
) -> CompiledPolicy:
    issuers = {
        i.issuer: CompiledIssuer(
            config=i,
            keys=source_for(i),
            audiences=frozenset(normalize_audience(a) for a in i.audiences),
            algorithms=frozenset(i.algorithms),
            locations=frozenset(extract.issuer_locations(i)),
        )
        for i in policy.issuers
    }
    outputs = tuple(sorted({h for i in policy.issuers for h in i.output_headers}))
    return CompiledPolicy(
        policy=policy,
        issuers=issuers,
        locations=extract.policy_locations(policy.issuers),
        rules=match.compile_rules(policy.rules, policy.default_action),
        output_headers=outputs,
        allow_rule=Decision.allow("rule_allow", headers_to_remove=outputs),
        allow_without_token=Decision.allow("optional_no_token", headers_to_remove=outputs),
    )
