"""Verification keys per issuer: where they come from, when they are refreshed.

A `KeySource` answers `candidates(kid, alg)` for one issuer's key configuration:
`StaticKeySource` for inline `jwks` / `publicKeys`, `RemoteKeySource` for a
`jwksUri` or OIDC discovery. `KeyRegistry` creates and shares sources for the
loaded policies and refreshes the remote ones in the background.

Invariants of `RemoteKeySource`:
- Hot path: with keys present, `candidates` answers from them without I/O. The
  request path fetches only (a) when the source never had keys, or (b) for a
  kid it does not know, at most once per `unknown_kid_refetch_seconds`. Either
  way it awaits one shared, single-flight fetch for at most `timeout_seconds`;
  a waiter giving up never cancels the fetch others share.
- A failed refresh never drops keys: the last good key set is kept
  indefinitely (an IdP outage must not fail every request), the error is
  logged, counted and shown in `status()`, and the next try follows
  `failure_backoff`. A JWKS without any usable key counts as a failure.
- While a source that never had keys is backing off, requests fail fast with
  `KeysUnavailable` instead of fetching again.
- TTL after a success: `min(cache_seconds, max(min_cache_seconds, max_age))`
  where max_age comes from Cache-Control (no-store / no-cache count as 0); the
  configured `cache_seconds` when the server sends none. A server can shorten
  the cache, never lengthen it, and never below `min_cache_seconds`. A
  discovered jwks_uri is cached with the discovery document's TTL.
- `generation` increases exactly when the key material (or its algorithm
  binding) changes, including the first keys; the verified-token cache uses it.
- Times in `KeyStatus` are readings of the injected clock (monotonic by default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lastguard.sidecar import errors, fetch, keys, metrics
from lastguard.sidecar.policy import fields, model

log = logging.getLogger("lastguard.keys")

Clock = Callable[[], float]

DEFAULT_FAILURE_BACKOFF: tuple[float, ...] = (1, 2, 4, 8, 16, 30, 60)


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """What an operator needs to see about one key source."""

    source: str  # jwksUri, discovery URL, or "inline"
    kids: tuple[str, ...]
    ok: bool  # has usable keys
    last_error: str | None
    last_success_at: float | None
    last_attempt_at: float | None
    #: One problem per key the last parse skipped (symmetric, too small, malformed...).
    skipped: tuple[str, ...] = ()


class KeySource(ABC):
    """The keys of one issuer configuration."""

    #: Increases whenever the key material changes; tokens verified under an older one are stale.
    generation: int = 0

    @abstractmethod
    async def candidates(self, kid: str | None, alg: str) -> tuple[keys.VerificationKey, ...]:
        """Keys to try for a token with this kid and alg (non-empty).

        Raises `errors.KeysUnavailable` when there are no keys at all and
        `errors.UnknownKey` when none matches.
        """

    @abstractmethod
    def status(self) -> KeyStatus: ...


def _pick(keyset: keys.KeySet, kid: str | None, alg: str) -> tuple[keys.VerificationKey, ...]:
    found: tuple[keys.VerificationKey, ...] = keyset.candidates(kid, alg)
    if not found:
        raise errors.UnknownKey()
    return found


class StaticKeySource(KeySource):
    """Keys given in the policy itself (`jwks` or `publicKeys`), parsed once."""

    def __init__(self, keyset: keys.KeySet, problems: Sequence[str] = ()) -> None:
        self._keys = keyset
        self._problems = tuple(problems)
        self.generation = 1 if keyset.keys else 0

    @classmethod
    def from_jwks(cls, document: str, *, label: str) -> StaticKeySource:
        try:
            keyset, problems = keys.parse_jwks(json.loads(document))
        except (ValueError, RecursionError, errors.KeyFetchError) as exc:
            keyset, problems = keys.EMPTY, [f"inline jwks is not a JWKS document: {exc}"]
        return cls._logged(keyset, problems, label)

    @classmethod
    def from_public_keys(cls, pairs: Iterable[tuple[str, str]], *, label: str) -> StaticKeySource:
        keyset, problems = keys.parse_pem_keys(pairs)
        return cls._logged(keyset, problems, label)

    @classmethod
    def _logged(cls, keyset: keys.KeySet, problems: list[str], label: str) -> StaticKeySource:
        if problems:
            log.warning("issuer %s: skipped inline keys: %s", label, "; ".join(problems))
        return cls(keyset, problems)

    async def candidates(self, kid: str | None, alg: str) -> tuple[keys.VerificationKey, ...]:
        if not self._keys.keys:
            raise errors.KeysUnavailable()
        return _pick(self._keys, kid, alg)

    def status(self) -> KeyStatus:
        ok = bool(self._keys.keys)
        return KeyStatus(
            source="inline",
            kids=self._keys.kids,
            ok=ok,
            last_error=None if ok else "no usable keys: " + "; ".join(self._problems),
            last_success_at=None,
            last_attempt_at=None,
            skipped=self._problems,
        )


class RemoteKeySource(KeySource):
    """Keys fetched from a jwksUri, or from the jwks_uri that OIDC discovery names."""

    def __init__(
        self,
        *,
        label: str,
        jwks_uri: str | None = None,
        discovery_issuer: str | None = None,
        fetcher: fetch.Fetcher,
        clock: Clock = time.monotonic,
        cache_seconds: int = model.DEFAULT_JWKS_CACHE_SECONDS,
        timeout_seconds: float = model.DEFAULT_JWKS_TIMEOUT_SECONDS,
        unknown_kid_refetch_seconds: float = 30,
        min_cache_seconds: int = 30,
        failure_backoff: Sequence[float] = DEFAULT_FAILURE_BACKOFF,
    ) -> None:
        if (jwks_uri is None) == (discovery_issuer is None):
            raise ValueError("set exactly one of jwks_uri and discovery_issuer")
        if not failure_backoff:
            raise ValueError("failure_backoff must not be empty")
        self.label = label
        self._jwks_uri = jwks_uri
        self._discovery_issuer = discovery_issuer
        self._fetcher = fetcher
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._timeout = timeout_seconds
        self._unknown_kid_refetch_seconds = unknown_kid_refetch_seconds
        self._min_cache_seconds = min_cache_seconds
        self._backoff = tuple(failure_backoff)

        self.generation = 0
        self._keys: keys.KeySet | None = None  # None: never had usable keys
        self._skipped: tuple[str, ...] = ()
        self._inflight: asyncio.Task[None] | None = None
        self._next_refresh_at = float("-inf")  # due at once
        self._failures = 0
        self._last_error: str | None = None
        self._last_success_at: float | None = None
        self._last_attempt_at: float | None = None
        self._unknown_kid_refetch_at: float | None = None
        self._discovered_jwks_uri: str | None = None
        self._discovered_until = float("-inf")

    @property
    def source(self) -> str:
        """The configured URL: the jwksUri, or the discovery document's."""
        if self._jwks_uri is not None:
            return self._jwks_uri
        assert self._discovery_issuer is not None
        return _discovery_url(self._discovery_issuer)

    @property
    def next_refresh_at(self) -> float:
        return self._next_refresh_at

    @property
    def refreshing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def candidates(self, kid: str | None, alg: str) -> tuple[keys.VerificationKey, ...]:
        keyset = self._keys
        if keyset is not None:
            found: tuple[keys.VerificationKey, ...] = keyset.candidates(kid, alg)
            if found:
                return found
            if kid is None or keyset.has_kid(kid) or not self._may_refetch_for_unknown_kid():
                raise errors.UnknownKey()
        elif not self.refreshing and self._clock() < self._next_refresh_at:
            raise errors.KeysUnavailable()  # backing off after a failure: fail fast
        await asyncio.wait({self.start_refresh()}, timeout=self._timeout)
        keyset = self._keys
        if keyset is None:
            raise errors.KeysUnavailable()
        return _pick(keyset, kid, alg)

    def _may_refetch_for_unknown_kid(self) -> bool:
        if self.refreshing:
            return True  # joining a fetch already under way costs nothing
        now = self._clock()
        last = self._unknown_kid_refetch_at
        if last is not None and now - last < self._unknown_kid_refetch_seconds:
            return False
        self._unknown_kid_refetch_at = now
        return True

    def status(self) -> KeyStatus:
        return KeyStatus(
            source=self.source,
            kids=self._keys.kids if self._keys is not None else (),
            ok=self._keys is not None,
            last_error=self._last_error,
            last_success_at=self._last_success_at,
            last_attempt_at=self._last_attempt_at,
            skipped=self._skipped,
        )

    async def refresh(self) -> None:
        """Fetches the keys now, or joins the fetch under way. Never raises."""
        await asyncio.wait({self.start_refresh()})

    def start_refresh(self) -> asyncio.Task[None]:
        """The fetch under way, or a new one (single-flight)."""
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._refresh_once(), name=f"lastguard-keys {self.source}"
            )
            self._inflight = task
        return task

    def cancel(self) -> asyncio.Task[None] | None:
        """Cancels the fetch under way, if any, and returns it for awaiting."""
        task = self._inflight
        if task is None or task.done():
            return None
        task.cancel()
        return task

    async def _refresh_once(self) -> None:
        self._last_attempt_at = self._clock()
        try:
            keyset, max_age = await self._fetch()
        except errors.KeyFetchError as exc:
            self._failed(str(exc))
        except Exception as exc:  # a refresh never raises: a bug here must not kill the loop
            log.exception("issuer %s: unexpected error fetching keys", self.label)
            self._failed(f"unexpected error: {type(exc).__name__}")
        else:
            self._succeeded(keyset, max_age)

    async def _fetch(self) -> tuple[keys.KeySet, int | None]:
        jwks_uri = await self._resolve_jwks_uri()
        document = await self._fetcher.get_json(jwks_uri, self._timeout)
        keyset, problems = keys.parse_jwks(document.data)
        self._skipped = tuple(problems)
        if problems:
            log.warning(
                "issuer %s: skipped %d key(s) from %s: %s",
                self.label,
                len(problems),
                jwks_uri,
                "; ".join(problems),
            )
        if not keyset.keys:
            raise errors.KeyFetchError(f"{jwks_uri}: no usable keys")
        return keyset, document.max_age

    async def _resolve_jwks_uri(self) -> str:
        if self._jwks_uri is not None:
            return self._jwks_uri
        if self._discovered_jwks_uri is not None and self._clock() < self._discovered_until:
            return self._discovered_jwks_uri
        assert self._discovery_issuer is not None
        url = _discovery_url(self._discovery_issuer)
        document = await self._fetcher.get_json(url, self._timeout)
        data = document.data
        if not isinstance(data, dict):
            raise errors.KeyFetchError(f"{url}: the discovery document is not a JSON object")
        if data.get("issuer") != self._discovery_issuer:
            raise errors.KeyFetchError(
                f"{url}: discovery issuer {_short(data.get('issuer'))} "
                f"does not match {self._discovery_issuer!r}"
            )
        jwks_uri = data.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not fields.is_http_url(jwks_uri):
            raise errors.KeyFetchError(f"{url}: jwks_uri {_short(jwks_uri)} is not an http(s) URL")
        self._discovered_jwks_uri = jwks_uri
        self._discovered_until = self._clock() + self._ttl(document.max_age)
        return jwks_uri

    def _succeeded(self, keyset: keys.KeySet, max_age: int | None) -> None:
        now = self._clock()
        previous = self._keys
        if previous is None or previous.fingerprint != keyset.fingerprint:
            self.generation += 1
            log.info(
                "issuer %s: keys from %s are now %s (generation %d)",
                self.label,
                self.source,
                ", ".join(keyset.kids) or f"{len(keyset.keys)} key(s) without kid",
                self.generation,
            )
        self._keys = keyset
        self._failures = 0
        self._last_error = None
        self._last_success_at = now
        self._next_refresh_at = now + self._ttl(max_age)
        metrics.KEY_FETCHES.labels(issuer=self.label, result="ok").inc()

    def _failed(self, message: str) -> None:
        now = self._clock()
        self._failures += 1
        delay = self._backoff[min(self._failures, len(self._backoff)) - 1]
        self._last_error = message
        self._next_refresh_at = now + delay
        metrics.KEY_FETCHES.labels(issuer=self.label, result="error").inc()
        log.warning(
            "issuer %s: key fetch failed (%d in a row): %s; %s; next try in %gs",
            self.label,
            self._failures,
            message,
            "keeping the last good keys" if self._keys is not None else "no keys yet",
            delay,
        )

    def _ttl(self, max_age: int | None) -> float:
        if max_age is None:
            return self._cache_seconds
        return min(self._cache_seconds, max(self._min_cache_seconds, max_age))


