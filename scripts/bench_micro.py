"""In-process micro benchmark of the Check handler: microseconds per decision.

No network and no Envoy: the gRPC servicer's `Check` is awaited directly with
prebuilt CheckRequests, so the numbers are lastguard's own cost per decision
(policy lookup, rule match, token extraction, cache or verification, response
building, metrics). Cases: cache hit (one token), cache miss (a fresh
pre-minted token per call, RS256 and ES256), denial (no token), and an
allowed request on an `Allow` path (no token work at all).

    python scripts/bench_micro.py            # table
    python scripts/bench_micro.py --profile  # also writes .bench/profile-<case>.pstats
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".bench"

from lastguard.proto.envoy.service.auth.v3 import external_auth_pb2 as pb  # noqa: E402
from lastguard.sidecar.authenticator import Authenticator  # noqa: E402
from lastguard.sidecar.authorizer import Authorizer  # noqa: E402
from lastguard.sidecar.compile import compile_policy  # noqa: E402
from lastguard.sidecar.devissuer import DevIssuer  # noqa: E402
from lastguard.sidecar.jwks_cache import StaticKeySource  # noqa: E402
from lastguard.sidecar.policy.parse import parse_policy  # noqa: E402
from lastguard.sidecar.recording import CheckRecorder  # noqa: E402
from lastguard.sidecar.server import AuthorizationService  # noqa: E402

ISSUERS = ("https://a.idp.example", "https://b.idp.example", "https://c.idp.example")


def realistic_policy(issuers: Sequence[DevIssuer]) -> dict[str, Any]:
    """Three issuers with inline keys and a dozen rules, like a real API's policy."""
    return {
        "apiVersion": "lastguard.dev/v1alpha1",
        "kind": "JWTPolicy",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "issuers": [
                {
                    "issuer": dev.url,
                    "jwks": json.dumps(dev.jwks()),
                    "audiences": ["api"],
                    "outputClaimToHeaders": [
                        {"header": "x-user", "claim": "sub"},
                        {"header": "x-scope", "claim": "scope"},
                    ],
                }
                for dev in issuers
            ],
            "rules": [
                {"paths": ["/healthz", "/readyz"], "action": "Allow"},
                {"paths": ["/metrics"], "action": "Allow"},
                {"paths": ["/admin/*"], "action": "Deny"},
                {"paths": ["/public/*"], "action": "Optional"},
                {"paths": ["/api/orders/*"], "methods": ["GET"], "requiredScopes": ["read"]},
                {
                    "paths": ["/api/orders/*"],
                    "methods": ["POST", "PUT"],
                    "requiredScopes": ["write"],
                },
                {"paths": ["/api/orders/*"], "methods": ["DELETE"], "requiredScopes": ["admin"]},
                {"paths": ["/api/users/*"], "methods": ["GET"], "requiredScopes": ["read"]},
                {"paths": ["/api/users/*"], "requiredScopes": ["write"]},
                {
                    "paths": ["/api/reports/*"],
                    "requiredClaims": [{"claim": "groups", "values": ["finance"]}],
                },
                {"paths": ["/api/search"], "methods": ["GET"]},
                {"paths": ["/api/*"], "methods": ["GET"], "requiredScopes": ["read"]},
            ],
        },
    }


def build_service() -> tuple[AuthorizationService, DevIssuer]:
    issuers = [DevIssuer(url) for url in ISSUERS]
    policy = parse_policy(realistic_policy(issuers))
    authorizer = Authorizer(Authenticator())
    authorizer.install(
        compile_policy(policy, lambda i: StaticKeySource.from_jwks(i.jwks or "", label=i.issuer))
    )
    return AuthorizationService(authorizer, "lastguard", CheckRecorder()), issuers[-1]


def check_request(path: str, token: str | None, method: str = "GET") -> pb.CheckRequest:
    request = pb.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, "api.example", "http"
    headers = {
        ":authority": "api.example",
        ":method": method,
        ":path": path,
        "user-agent": "wrk",
        "accept": "*/*",
        "x-request-id": "0b5a4b9e-5a3b-4d0c-9f6e-0a1b2c3d4e5f",
    }
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    http.headers.update(headers)
    return request


def mint_many(dev: DevIssuer, count: int, alg: str) -> list[str]:
    return [
        dev.mint({"sub": f"user-{i}", "scope": "read"}, alg=alg, audience="api", lifetime=3600)
        for i in range(count)
    ]


