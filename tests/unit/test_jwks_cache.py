"""Key sources and their refresh policy, with a fake clock and a fake fetcher.

The last part runs the same sources against a real JWKS server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt import algorithms as jwt_algorithms
from prometheus_client import REGISTRY

from lastguard.sidecar import errors, fetch, jwks_cache
from lastguard.sidecar.policy import model
from tests.support.issuer import TestIssuer

JWKS_URI = "https://idp.test/jwks.json"
ISSUER = "https://idp.test"
DISCOVERY_URL = "https://idp.test/.well-known/openid-configuration"

_EC_KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
_labels = itertools.count()


def jwk(index: int, kid: str) -> dict[str, Any]:
    key = jwt_algorithms.ECAlgorithm.to_jwk(_EC_KEYS[index].public_key(), as_dict=True)
    return {**key, "kid": kid}


def jwks(*kids: str) -> dict[str, Any]:
    """A JWKS of P-256 keys; kid "a" is key 0, "b" key 1, "c" key 2 (stable material)."""
    return {"keys": [jwk("abc".index(kid), kid) for kid in kids]}


def doc(data: Any, max_age: int | None = None) -> fetch.FetchedDocument:
    return fetch.FetchedDocument(data, max_age)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeFetcher:
    """Answers from `documents` (a document or an exception per URL); counts calls.

    Clearing `gate` holds every fetch in flight until it is set again.
    """

    def __init__(self, documents: dict[str, Any] | None = None) -> None:
        self.documents: dict[str, Any] = dict(documents or {})
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_json(self, url: str, timeout: float) -> fetch.FetchedDocument:
        self.calls.append(url)
        await self.gate.wait()
        answer = self.documents.get(url, errors.KeyFetchError(f"{url}: HTTP status 404"))
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, fetch.FetchedDocument)
        return answer


def remote(fetcher: FakeFetcher, clock: FakeClock, **options: Any) -> jwks_cache.RemoteKeySource:
    options.setdefault("jwks_uri", JWKS_URI)
    options.setdefault("label", f"https://idp-{next(_labels)}.test")
    return jwks_cache.RemoteKeySource(fetcher=fetcher, clock=clock, **options)


def fetch_count(label: str, result: str) -> float:
    value = REGISTRY.get_sample_value(
        "lastguard_key_fetches_total", {"issuer": label, "result": result}
    )
    return value or 0.0


async def kids_for(source: jwks_cache.KeySource, kid: str | None, alg: str = "ES256") -> list[str]:
    return [k.kid or "" for k in await source.candidates(kid, alg)]


# --- first fetch and the hot path -------------------------------------------------


async def test_first_lookup_fetches_then_answers_without_io() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a", "b"))}), FakeClock()
    source = remote(fetcher, clock)
    assert source.generation == 0 and not source.status().ok

    assert await kids_for(source, "a") == ["a"]
    assert await kids_for(source, None) == ["a", "b"]
    assert await kids_for(source, "b") == ["b"]

    assert fetcher.calls == [JWKS_URI]
    assert source.generation == 1
    assert fetch_count(source.label, "ok") == 1
    assert source.status() == jwks_cache.KeyStatus(
        source=JWKS_URI,
        kids=("a", "b"),
        ok=True,
        last_error=None,
        last_success_at=clock.now,
        last_attempt_at=clock.now,
    )


@pytest.mark.parametrize(
    ("kid", "alg"),
    [
        pytest.param("a", "ES384", id="known-kid-other-alg"),
        pytest.param(None, "RS256", id="no-kid-no-key-for-alg"),
        pytest.param("a", "HS256", id="hs256-against-ec-keys"),
    ],
)
async def test_no_key_for_alg_is_unknown_key_without_refetch(kid: str | None, alg: str) -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    source = remote(fetcher, FakeClock())
    await source.refresh()
    with pytest.raises(errors.UnknownKey):
        await source.candidates(kid, alg)
    assert fetcher.calls == [JWKS_URI]


async def test_concurrent_cold_lookups_share_one_fetch() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    fetcher.gate.clear()
    source = remote(fetcher, FakeClock())
    lookups = asyncio.gather(*(source.candidates("a", "ES256") for _ in range(20)))
    await asyncio.sleep(0)
    fetcher.gate.set()
    results = await lookups
    assert len(results) == 20 and all(r[0].kid == "a" for r in results)
    assert fetcher.calls == [JWKS_URI]


async def test_a_waiter_timing_out_does_not_cancel_the_shared_fetch() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    fetcher.gate.clear()
    source = remote(fetcher, FakeClock(), timeout_seconds=0.01)
    with pytest.raises(errors.KeysUnavailable):
        await source.candidates("a", "ES256")
    assert source.refreshing
    fetcher.gate.set()
    await source.refresh()
    assert await kids_for(source, "a") == ["a"]
    assert fetcher.calls == [JWKS_URI]


# --- never had keys -----------------------------------------------------------------


async def test_never_fetched_is_keys_unavailable_and_backs_off() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: errors.KeyFetchError("boom")}), FakeClock()
    source = remote(fetcher, clock)
    with pytest.raises(errors.KeysUnavailable):
        await source.candidates("a", "ES256")
    assert fetcher.calls == [JWKS_URI]
    status = source.status()
    assert (status.ok, status.last_error, status.last_success_at) == (False, "boom", None)

    clock.advance(0.5)  # inside the first backoff step (1 s): fail fast, no fetch
    with pytest.raises(errors.KeysUnavailable):
        await source.candidates("a", "ES256")
    assert len(fetcher.calls) == 1

    clock.advance(0.5)
    fetcher.documents[JWKS_URI] = doc(jwks("a"))
    assert await kids_for(source, "a") == ["a"]
    assert len(fetcher.calls) == 2


# --- refresh schedule -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_seconds", "max_age", "ttl"),
    [
        pytest.param(600, None, 600, id="no-cache-control-uses-configured"),
        pytest.param(600, 60, 60, id="max-age-shortens"),
        pytest.param(600, 3600, 600, id="max-age-never-lengthens"),
        pytest.param(600, 5, 30, id="max-age-bounded-below-by-min"),
        pytest.param(600, 0, 30, id="no-store-means-min"),
        pytest.param(30, 0, 30, id="configured-min"),
        pytest.param(120, 45, 45, id="between-bounds"),
    ],
)
async def test_ttl(cache_seconds: int, max_age: int | None, ttl: float) -> None:
    clock = FakeClock()
    source = remote(
        FakeFetcher({JWKS_URI: doc(jwks("a"), max_age)}), clock, cache_seconds=cache_seconds
    )
    await source.refresh()
    assert source.next_refresh_at - clock.now == ttl


async def test_refresh_is_due_at_ttl() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"), 60)}), FakeClock()
    registry = jwks_cache.KeyRegistry(fetcher, clock)
    source = registry.source_for(model.Issuer(issuer=ISSUER, jwks_uri=JWKS_URI))
    assert registry.refresh_due() == 1  # new sources are due at once
    await registry.prefetch(timeout=1)
    clock.advance(59)
    assert registry.refresh_due() == 0
    clock.advance(1)
    assert registry.refresh_due() == 1
    assert registry.refresh_due() == 0  # already under way
    assert isinstance(source, jwks_cache.RemoteKeySource)
    await source.refresh()
    assert fetcher.calls == [JWKS_URI, JWKS_URI]


async def test_failures_back_off_then_success_resets() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: errors.KeyFetchError("down")}), FakeClock()
    source = remote(fetcher, clock, failure_backoff=(1, 2, 4, 60))
    delays = []
    for _ in range(6):
        await source.refresh()
        delays.append(source.next_refresh_at - clock.now)
    assert delays == [1, 2, 4, 60, 60, 60]

    fetcher.documents[JWKS_URI] = doc(jwks("a"))
    await source.refresh()
    assert source.next_refresh_at - clock.now == 600
    fetcher.documents[JWKS_URI] = errors.KeyFetchError("down")
    await source.refresh()
    assert source.next_refresh_at - clock.now == 1


async def test_failed_refresh_keeps_last_good_keys(caplog: pytest.LogCaptureFixture) -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock()
    source = remote(fetcher, clock)
    await source.refresh()
    success_at = clock.now

    clock.advance(700)
    fetcher.documents[JWKS_URI] = errors.KeyFetchError(f"{JWKS_URI}: HTTP status 503")
    with caplog.at_level(logging.WARNING, logger="lastguard.keys"):
        await source.refresh()

    assert await kids_for(source, "a") == ["a"]
    status = source.status()
    assert status.ok and status.kids == ("a",)
    assert status.last_error == f"{JWKS_URI}: HTTP status 503"
    assert (status.last_success_at, status.last_attempt_at) == (success_at, clock.now)
    assert source.generation == 1
    assert fetch_count(source.label, "error") == 1
    assert any("keeping the last good keys" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        pytest.param(doc({"keys": []}), "no usable keys", id="empty-key-list"),
        pytest.param(
            doc({"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}),
            "no usable keys",
            id="only-unusable-keys",
        ),
        pytest.param(doc({"not": "a jwks"}), '"keys" list', id="not-a-jwks"),
        pytest.param(RuntimeError("bug"), "unexpected error: RuntimeError", id="unexpected-error"),
    ],
)
async def test_bad_documents_are_failures_that_keep_keys(answer: Any, error: str) -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock()
    source = remote(fetcher, clock)
    await source.refresh()
    fetcher.documents[JWKS_URI] = answer
    await source.refresh()  # never raises
    status = source.status()
    assert status.ok and error in (status.last_error or "")
    assert await kids_for(source, "a") == ["a"]


async def test_skipped_keys_are_logged_once_per_fetch(caplog: pytest.LogCaptureFixture) -> None:
    document = jwks("a")
    document["keys"].append({"kty": "oct", "kid": "s", "k": "c2VjcmV0"})
    source = remote(FakeFetcher({JWKS_URI: doc(document)}), FakeClock())
    with caplog.at_level(logging.WARNING, logger="lastguard.keys"):
        await source.refresh()
        await source.refresh()
    skipped = [r for r in caplog.records if "skipped 1 key(s)" in r.getMessage()]
    assert len(skipped) == 2 and all(r.levelno == logging.WARNING for r in skipped)
    assert source.status().skipped == ("keys[1] (kid 's'): symmetric keys are not supported",)


# --- unknown kids --------------------------------------------------------------------


async def test_unknown_kid_refetches_at_most_once_per_interval() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock()
    source = remote(fetcher, clock, unknown_kid_refetch_seconds=30)
    await source.refresh()

    with pytest.raises(errors.UnknownKey):
        await source.candidates("x", "ES256")
    assert len(fetcher.calls) == 2
    clock.advance(29)
    with pytest.raises(errors.UnknownKey):
        await source.candidates("y", "ES256")
    assert len(fetcher.calls) == 2  # rate limited: no fetch
    clock.advance(1)
    with pytest.raises(errors.UnknownKey):
        await source.candidates("x", "ES256")
    assert len(fetcher.calls) == 3


async def test_unknown_kid_finds_a_rotated_key() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock()
    source = remote(fetcher, clock)
    await source.refresh()
    fetcher.documents[JWKS_URI] = doc(jwks("a", "b"))
    assert await kids_for(source, "b") == ["b"]
    assert source.generation == 2


async def test_concurrent_unknown_kid_lookups_share_one_fetch() -> None:
    fetcher, clock = FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock()
    source = remote(fetcher, clock)
    await source.refresh()
    fetcher.documents[JWKS_URI] = doc(jwks("a", "b"))
    fetcher.gate.clear()
    lookups = asyncio.gather(*(source.candidates("b", "ES256") for _ in range(20)))
    await asyncio.sleep(0)
    fetcher.gate.set()
    assert all(found[0].kid == "b" for found in await lookups)
    assert len(fetcher.calls) == 2


# --- generation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "generation"),
    [
        pytest.param(jwks("a", "b"), 1, id="same-keys"),
        pytest.param(jwks("b", "a"), 1, id="same-keys-reordered"),
        pytest.param(jwks("a"), 2, id="key-removed"),
        pytest.param(jwks("a", "b", "c"), 2, id="key-added"),
        pytest.param({"keys": [jwk(2, "a"), jwk(1, "b")]}, 2, id="material-replaced"),
    ],
)
async def test_generation_changes_only_with_key_material(
    second: dict[str, Any], generation: int
) -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a", "b"))})
    source = remote(fetcher, FakeClock())
    await source.refresh()
    fetcher.documents[JWKS_URI] = doc(second)
    await source.refresh()
    assert source.generation == generation


async def test_removed_key_stops_verifying() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a", "b"))})
    source = remote(fetcher, FakeClock())
    await source.refresh()
    fetcher.documents[JWKS_URI] = doc(jwks("b"))
    await source.refresh()
    with pytest.raises(errors.UnknownKey):
        await source.candidates("a", "ES256")


# --- OIDC discovery -------------------------------------------------------------------


def discovery(**members: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "jwks_uri": JWKS_URI, **members}


async def test_discovery_then_jwks_and_discovery_is_cached() -> None:
    fetcher, clock = FakeFetcher(), FakeClock()
    fetcher.documents = {DISCOVERY_URL: doc(discovery(), 600), JWKS_URI: doc(jwks("a"), 60)}
    source = remote(fetcher, clock, jwks_uri=None, discovery_issuer=ISSUER + "/")
    fetcher.documents[DISCOVERY_URL] = doc(discovery(issuer=ISSUER + "/"), 600)
    assert await kids_for(source, "a") == ["a"]
    assert fetcher.calls == [DISCOVERY_URL, JWKS_URI]
    assert source.status().source == DISCOVERY_URL

    clock.advance(60)
    await source.refresh()
    assert fetcher.calls == [DISCOVERY_URL, JWKS_URI, JWKS_URI]
    clock.advance(540)
    await source.refresh()
    assert fetcher.calls[3:] == [DISCOVERY_URL, JWKS_URI]


@pytest.mark.parametrize(
    ("document", "error"),
    [
        pytest.param(discovery(issuer="https://evil.test"), "does not match", id="issuer-mismatch"),
        pytest.param(
            discovery(issuer=ISSUER + "/"), "does not match", id="issuer-trailing-slash-differs"
        ),
        pytest.param(discovery(issuer=None), "does not match", id="issuer-missing"),
        pytest.param(discovery(jwks_uri="ftp://idp.test/k"), "not an http(s) URL", id="ftp"),
        pytest.param(discovery(jwks_uri="/jwks.json"), "not an http(s) URL", id="relative"),
        pytest.param(discovery(jwks_uri=None), "not an http(s) URL", id="jwks-uri-missing"),
        # Held to the policy's own jwksUri rule (policy.fields), not a looser one.
        pytest.param(
            discovery(jwks_uri="https://idp.test:99999/k"), "not an http(s) URL", id="bad-port"
        ),
        pytest.param(
            discovery(jwks_uri="https://idp.test/k s"), "not an http(s) URL", id="space-in-url"
        ),
    ],
)
async def test_bad_discovery_documents(document: dict[str, Any], error: str) -> None:
    fetcher = FakeFetcher({DISCOVERY_URL: doc(document), JWKS_URI: doc(jwks("a"))})
    source = remote(fetcher, FakeClock(), jwks_uri=None, discovery_issuer=ISSUER)
    with pytest.raises(errors.KeysUnavailable):
        await source.candidates("a", "ES256")
    status = source.status()
    assert not status.ok and error in (status.last_error or "")
    assert fetcher.calls == [DISCOVERY_URL]


def test_exactly_one_of_jwks_uri_and_discovery() -> None:
    with pytest.raises(ValueError):
        jwks_cache.RemoteKeySource(label="x", fetcher=FakeFetcher())
    with pytest.raises(ValueError):
        jwks_cache.RemoteKeySource(
            label="x", jwks_uri=JWKS_URI, discovery_issuer=ISSUER, fetcher=FakeFetcher()
        )


# --- inline keys ----------------------------------------------------------------------


async def test_static_jwks_source() -> None:
    source = jwks_cache.StaticKeySource.from_jwks(json.dumps(jwks("a", "b")), label=ISSUER)
    assert await kids_for(source, "b") == ["b"]
    assert source.generation == 1
    with pytest.raises(errors.UnknownKey):
        await source.candidates("zzz", "ES256")
    status = source.status()
    assert (status.source, status.kids, status.ok, status.last_error) == (
        "inline",
        ("a", "b"),
        True,
        None,
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("{not json", "not a JWKS document", id="invalid-json"),
        pytest.param("[]", "not a JWKS document", id="not-an-object"),
        pytest.param('{"keys": [{"kty": "oct", "k": "eA"}]}', "symmetric", id="only-bad-keys"),
    ],
)
async def test_static_source_without_usable_keys(text: str, error: str) -> None:
    source = jwks_cache.StaticKeySource.from_jwks(text, label=ISSUER)
    with pytest.raises(errors.KeysUnavailable):
        await source.candidates(None, "ES256")
    status = source.status()
    assert not status.ok and "no usable keys" in (status.last_error or "")
    assert error in (status.last_error or "")


async def test_static_public_keys_source() -> None:
    pem = (
        _EC_KEYS[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    source = jwks_cache.StaticKeySource.from_public_keys([("pem-1", pem)], label=ISSUER)
    assert await kids_for(source, "pem-1") == ["pem-1"]


# --- registry -----------------------------------------------------------------------------

OTHER_URI = "https://other.test/jwks.json"


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks_uri=JWKS_URI),
            model.Issuer(issuer="https://b.test", jwks_uri=JWKS_URI),
            True,
            id="same-jwks-uri",
        ),
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks_uri=JWKS_URI),
            model.Issuer(issuer="https://a.test", jwks_uri=OTHER_URI),
            False,
            id="other-jwks-uri",
        ),
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks_uri=JWKS_URI),
            model.Issuer(
                issuer="https://a.test", jwks_uri=JWKS_URI, jwks_cache_duration_seconds=60
            ),
            False,
            id="other-cache-duration",
        ),
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks_uri=JWKS_URI),
            model.Issuer(issuer="https://a.test", jwks_uri=JWKS_URI, jwks_timeout_seconds=1),
            False,
            id="other-timeout",
        ),
        pytest.param(
            model.Issuer(issuer=ISSUER),
            model.Issuer(issuer=ISSUER),
            True,
            id="same-discovery-issuer",
        ),
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks=json.dumps(jwks("a"))),
            model.Issuer(issuer="https://b.test", jwks=json.dumps(jwks("a"))),
            True,
            id="same-inline-jwks",
        ),
        pytest.param(
            model.Issuer(issuer="https://a.test", jwks=json.dumps(jwks("a"))),
            model.Issuer(issuer="https://a.test", jwks=json.dumps(jwks("b"))),
            False,
            id="other-inline-jwks",
        ),
    ],
)
def test_registry_shares_sources(first: model.Issuer, second: model.Issuer, shared: bool) -> None:
    registry = jwks_cache.KeyRegistry(FakeFetcher(), FakeClock())
    assert (registry.source_for(first) is registry.source_for(second)) is shared


async def test_registry_kinds_and_statuses() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a")), OTHER_URI: errors.KeyFetchError("nope")})
    registry = jwks_cache.KeyRegistry(fetcher, FakeClock())
    issuers = [
        model.Issuer(issuer="https://remote.test", jwks_uri=JWKS_URI),
        model.Issuer(issuer="https://broken.test", jwks_uri=OTHER_URI),
        model.Issuer(issuer="https://inline.test", jwks=json.dumps(jwks("b"))),
    ]
    sources = [registry.source_for(i) for i in issuers]
    assert [type(s).__name__ for s in sources] == [
        "RemoteKeySource",
        "RemoteKeySource",
        "StaticKeySource",
    ]
    await registry.prefetch(timeout=1)
    assert sorted(fetcher.calls) == [JWKS_URI, OTHER_URI]
    statuses = registry.statuses()
    assert {issuer: (s.ok, s.kids) for issuer, s in statuses.items()} == {
        "https://remote.test": (True, ("a",)),
        "https://broken.test": (False, ()),
        "https://inline.test": (True, ("b",)),
    }


async def test_registry_retain_drops_unused_sources() -> None:
    registry = jwks_cache.KeyRegistry(FakeFetcher({JWKS_URI: doc(jwks("a"))}), FakeClock())
    kept = model.Issuer(issuer="https://kept.test", jwks_uri=JWKS_URI)
    dropped = model.Issuer(issuer="https://dropped.test", jwks_uri=OTHER_URI)
    kept_source = registry.source_for(kept)
    dropped_source = registry.source_for(dropped)
    registry.retain([kept])
    assert set(registry.statuses()) == {"https://kept.test"}
    assert registry.source_for(kept) is kept_source
    assert registry.source_for(dropped) is not dropped_source
    assert registry.refresh_due() == 2  # only the sources the registry still has


async def test_registry_run_refreshes_until_cancelled() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    registry = jwks_cache.KeyRegistry(fetcher, FakeClock())
    source = registry.source_for(model.Issuer(issuer=ISSUER, jwks_uri=JWKS_URI))
    loop_task = asyncio.create_task(registry.run(poll_interval=0))
    for _ in range(10):
        await asyncio.sleep(0)
    assert await kids_for(source, "a") == ["a"]
    assert fetcher.calls == [JWKS_URI]  # fetched by the loop, not by the lookup
    loop_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop_task


async def test_registry_close_cancels_fetches_under_way() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    fetcher.gate.clear()
    registry = jwks_cache.KeyRegistry(fetcher, FakeClock())
    source = registry.source_for(model.Issuer(issuer=ISSUER, jwks_uri=JWKS_URI))
    assert registry.refresh_due() == 1
    await asyncio.sleep(0)
    await registry.close()
    assert isinstance(source, jwks_cache.RemoteKeySource) and not source.refreshing


async def test_prefetch_is_bounded() -> None:
    fetcher = FakeFetcher({JWKS_URI: doc(jwks("a"))})
    fetcher.gate.clear()
    registry = jwks_cache.KeyRegistry(fetcher, FakeClock())
    registry.source_for(model.Issuer(issuer=ISSUER, jwks_uri=JWKS_URI))
    await registry.prefetch(timeout=0.01)  # returns although the fetch is held
    fetcher.gate.set()
    await registry.close()


# --- against a real JWKS server ---------------------------------------------------------


async def test_real_server_cache_control_outage_and_rotation() -> None:
    async with TestIssuer() as iss:
        http = fetch.HttpFetcher()
        clock = FakeClock()
        source = jwks_cache.RemoteKeySource(
            label=iss.issuer, jwks_uri=iss.jwks_uri, fetcher=http, clock=clock
        )
        try:
            iss.set_cache_control("max-age=120")
            assert [k.kid for k in await source.candidates("rsa-1", "RS256")] == ["rsa-1"]
            assert source.next_refresh_at - clock.now == 120

            iss.set_down(True)
            await source.refresh()
            assert source.status().ok and "HTTP status 503" in (source.status().last_error or "")
            assert [k.kid for k in await source.candidates("ec-1", "ES256")] == ["ec-1"]

            await iss.stop_listening()
            await source.refresh()
            assert "cannot connect" in (source.status().last_error or "")
            await iss.resume_listening()
            iss.set_down(False)

            new_kid = iss.rotate("RS256")
            clock.advance(30)
            assert [k.kid for k in await source.candidates(new_kid, "RS256")] == [new_kid]
            assert source.status().last_error is None
            assert iss.hits["/jwks.json"] == 3  # the refused attempt never arrived
        finally:
            await http.close()


async def test_real_server_discovery_and_timeout() -> None:
    async with TestIssuer() as iss:
        http = fetch.HttpFetcher()
        try:
            source = jwks_cache.RemoteKeySource(
                label=iss.issuer, discovery_issuer=iss.issuer, fetcher=http, timeout_seconds=2
            )
            assert [k.kid for k in await source.candidates(None, "EdDSA")] == ["ed-1"]
            assert iss.hits["/.well-known/openid-configuration"] == 1

            iss.delay = 5
            slow = jwks_cache.RemoteKeySource(
                label=iss.issuer, jwks_uri=iss.jwks_uri, fetcher=http, timeout_seconds=0.1
            )
            with pytest.raises(errors.KeysUnavailable):
                await slow.candidates("rsa-1", "RS256")
            await slow.refresh()
            assert "timed out" in (slow.status().last_error or "")
        finally:
            await http.close()
