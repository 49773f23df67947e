"""What lastguard costs behind a real Envoy: `make bench` (or `python scripts/bench.py`).

Starts, all on 127.0.0.1:
- lastguard, as a real process through its CLI, with a realistic policy
  (3 issuers with inline JWKS, 13 rules, claim headers);
- a no-op ext_authz server (scripts/bench_noop.py, grpc.aio on our own proto):
  the floor any Python ext_authz server pays;
- one Envoy (`--concurrency 1`) with four listeners, each answering 200 itself
  (`direct_response`, no upstream app), after: `none` no auth filter;
  `jwt_authn` Envoy's native filter with the same issuer, keys and audience;
  `lastguard` ext_authz to lastguard; `noop` ext_authz to the no-op server.

Then runs wrk (installed with apt-get when missing) against them, every run
bounded in time: at saturation (64 connections) and paced at about 1,000
requests/s, interleaving the variants, several rounds, and prints medians, the
ratios lastguard / no-op and lastguard / jwt_authn, and the issue's targets.
Everything started is stopped on the way out, also on Ctrl-C.

Tokens for cache-miss runs are minted ahead (in parallel processes) and kept in
.bench/ with the bench issuer's keys, so later runs reuse them; each run gets a
slice of its own, so no token is sent twice in one bench. Results go to
.bench/results.json; logs (wrk, Envoy, both servers) stay in .bench/.

The cores may be shared: before each run the bench waits (bounded) for other
processes to quieten, and makes a run again when they still disturbed it; the
time this may take is capped, and what could not be avoided is reported.

Exit status: 0 when every run was valid, 1 when a sanity check or a run was
not (the table says which), 2 when the bench cannot run (no wrk), 130 on Ctrl-C.
See docs/performance.md for how to read the table.

This file holds the flags and a bench's course; its parts live in
scripts/benchkit/ (whose docstring lists them), shared with scripts/soak.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from benchkit import ROOT, config, machine, plan, processes, runner, summary, tokens, topology

from lastguard.sidecar import devissuer
from tests.support import envoy as envoy_support
from tests.support.sidecar import SidecarProcess


def parse_args(argv: list[str] | None) -> config.Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 2 s runs")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections at saturation")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads at saturation")
    parser.add_argument(
        "--miss-rate-ceiling",
        type=int,
        default=config.Settings.miss_rate_ceiling,
        help="fresh tokens set aside per second of a saturated cache-miss run",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=config.Settings.retries,
        help="runs made again when other processes disturbed them (default 1)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".bench", help="tokens, keys, logs, results"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="print the tables of an earlier run from its results.json, and exit",
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        sys.exit(summary.reprint(args.report))
    rounds, duration = (1, 2) if args.quick else (args.rounds, args.duration)
    if rounds < 1 or duration < 1 or args.threads < 1 or args.connections < args.threads:
        parser.error("rounds and duration must be >= 1, connections >= threads >= 1")
    return config.Settings(
        rounds=rounds,
        duration=duration,
        connections=args.connections,
        threads=args.threads,
        miss_rate_ceiling=args.miss_rate_ceiling,
        retries=max(0, args.retries),
        workdir=args.workdir.resolve(),
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    workdir = settings.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    wrk = machine.ensure_wrk()
    env = machine.environment(wrk)
    say(f"lastguard {env['lastguard']}; Python {env['python']}, grpcio {env['grpcio']}")
    say(f"Envoy {env['envoy']}; {env['wrk']}")

    runs, needed = plan.plan(settings)
    # Half as many again for runs made again; then one for the sanity check.
    end = {
        alg: needed[alg] + (needed[alg] // 2 if settings.retries else 0)
        for alg in tokens.ALGORITHMS
    }
    spare = runner.SpareTokens(needed, end)
    issuer = tokens.BenchIssuer(workdir / "keys")
    pools = {alg: tokens.TokenPool(workdir / "tokens", issuer, alg) for alg in tokens.ALGORITHMS}
    for alg in tokens.ALGORITHMS:
        pools[alg].ensure(end[alg] + 1, say)
    hot_tokens = {alg: issuer.mint(f"hot-{alg.lower()}", alg) for alg in tokens.ALGORITHMS}
    pool_tokens = {alg: pools[alg].line(end[alg]) for alg in tokens.ALGORITHMS}

    partner = devissuer.DevIssuer("https://partners.bench.lastguard.dev")
    jobs = devissuer.DevIssuer("https://jobs.bench.lastguard.dev")
    policy_file = workdir / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump(topology.bench_policy(issuer.jwks_json(), partner, jobs), sort_keys=False)
    )

    results: list[runner.RunResult] = []
    with ExitStack() as stack:
        sidecar = SidecarProcess(
            policy_file,
            workdir=logs / "lastguard",
            metrics=True,  # its token cache counters tell each run's hits and misses
            reload_interval=1.0,
            ready_timeout=30.0,
            extra_args=["--http-listen", f"{config.HOST}:0"],
        )
        stack.callback(sidecar.stop)
        sidecar.start()
        time.sleep(1.0)  # let start-up settle before reading the idle footprint
        idle_rss = processes.rss_mb(sidecar.pid)
        say(
            f"lastguard  127.0.0.1:{sidecar.port} gRPC, :{sidecar.http_port} HTTP "
            f"(pid {sidecar.pid}), idle RSS {idle_rss:.1f} MB"
        )

        noop = processes.NoopServer(logs / "noop.log")
        stack.callback(noop.stop)
        noop.start()
        noop_idle_rss = processes.rss_mb(noop.pid)
        say(
            f"no-op      127.0.0.1:{noop.port} gRPC, :{noop.http_port} HTTP "
            f"(pid {noop.pid}), idle RSS {noop_idle_rss:.1f} MB"
        )

        envoy = envoy_support.EnvoyProcess(
            topology.bench_listeners(
                issuer.jwks_json(),
                {
                    "lastguard": sidecar.port,
                    "lastguard_http": sidecar.http_port or 0,
                    "noop": noop.port,
                    "noop_http": noop.http_port,
                },
            ),
            workdir=logs / "envoy",
            startup_timeout=30.0,
        )
        stack.callback(envoy.stop)
        envoy.start()
        envoy_pid = processes.pid_running(envoy.config_path)
        say(
            "envoy      "
            + ", ".join(f"{name} :{port}" for name, port in sorted(envoy.ports.items()))
            + f" (pid {envoy_pid}, --concurrency 1)"
        )

        problems = runner.sanity_check(envoy, hot_tokens, pool_tokens)
        if problems:
            for problem in problems:
                print(f"sanity check failed: {problem}", file=sys.stderr)
            return 1
        say("sanity checks passed: 200 with a valid token, 401 without, 403 by rule")

        bench = runner.Bench(
            settings,
            wrk,
            envoy,
            {"lastguard": sidecar.pid, "noop": noop.pid, "envoy": envoy_pid},
            hot_tokens,
            {alg: pools[alg].path for alg in tokens.ALGORITHMS},
            metrics_port=sidecar.metrics_port or 0,
        )
        bench.wrk_log.unlink(missing_ok=True)
        runs_by_round = [[r for r in runs if r.round == n] for n in range(settings.rounds)]
        bench.disturbance_budget = settings.disturbance_budget * len(runs) * settings.duration
        for variant in plan.VARIANT_CASES:
            bench.run(plan.RunSpec(-1, variant, "hit-rs256", "saturate"), settings.warmup)
        say(
            f"warmed up; {len(runs)} runs of {settings.duration}s: {settings.rounds} rounds x "
            f"{len(runs) // settings.rounds} (saturation: {settings.threads} threads, "
            f"{settings.connections} connections; paced: {settings.paced_connections} "
            f"connections, random delays averaging {settings.paced_mean_delay_ms} ms)"
        )
        for spec in runs:
            if spec.round > 0 and spec is runs_by_round[spec.round][0]:
                bench.run(plan.RunSpec(spec.round, "lastguard", "hit-rs256", "saturate"), 2)
            result = bench.measure(spec, spare)
            results.append(result)
            server = plan.SERVER_OF.get(spec.variant)
            cpu = f", {server} CPU {result.cpu_per_1k(server):.3f} s/1k" if server else ""
            flag = "  !! " + "; ".join(result.problems) if result.problems else ""
            if result.attempts > 1:
                flag += f"  (attempt {result.attempts}: other processes were busy)"
            if result.other_cores > config.OTHER_LOAD_NOTICE:
                flag += f"  (other processes: {result.other_cores:.2f} cores)"
            say(
                f"round {spec.round + 1}/{settings.rounds} {spec.mode:8} {spec.variant:14} "
                f"{spec.case:10} {result.rps:9,.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                f"p99 {result.p99_ms:6.2f} ms{cpu}{flag}"
            )
        final_rss = processes.rss_mb(sidecar.pid)
        noop_final_rss = processes.rss_mb(noop.pid)

    rss = {
        "lastguard_idle": idle_rss,
        "lastguard_after": final_rss,
        "noop_idle": noop_idle_rss,
        "noop_after": noop_final_rss,
    }
    valid = summary.print_report(settings, results, rss)
    report: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "environment": env,
        "envoy_concurrency": 1,
        "request": {"method": "GET", "path": config.REQUEST_PATH},
        "rss_mb": rss,
        "runs": [asdict(r) for r in results],
    }
    rows = summary.summarize(results)
    items = summary.ratios(rows)
    report |= {
        "summary": [asdict(row) for row in rows],
        "ratios": items,
        "targets": summary.targets(rows, items, idle_rss),
        "elapsed_seconds": time.monotonic() - started,
    }
    results_path = workdir / "results.json"
    results_path.write_text(json.dumps(summary.no_nan(report), indent=2, default=str) + "\n")
    print()
    shown = config.shown(results_path)
    say(f"results in {shown} (print its tables again: scripts/bench.py --report {shown})")
    return 0 if valid else 1


if __name__ == "__main__":
    processes.run_script(main, "bench")
