"""The verified-token cache (light-4j's `enableJwtCache`). No I/O.

Keyed by the SHA-256 digest of the token, so tokens themselves are not kept as
keys. An entry:
- never outlives the token's `exp` (a per-entry time-to-use),
- is bound to the compiled issuer object it was verified for, so a policy
  reload (new objects) or a token from another policy misses,
- records the issuer's key-set generation, so when the issuer's keys change
  every token verified before is verified again: a removed key stops working
  at the next key refresh.
Bounded by entries and by approximate bytes; least recently used goes first.
An expired entry goes when it is next looked up or reaches the LRU end.

It is cachetools' `LRUCache` with the expiry checked here, not `TLRUCache`:
a hit costs ~0.3 us against ~1.7 us (TLRU keeps a second, time-ordered
structure up to date on every access), and a hit is most of what Check does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

from lastguard.sidecar.claims import granted_scopes

if TYPE_CHECKING:
    from lastguard.sidecar.compile import CompiledIssuer

#: Measured resident cost of one entry (claims, decision, serialized response, cache
#: bookkeeping): about 3.3 KB plus 2.7 bytes per byte of encoded payload (Python 3.11,
#: protobuf 7; see docs/performance.md). Used to keep the byte bound honest.
_ENTRY_OVERHEAD = 3300
_BYTES_PER_PAYLOAD_BYTE = 3


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    issuer: CompiledIssuer
    claims: dict[str, Any]
    payload_segment: str
    generation: int
    expires_at: float
    size: int
    #: The scopes the token grants (`scope` / `scp`), parsed once. A tuple of strings,
    #: not a frozenset: the garbage collector stops tracking such a tuple, and every
    #: tracked object in the cache lengthens each full collection's pause.
    scopes: tuple[str, ...]
    #: Results derived from this token alone (the allowed Decision per token location),
    #: computed once and reused by every later request with the same token.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)


class TokenCache:
    def __init__(
        self,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._cache: LRUCache[bytes, VerifiedToken] = LRUCache(
            maxsize=max_bytes, getsizeof=lambda v: v.size
        )

    @staticmethod
    def digest(token: str) -> bytes:
        return sha256(token.encode()).digest()

    def get(self, digest: bytes) -> VerifiedToken | None:
        """The live entry for a token digest, unless its issuer's keys changed since.

        The caller must still check that `entry.issuer` belongs to the policy at hand.
        """
        entry = self._cache.get(digest)
        if entry is None:
            return None
        if self.clock() >= entry.expires_at or entry.generation != entry.issuer.keys.generation:
            self._cache.pop(digest, None)
            return None
        return entry

    def put(
        self,
        digest: bytes,
        issuer: CompiledIssuer,
        claims: dict[str, Any],
        payload_segment: str,
        generation: int,
        expires_at: float,
    ) -> VerifiedToken:
        entry = VerifiedToken(
            issuer=issuer,
            claims=claims,
            payload_segment=payload_segment,
            generation=generation,
            expires_at=expires_at,
            size=_ENTRY_OVERHEAD + _BYTES_PER_PAYLOAD_BYTE * len(payload_segment),
            scopes=tuple(granted_scopes(claims)),
        )
        if entry.size > self._cache.maxsize or self.max_entries < 1:
            return entry
        self._cache.pop(digest, None)
        while len(self._cache) >= self.max_entries:
            self._cache.popitem()
        self._cache[digest] = entry  # evicts the least recently used over the byte bound
        return entry

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