_SourceKey = tuple[object, ...]


class KeyRegistry:
    """The key sources of the loaded policies, shared where configurations agree.

    Remote sources are shared by (kind, URL, cache duration, timeout): policies
    trusting the same jwksUri share one source and one fetch schedule. Inline
    sources are shared by content. The registry does not own the fetcher: whoever
    created it closes it.
    """

    def __init__(self, fetcher: fetch.Fetcher, clock: Clock = time.monotonic) -> None:
        self._fetcher = fetcher
        self._clock = clock
        self._sources: dict[_SourceKey, KeySource] = {}
        self._by_issuer: dict[str, _SourceKey] = {}

    def source_for(self, issuer: model.Issuer) -> KeySource:
        key = _source_key(issuer)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = self._create(issuer)
        self._by_issuer[issuer.issuer] = key
        return source

    def retain(self, issuers: Iterable[model.Issuer]) -> None:
        """Forgets the sources no issuer uses any more (after a policy reload).

        A fetch under way for a dropped source finishes on its own (it is bounded
        by its timeout) so that no request waiting on it sees a cancellation.
        """
        wanted = {issuer.issuer: _source_key(issuer) for issuer in issuers}
        keep = set(wanted.values())
        self._sources = {k: s for k, s in self._sources.items() if k in keep}
        self._by_issuer = {i: k for i, k in wanted.items() if k in self._sources}

    def statuses(self) -> dict[str, KeyStatus]:
        """Status by issuer."""
        return {issuer: self._sources[key].status() for issuer, key in self._by_issuer.items()}

    def refresh_due(self) -> int:
        """Starts a refresh of every remote source that is due; returns how many started."""
        now = self._clock()
        started = 0
        for source in self._remote():
            if not source.refreshing and source.next_refresh_at <= now:
                source.start_refresh()
                started += 1
        return started

    async def run(self, poll_interval: float = 1.0) -> None:
        """Refreshes due sources every `poll_interval` seconds until cancelled."""
        while True:
            self.refresh_due()
            await asyncio.sleep(poll_interval)

    async def prefetch(self, timeout: float) -> None:
        """Refreshes every remote source now, concurrently, waiting at most `timeout`."""
        tasks = {source.start_refresh() for source in self._remote()}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def close(self) -> None:
        """Cancels the fetches under way and waits for them to end."""
        tasks = [t for t in (s.cancel() for s in self._remote()) if t is not None]
        if tasks:
            await asyncio.wait(tasks)

    def _remote(self) -> list[RemoteKeySource]:
        return [s for s in self._sources.values() if isinstance(s, RemoteKeySource)]

    def _create(self, issuer: model.Issuer) -> KeySource:
        kind = issuer.key_source
        if kind is model.KeySourceKind.INLINE_JWKS:
            assert issuer.jwks is not None
            return StaticKeySource.from_jwks(issuer.jwks, label=issuer.issuer)
        if kind is model.KeySourceKind.PUBLIC_KEYS:
            return StaticKeySource.from_public_keys(issuer.public_keys, label=issuer.issuer)
        return RemoteKeySource(
            label=issuer.issuer,
            jwks_uri=issuer.jwks_uri,
            discovery_issuer=issuer.issuer if kind is model.KeySourceKind.DISCOVERY else None,
            fetcher=self._fetcher,
            clock=self._clock,
            cache_seconds=issuer.jwks_cache_duration_seconds,
            timeout_seconds=issuer.jwks_timeout_seconds,
        )


def _source_key(issuer: model.Issuer) -> _SourceKey:
    kind = issuer.key_source
    if kind is model.KeySourceKind.INLINE_JWKS:
        return (kind, issuer.jwks)
    if kind is model.KeySourceKind.PUBLIC_KEYS:
        return (kind, issuer.public_keys)
    url = issuer.jwks_uri if kind is model.KeySourceKind.JWKS_URI else issuer.issuer
    return (kind, url, issuer.jwks_cache_duration_seconds, issuer.jwks_timeout_seconds)


def _discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def _short(value: object, limit: int = 120) -> str:
    """A remote value for an error message, bounded in length."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
