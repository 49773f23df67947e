"""The verified-token cache: expiry, key generations, and both bounds with LRU order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lastguard.sidecar.token_cache import TokenCache


@dataclass
class Keys:
    generation: int = 1


@dataclass
class Issuer:
    keys: Keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(
    cache: TokenCache, key: bytes, issuer: Any, *, expires_at: float = 2000.0, payload: str = "p"
) -> None:
    cache.put(key, issuer, {"scope": "a b"}, payload, issuer.keys.generation, expires_at)


def test_a_hit_until_exp_then_gone() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    issuer = Issuer(Keys())
    put(cache, b"t", issuer, expires_at=1010.0)
    entry = cache.get(b"t")
    assert entry is not None and sorted(entry.scopes) == ["a", "b"]
    clock.now = 1010.0
    assert cache.get(b"t") is None
    assert len(cache) == 0


def test_new_keys_for_the_issuer_invalidate_its_tokens() -> None:
    cache = TokenCache(clock=Clock())
    issuer = Issuer(Keys())
    put(cache, b"t", issuer)
    issuer.keys.generation = 2
    assert cache.get(b"t") is None


def test_the_entry_bound_evicts_the_least_recently_used() -> None:
    cache = TokenCache(max_entries=2, clock=Clock())
    issuer = Issuer(Keys())
    put(cache, b"a", issuer)
    put(cache, b"b", issuer)
    assert cache.get(b"a") is not None  # now b is the least recently used
    put(cache, b"c", issuer)
    assert [k for k in (b"a", b"b", b"c") if cache.get(k)] == [b"a", b"c"]


def test_the_byte_bound_holds_and_an_oversized_entry_is_not_kept() -> None:
    one = 3300 + 3 * 100  # the accounted size of an entry with a 100-byte payload
    cache = TokenCache(max_bytes=2 * one, clock=Clock())
    issuer = Issuer(Keys())
    for key in (b"a", b"b", b"c"):
        put(cache, key, issuer, payload="x" * 100)
    assert len(cache) == 2 and cache.get(b"a") is None
    put(cache, b"huge", issuer, payload="x" * 10_000)
    assert cache.get(b"huge") is None and len(cache) == 2


def test_putting_the_same_token_again_replaces_it_once() -> None:
    cache = TokenCache(max_entries=2, clock=Clock())
    issuer = Issuer(Keys())
    put(cache, b"a", issuer)
    put(cache, b"a", issuer)
    put(cache, b"b", issuer)
    assert len(cache) == 2 and cache.get(b"a") is not None and cache.get(b"b") is not None
