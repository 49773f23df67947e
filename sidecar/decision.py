"""The outcome of a Check and the one place errors become HTTP answers. Pure.

`Decision.from_error` is the boundary where every `DenyError` turns into a
status, an RFC 6750 challenge and a small JSON body. Denials never echo the
token: descriptions are fixed strings from `lastguard.sidecar.errors`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lastguard.sidecar import errors


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    status: int
    reason: str
    error: str | None = None
    description: str = ""
    #: Space-separated scopes the request needed (insufficient_scope only).
    scope: str | None = None
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    query_params_to_remove: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = field(default=None, compare=False)
    #: Scratch space for the protocol edge to keep its rendering of an allowed decision.
    #: Memoised decisions (per cached token, per policy) carry it, so a response is
    #: built once and lives exactly as long as the cache entry that holds the decision.
    renderings: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def allow(
        cls,
        reason: str,
        headers_to_set: tuple[tuple[str, str], ...] = (),
        headers_to_remove: tuple[str, ...] = (),
        query_params_to_remove: tuple[str, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> Decision:
        return cls(
            allowed=True,
            status=200,
            reason=reason,
            headers_to_set=headers_to_set,
            headers_to_remove=headers_to_remove,
            query_params_to_remove=query_params_to_remove,
            metadata=metadata,
            renderings={},
        )

    def rendered(self, protocol: str, build: Callable[[Decision], bytes]) -> bytes:
        """`build(self)`, kept in `renderings` under `protocol` so a reused decision is
        rendered once per protocol edge; built afresh when there is no scratch space."""
        renderings = self.renderings
        if renderings is None:
            return build(self)
        wire: bytes | None = renderings.get(protocol)
        if wire is None:
            wire = renderings[protocol] = build(self)
        return wire

    @classmethod
    def deny(
        cls, status: int, reason: str, error: str | None, description: str, scope: str | None = None
    ) -> Decision:
        return cls(
            allowed=False,
            status=status,
            reason=reason,
            error=error,
            description=description,
            scope=scope,
        )

    @classmethod
    def from_error(cls, exc: errors.DenyError) -> Decision:
        scope = " ".join(exc.scopes) if isinstance(exc, errors.InsufficientScope) else None
        return cls.deny(exc.status, exc.reason, exc.error, exc.description, scope)

    @classmethod
    def internal_error(cls) -> Decision:
        return cls.deny(500, "internal_error", "server_error", "the authorization server failed")

    def challenge(self, realm: str) -> str | None:
        """The WWW-Authenticate value (RFC 6750 section 3), or None when none applies."""
        if self.allowed or self.status not in (401, 403):
            return None
        if self.status == 403 and self.error != "insufficient_scope":
            return None
        params = [f'realm="{realm}"']
        if self.error:
            params.append(f'error="{self.error}"')
            params.append(f'error_description="{self.description}"')
        if self.scope:
            params.append(f'scope="{self.scope}"')
        return "Bearer " + ", ".join(params)

    def body(self) -> str:
        """The small JSON body of a denial."""
        return json.dumps(
            {"error": self.error or "unauthorized", "error_description": self.description},
            separators=(",", ":"),
        )