async def run(service: AuthorizationService, requests: Sequence[pb.CheckRequest]) -> float:
    """Microseconds per Check over `requests`, awaited one after another."""
    check = service.Check
    start = time.perf_counter()
    for request in requests:
        await check(request, None)
    return (time.perf_counter() - start) / len(requests) * 1e6


async def noop(requests: Sequence[pb.CheckRequest]) -> float:
    """The floor: an async handler that returns a prebuilt OK response."""
    ok = pb.CheckResponse()

    async def check(request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        return ok

    start = time.perf_counter()
    for request in requests:
        await check(request, None)
    return (time.perf_counter() - start) / len(requests) * 1e6


#: The HTTP status each case must produce; a benchmark of the wrong outcome is worthless.
EXPECTED = {
    "allow-rule (no token)": 200,
    "cache hit": 200,
    "cache miss RS256": 200,
    "cache miss ES256": 200,
    "deny (no token)": 401,
    "deny (expired)": 401,
}


def status_of(wire: bytes) -> int:
    response = pb.CheckResponse.FromString(wire)
    return 200 if response.HasField("ok_response") else int(response.denied_response.status.code)


def sanity_check(
    service: AuthorizationService,
    table: dict[str, Callable[[], list[pb.CheckRequest]]],
    loop: asyncio.AbstractEventLoop,
) -> None:
    for name, make in table.items():
        got = status_of(loop.run_until_complete(service.Check(make()[0], None)))
        if got != EXPECTED[name]:
            raise SystemExit(
                f"bench_micro: case {name!r} answered {got}, expected {EXPECTED[name]}"
            )
    service.authorizer.authenticator.cache.clear()


def cases(
    service: AuthorizationService, dev: DevIssuer, n: int
) -> dict[str, Callable[[], list[pb.CheckRequest]]]:
    hot = dev.mint({"sub": "alice", "scope": "read"}, audience="api", lifetime=3600)
    hot_request = check_request("/api/orders/42", hot)
    print(f"minting {2 * n} tokens for the cache-miss cases...", file=sys.stderr)
    rs = [check_request("/api/orders/42", t) for t in mint_many(dev, n, "RS256")]
    es = [check_request("/api/orders/42", t) for t in mint_many(dev, n, "ES256")]
    return {
        "allow-rule (no token)": lambda: [check_request("/healthz", None)] * n,
        "cache hit": lambda: [hot_request] * n,
        "cache miss RS256": lambda: rs,
        "cache miss ES256": lambda: es,
        "deny (no token)": lambda: [check_request("/api/orders/42", None)] * n,
        "deny (expired)": lambda: (
            [
                check_request(
                    "/api/orders/42", dev.mint({"sub": "a"}, audience="api", lifetime=-3600)
                )
            ]
            * n
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", type=int, default=3000, help="calls per case (and tokens per miss case)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="write .bench/profile-<case>.pstats")
    args = parser.parse_args(argv)

    service, dev = build_service()
    table = cases(service, dev, args.n)
    results: dict[str, list[float]] = {name: [] for name in ["no-op handler", *table]}
    loop = asyncio.new_event_loop()
    sanity_check(service, table, loop)
    for round_ in range(args.rounds):
        results["no-op handler"].append(loop.run_until_complete(noop(table["cache hit"]())))
        for name, make in table.items():
            if name.startswith("cache miss"):
                service.authorizer.authenticator.cache.clear()
            results[name].append(loop.run_until_complete(run(service, make())))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    floor = statistics.median(results["no-op handler"])
    print(f"\n{'case':<24} {'us/decision':>12} {'x no-op handler':>16}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<24} {median:>12.1f} {median / floor:>16.1f}")

    if args.profile:
        OUT.mkdir(exist_ok=True)
        for name in ("cache hit", "cache miss RS256", "deny (no token)"):
            if name.startswith("cache miss"):
                service.authorizer.authenticator.cache.clear()
            requests = table[name]()
            profiler = cProfile.Profile()
            profiler.enable()
            loop.run_until_complete(run(service, requests))
            profiler.disable()
            path = OUT / f"profile-{name.split()[0]}-{name.split()[-1].strip('()')}.pstats"
            profiler.dump_stats(path)
            print(f"\n== {name}: {path} (open with `python -m pstats` or snakeviz)")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
