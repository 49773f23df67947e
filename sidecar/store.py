"""Holds the policy this sidecar enforces and swaps it atomically.

Sources of policies (a file today, the operator's stream later) hand complete
sets of JWTPolicy objects to `PolicyStore.apply`. The store selects the one
that governs this workload, compiles it with key sources from the shared
`KeyRegistry`, and replaces the authorizer's policy in one assignment. A set
that cannot be applied raises and leaves the current policy in place, so a bad
update never replaces a good one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from lastguard.sidecar import metrics
from lastguard.sidecar.authorizer import Authorizer
from lastguard.sidecar.compile import CompiledPolicy, compile_policy
from lastguard.sidecar.errors import PolicyError
from lastguard.sidecar.jwks_cache import KeyRegistry
from lastguard.sidecar.policy import select
from lastguard.sidecar.policy.model import JWTPolicy

log = logging.getLogger("lastguard.policy")


def choose(policies: Sequence[JWTPolicy], workload: select.Workload | None) -> JWTPolicy | None:
    """The policy for the workload; without a workload identity, the file's only policy."""
    if workload is None:
        if len(policies) > 1:
            raise PolicyError(
                [
                    f"{len(policies)} policies loaded but no workload identity given: "
                    "pass --namespace and --label so one can be selected"
                ]
            )
        return policies[0] if policies else None
    selection = select.select(policies, workload)
    for loser in selection.conflicts:
        assert selection.policy is not None
        log.warning(
            "conflicting policies select this workload",
            extra={"fields": {"winner": selection.policy.key, "ignored": loser.key}},
        )
    return selection.policy


class PolicyStore:
    def __init__(
        self,
        authorizer: Authorizer,
        registry: KeyRegistry,
        workload: select.Workload | None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.registry = registry
        self.workload = workload
        self.on_ready = on_ready
        self._prefetch: asyncio.Task[None] | None = None

    @property
    def current(self) -> CompiledPolicy | None:
        return self.authorizer.policy

    @property
    def loaded(self) -> bool:
        """Whether a policy set was ever applied (even one that selects nothing)."""
        return self.authorizer.ready

    def apply(self, policies: Sequence[JWTPolicy]) -> CompiledPolicy | None:
        """Selects, compiles and installs; raises PolicyError and changes nothing on failure."""
        try:
            chosen = choose(policies, self.workload)
            compiled = None if chosen is None else compile_policy(chosen, self.registry.source_for)
        except PolicyError:
            metrics.POLICY_RELOADS.labels("error").inc()
            raise
        first = not self.loaded
        self.authorizer.install(compiled)
        self.registry.retain(compiled.policy.issuers if compiled else ())
        metrics.POLICY_RELOADS.labels("ok").inc()
        metrics.POLICIES_LOADED.set(len(policies))
        log.info(
            "policy applied",
            extra={
                "fields": {"policy": compiled.key if compiled else None, "loaded": len(policies)}
            },
        )
        self._start_prefetch()
        if first and self.on_ready is not None:
            self.on_ready()
        return compiled

    def _start_prefetch(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._prefetch is None or self._prefetch.done():
            self._prefetch = loop.create_task(self.registry.prefetch(timeout=10.0))
