"""Does lastguard's memory stay flat under steady load? `make soak` (or `python scripts/soak.py`).

Two answers from one lastguard process behind one Envoy, all on 127.0.0.1, built
from the bench's parts in scripts/benchkit/ (its policy, its `lastguard`
listener, its token pool and wrk scripts, its /proc readings; see
docs/performance.md):

1. **RSS after N distinct tokens** (`--fill-tokens`, default 100,000): lastguard's
   resident memory idle, then after N never-seen tokens were sent once each
   through Envoy at saturation (bench's `miss-rs256` requests, in wrk runs of at
   most 10 s), with lastguard's own counters confirming about N cache misses.
2. **Soak** (`--minutes`, default 10): bench's `mix-rs256` requests (9 in 10 carry
   one hot token, 1 in 10 a token never sent before) at about 1,000 requests/s
   (bench's paced mode), as consecutive wrk runs of `--slice-seconds` (30). After
   each: requests, non-2xx answers, socket errors, p99, lastguard's CPU and RSS.

The soak starts with the token cache full. The cache keeps a verified token
until its `exp` (30 days for the pool's tokens) or until one of its bounds evicts
the least recently used entry: `--token-cache-entries` (100,000) or
`--token-cache-mib` (64 MiB, about 16,000 of these tokens at the ~4.2 KB each
the cache accounts for them). The soak adds about 90 fresh tokens a second, so
on an empty cache it would grow for about three minutes (some 65 MB) before the
byte bound applies: expected growth that would look like a leak, or hide one.
So before the soak lastguard verifies at least as many distinct tokens as the
entry bound (the default fill does exactly that; a smaller one is topped up,
unmeasured). Then whichever bound applies is reached, every fresh token of the
soak evicts one entry, the cache's size is constant from the first slice on, and
the expected RSS curve is flat.

Verdict: "no growth" when the highest RSS over the last third of the slices is at
most max(3 MB, 5%) above the RSS after the first slice. Not less: without any
leak, RSS moves by a few MB between samples (CPython's allocator returns a 1 MiB
arena only when all of it is free, glibc's per-thread arenas of gRPC's threads,
connection buffers), and a sample is one instant. Not more: 5% of a ~130 MB
baseline is ~6.5 MB, which the ~360,000 requests between the first slice and the
last third exceed with a leak of 20 bytes per request; a cache that failed to
evict (~4 KB per fresh token, ~20 MB a minute) is caught at once.

Exit status: 0 when RSS did not grow and every run was valid (all 2xx, no socket
error, no token sent twice, the expected cache hits), 1 when RSS grew or a run
was invalid, 2 when the soak cannot run (no wrk, a failed sanity check, a fill
that stalls), 130 on Ctrl-C or SIGTERM.
Everything started is stopped on every way out. Results go to .bench/soak.json,
logs and wrk's output to .bench/soak/. The fresh tokens are minted into a pool of
the soak's own, .bench/soak-tokens/ (half a minute, the first time), with bench's
keys: bench's pool is left alone, since a bench running meanwhile may be growing it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from benchkit import (  # importing it puts the repository on sys.path, for tests.support
    ROOT,
    config,
    machine,
    plan,
    processes,
    runner,
    soak_outcome,
    soak_runs,
    summary,
    tokens,
    topology,
)

from lastguard.sidecar import devissuer
from tests.support import envoy as envoy_support
from tests.support.sidecar import SidecarProcess


def sanity_check(envoy: envoy_support.EnvoyProcess, hot: str, fresh: str) -> list[str]:
    """lastguard's listener allows the hot and a pool token and denies no token."""
    problems = []
    checks = [("the hot token", hot, 200), ("a pool token", fresh, 200), ("no token", "", 401)]
    for what, token, expected in checks:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = envoy.request("GET", config.REQUEST_PATH, headers, listener="lastguard")
        if response.status != expected:
            problems.append(f"{what}: {response.status}, not {expected}: {response.text[:200]}")
    return problems


def measure(
    settings: soak_runs.SoakSettings,
    wrk: str,
    issuer: tokens.BenchIssuer,
    pool: tokens.TokenPool,
    pool_end: int,
    say: Callable[[str], None],
) -> soak_outcome.Outcome:
    """Starts lastguard and Envoy, fills, soaks; stops both on every way out."""
    logs = settings.logdir
    partner = devissuer.DevIssuer("https://partners.bench.lastguard.dev")
    jobs = devissuer.DevIssuer("https://jobs.bench.lastguard.dev")
    policy_file = logs / "policy.yaml"
    policy = topology.bench_policy(issuer.jwks_json(), partner, jobs)
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    hot_token = issuer.mint(f"hot-{soak_runs.ALG.lower()}", soak_runs.ALG)
    runs = config.Settings(threads=1, workdir=logs)
    with ExitStack() as stack:
        sidecar = SidecarProcess(
            policy_file,
            workdir=logs / "lastguard",
            metrics=True,  # its token cache counters
            reload_interval=1.0,
            ready_timeout=30.0,
            extra_args=settings.sidecar_args(),
        )
        stack.callback(sidecar.stop)
        sidecar.start()
        time.sleep(1.0)  # let start-up settle before reading the idle footprint
        outcome = soak_outcome.Outcome(idle_rss_mb=processes.rss_mb(sidecar.pid))
        say(
            f"lastguard  127.0.0.1:{sidecar.port} (pid {sidecar.pid}), "
            f"idle RSS {outcome.idle_rss_mb:.1f} MB"
        )
        envoy = envoy_support.EnvoyProcess(
            [topology.authz_listener("lastguard", sidecar.port)],
            workdir=logs / "envoy",
            startup_timeout=30.0,
        )
        stack.callback(envoy.stop)
        envoy.start()
        envoy_pid = processes.pid_running(envoy.config_path)
        say(f"envoy      lastguard :{envoy.port('lastguard')} (pid {envoy_pid}, --concurrency 1)")
        failed = sanity_check(envoy, hot_token, pool.line(pool_end))  # a line no run takes
        if failed:
            raise config.BenchError("sanity check failed: " + "; ".join(failed))

        bench = runner.Bench(
            runs,
            wrk,
            envoy,
            {"lastguard": sidecar.pid, "envoy": envoy_pid},
            {soak_runs.ALG: hot_token},
            {soak_runs.ALG: pool.path},
            metrics_port=sidecar.metrics_port or 0,
        )
        bench.wrk_log.unlink(missing_ok=True)
        lines = soak_runs.PoolLines(pool_end)
        entries, _ = settings.cache_bounds()
        if settings.fill_tokens:
            say(f"fill: {settings.fill_tokens:,} distinct tokens, once each, at saturation")
            outcome.fill = soak_runs.fill(bench, lines, settings.fill_tokens, say)
            say(
                f"fill: lastguard counted {outcome.fill.lastguard_misses:,.0f} cache misses; "
                f"RSS {outcome.idle_rss_mb:.1f} MB idle, {outcome.fill.rss_after_mb:.1f} MB after"
            )
        top_up = max(0, entries - settings.fill_tokens)
        if settings.minutes and top_up:
            say(f"top-up: {top_up:,} more distinct tokens, so the token cache is at its bound")
            outcome.top_up = soak_runs.fill(bench, lines, top_up, say)
        if settings.minutes:
            say(
                f"soak: {settings.slices} slices of {settings.slice_seconds}s of "
                f"{soak_runs.SOAK_CASE} ({plan.CASES[soak_runs.SOAK_CASE].title}) at about "
                f"{runs.paced_rate:,}/s"
            )
            outcome.soak_started_at = time.time()
            outcome.samples = soak_runs.soak(bench, lines, settings, say)
    outcome.full_collections = full_collections(sidecar.log_path)
    return outcome


def full_collections(log_path: Path) -> list[dict[str, Any]]:
    """lastguard's log records of its scheduled full garbage collections."""
    records = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "scheduled full garbage collection":
            records.append(record)
    return records


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> soak_runs.SoakSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes", type=float, default=10.0, help="soak length (default 10; 0: no soak)"
    )
    parser.add_argument(
        "--slice-seconds", type=int, default=30, help="one wrk run, one sample (default 30)"
    )
    parser.add_argument(
        "--fill-tokens",
        type=int,
        default=100_000,
        help="distinct tokens sent before the soak, RSS before and after (default 100000; 0: none)",
    )
    parser.add_argument(
        "--token-cache-entries", type=int, help="passed to the sidecar (default: its own)"
    )
    parser.add_argument(
        "--token-cache-mib", type=int, help="passed to the sidecar (default: its own)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / ".bench",
        help="keys, soak-tokens, soak.json, soak/",
    )
    args = parser.parse_args(argv)
    settings = soak_runs.SoakSettings(
        minutes=args.minutes,
        slice_seconds=args.slice_seconds,
        fill_tokens=args.fill_tokens,
        cache_entries=args.token_cache_entries,
        cache_mib=args.token_cache_mib,
        workdir=args.workdir.resolve(),
    )
    if settings.slice_seconds < 1 or settings.fill_tokens < 0 or settings.minutes < 0:
        parser.error("--slice-seconds must be >= 1, --minutes and --fill-tokens >= 0")
    if settings.minutes and settings.slices < 2:
        parser.error("a soak needs at least two slices (--minutes 0 for none)")
    if not settings.minutes and not settings.fill_tokens:
        parser.error("nothing to do: --minutes 0 and --fill-tokens 0")
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    # A new log directory: the sidecar's port is read from its log, which a rerun appends to.
    shutil.rmtree(settings.logdir, ignore_errors=True)
    settings.logdir.mkdir(parents=True)
    wrk = machine.ensure_wrk()
    env = machine.environment(wrk)
    say(f"lastguard {env['lastguard']}; Envoy {env['envoy']}; {env['wrk']}")
    entries, mib = settings.cache_bounds()
    say(f"lastguard's token cache bounds: {entries:,} entries, {mib} MiB")

    top_up = max(0, entries - settings.fill_tokens) if settings.minutes else 0
    pool_end = soak_runs.pool_lines_needed(settings, config.Settings(threads=1), top_up)
    issuer = tokens.BenchIssuer(settings.workdir / "keys")
    pool = tokens.TokenPool(settings.pooldir, issuer, soak_runs.ALG)
    pool.ensure(pool_end + 1, say)

    outcome = measure(settings, wrk, issuer, pool, pool_end, say)
    soak_outcome.print_report(settings, outcome)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "token_cache": {"entries": entries, "mib": mib},
        "environment": env,
        "request": {"method": "GET", "path": config.REQUEST_PATH},
        **outcome.as_dict(),
        "elapsed_seconds": time.monotonic() - started,
    }
    results = settings.workdir / "soak.json"
    results.write_text(json.dumps(summary.no_nan(report), indent=2, default=str) + "\n")
    print()
    say(f"results in {results}")
    verdict = outcome.verdict
    return 1 if outcome.problems or (verdict and verdict.grew) else 0


if __name__ == "__main__":
    processes.run_script(main, "soak")
