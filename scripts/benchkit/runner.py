"""Runs of wrk through Envoy, and what each one measured.

`Bench` holds the running servers; `run` is one bounded wrk run (its latency
and request counts from wrk's scripts in scripts/bench_wrk/, CPU of every
process from /proc, lastguard's token cache counters), and `measure` repeats
a run while other processes disturb it, within a time budget. `sanity_check`
proves each listener answers as its variant must before anything is measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import ROOT, config, plan, processes, tokens
from tests.support import envoy as envoy_support

WRK_SCRIPTS = ROOT / "scripts" / "bench_wrk"
#: After wrk exits: time for the checks still queued to finish before CPU is read.
SETTLE_SECONDS = 0.25


@dataclass
class RunResult:
    spec: plan.RunSpec
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: int
    reused_tokens: int
    #: CPU seconds spent during the run, per process: lastguard, noop, envoy.
    cpu: dict[str, float] = field(default_factory=dict)
    #: Cores busy with processes that are not part of the bench, on average over the run.
    other_cores: float = 0.0
    #: How many times the run was made (more than 1: earlier attempts shared the machine).
    attempts: int = 1
    #: lastguard's token cache lookups during the run (lastguard runs only).
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def cache_hit_share(self) -> float:
        lookups = self.cache_hits + self.cache_misses
        return self.cache_hits / lookups if lookups else math.nan

    def cpu_per_1k(self, process: str) -> float:
        return self.cpu[process] / self.requests * 1000 if self.requests else math.nan

    @property
    def problems(self) -> list[str]:
        case = plan.CASES[self.spec.case]
        out = []
        wrong = self.non_2xx if case.status == 200 else self.requests - self.non_2xx
        if wrong:
            out.append(f"{wrong} responses were not {case.status}")
        if self.socket_errors:
            out.append(f"{self.socket_errors} socket errors or timeouts")
        if self.reused_tokens:
            out.append(f"{self.reused_tokens} requests re-sent a token (pool slice too small)")
        if self.requests == 0:
            out.append("no request completed")
        expected_hits = 1 - case.fresh_share
        lookups_wrong = abs(self.cache_hit_share - expected_hits) > 0.02
        if case.alg and plan.SERVER_OF.get(self.spec.variant) == "lastguard" and lookups_wrong:
            out.append(f"token cache hits {self.cache_hit_share:.1%}, expected {expected_hits:.0%}")
        return out


class Bench:
    """The running servers and what is needed to load them."""

    def __init__(
        self,
        settings: config.Settings,
        wrk: str,
        envoy: envoy_support.EnvoyProcess,
        pids: dict[str, int],
        hot_tokens: dict[str, str],
        pools: dict[str, Path],
        metrics_port: int,
    ) -> None:
        self.settings = settings
        self.metrics_port = metrics_port
        self.wrk = wrk
        self.envoy = envoy
        self.pids = pids
        self.hot_tokens = hot_tokens
        self.pools = pools
        self.wrk_log = settings.workdir / "wrk.log"
        #: Seconds spent waiting for quiet and on discarded attempts, against the budget.
        self.disturbance_seconds = 0.0
        self.disturbance_budget = 0.0  # set by the caller once the plan is known

    def command(self, spec: plan.RunSpec, duration: int) -> list[str]:
        s = self.settings
        case = plan.CASES[spec.case]
        paced = spec.mode == "paced"
        threads = 1 if paced else s.threads
        connections = s.paced_connections if paced else s.connections
        hot = self.hot_tokens[case.alg] if case.hot and case.alg else "-"
        pool = str(self.pools[case.alg]) if spec.slice_count and case.alg else "-"
        script = WRK_SCRIPTS / ("paced.lua" if paced else "requests.lua")
        argv = [
            self.wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
            "--timeout", "5s", "-s", str(script), self.envoy.url(spec.variant, "/"),
            config.REQUEST_PATH, hot, pool, str(spec.slice_start), str(spec.slice_count),
            str(case.fresh_every), str(threads),
        ]  # fmt: skip
        if paced:
            argv.append(str(s.paced_mean_delay_ms))
        return argv

    def run(self, spec: plan.RunSpec, duration: int | None = None) -> RunResult:
        duration = duration or self.settings.duration
        argv = self.command(spec, duration)
        lookups_before = processes.token_cache_lookups(self.metrics_port)
        before = {name: processes.cpu_seconds(pid) for name, pid in self.pids.items()}
        busy_before, own_before, wall_before = (
            processes.machine_busy_seconds(),
            processes.own_cpu_seconds(),
            time.monotonic(),
        )
        completed = subprocess.run(  # noqa: S603
            argv, capture_output=True, text=True, timeout=duration + 60, check=False
        )
        # Checks still queued when wrk stopped finish now, and count for this run.
        time.sleep(SETTLE_SECONDS)
        busy = processes.machine_busy_seconds() - busy_before
        own = processes.own_cpu_seconds() - own_before
        wall = time.monotonic() - wall_before
        after = {name: processes.cpu_seconds(pid) for name, pid in self.pids.items()}
        lookups_after = processes.token_cache_lookups(self.metrics_port)
        if plan.SERVER_OF.get(spec.variant) != "lastguard":
            lookups_after = lookups_before
        cpu = {name: after[name] - before[name] for name in self.pids}
        with open(self.wrk_log, "a") as log:
            log.write(f"### {spec}\n$ {' '.join(a[:60] for a in argv)}\n")
            log.write(completed.stdout + completed.stderr + "\n")
        line = next(
            (ln for ln in completed.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None
        )
        if completed.returncode != 0 or line is None:
            raise config.BenchError(
                f"wrk failed ({completed.returncode}) for {spec}:\n{completed.stderr[-2000:]}"
            )
        data = json.loads(line.removeprefix("BENCH_RESULT "))
        latency, errors = data["latency_us"], data["errors"]
        seconds = data["duration_us"] / 1e6
        return RunResult(
            spec=spec,
            requests=data["requests"],
            seconds=seconds,
            rps=data["requests"] / seconds if seconds else 0.0,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            p999_ms=latency["p999"] / 1000,
            max_ms=latency["max"] / 1000,
            non_2xx=errors["status"],
            socket_errors=sum(errors[k] for k in ("connect", "read", "write", "timeout")),
            reused_tokens=data["reused"],
            cpu=cpu,
            other_cores=max(0.0, busy - own - sum(cpu.values())) / wall,
            cache_hits=round(lookups_after["hit"] - lookups_before["hit"]),
            cache_misses=round(lookups_after["miss"] - lookups_before["miss"]),
        )

    def other_load(self, seconds: float = 0.5) -> float:
        """Cores other processes keep busy right now, over `seconds`."""
        ours = sum(processes.cpu_seconds(pid) for pid in self.pids.values())
        busy, own, wall = (
            processes.machine_busy_seconds(),
            processes.own_cpu_seconds(),
            time.monotonic(),
        )
        time.sleep(seconds)
        ours = sum(processes.cpu_seconds(pid) for pid in self.pids.values()) - ours
        busy, own = processes.machine_busy_seconds() - busy, processes.own_cpu_seconds() - own
        return max(0.0, busy - own - ours) / (time.monotonic() - wall)

    @property
    def patient(self) -> bool:
        return self.disturbance_seconds < self.disturbance_budget

    def wait_for_quiet(self) -> None:
        """Waits (bounded) until other processes leave the cores alone."""
        started = time.monotonic()
        while self.patient and time.monotonic() - started < self.settings.quiet_wait:
            if self.other_load() <= config.OTHER_LOAD_NOTICE:
                break
        self.disturbance_seconds += time.monotonic() - started

    def measure(self, spec: plan.RunSpec, spare: SpareTokens) -> RunResult:
        """`run`, repeated while other processes disturb it (bounded); the quietest counts."""
        attempts: list[RunResult] = []
        for attempt in range(1 + self.settings.retries):
            if attempt:
                again = spare.renew(spec)
                if again is None or not self.patient:
                    break  # out of spare cache-miss tokens, or of time for this
                spec = again
                self.disturbance_seconds += attempts[-1].seconds
            self.wait_for_quiet()
            attempts.append(self.run(spec))
            if attempts[-1].other_cores <= config.OTHER_LOAD_NOTICE:
                break
        best = min(attempts, key=lambda r: r.other_cores)
        best.attempts = len(attempts)
        return best


class SpareTokens:
    """Fresh-token slices beyond the planned ones, for runs made again."""

    def __init__(self, first: Mapping[str, int], end: Mapping[str, int]) -> None:
        self.next = dict(first)
        self.end = dict(end)

    def renew(self, spec: plan.RunSpec) -> plan.RunSpec | None:
        """`spec` with an unused slice of the same size, or None when none is left."""
        alg = plan.CASES[spec.case].alg
        if not spec.slice_count or alg is None:
            return spec
        start = self.next[alg]
        if start + spec.slice_count > self.end[alg]:
            return None
        self.next[alg] += spec.slice_count
        return dataclasses.replace(spec, slice_start=start)


def sanity_check(
    envoy: envoy_support.EnvoyProcess, hot_tokens: dict[str, str], pool_tokens: dict[str, str]
) -> list[str]:
    """Each listener answers as its variant must, so no run measures the wrong thing."""

    def bearer(token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}

    checks: list[tuple[str, str, dict[str, str], int]] = [
        ("none", config.REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop", config.REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop", config.REQUEST_PATH, {}, 200),
        ("noop_http", config.REQUEST_PATH, bearer(hot_tokens["RS256"]), 200),
        ("noop_http", config.REQUEST_PATH, {}, 200),
    ]
    for variant in ("jwt_authn", *plan.FLOOR_OF):
        for alg in tokens.ALGORITHMS:
            checks.append((variant, config.REQUEST_PATH, bearer(hot_tokens[alg]), 200))
            checks.append((variant, config.REQUEST_PATH, bearer(pool_tokens[alg]), 200))
        checks.append((variant, config.REQUEST_PATH, {}, 401))
        checks.append((variant, config.REQUEST_PATH, bearer(hot_tokens["RS256"] + "x"), 401))
    for variant in plan.FLOOR_OF:
        checks += [
            (variant, "/admin/users", bearer(hot_tokens["RS256"]), 403),
            (variant, "/api/payments/1", bearer(hot_tokens["RS256"]), 403),
            (variant, "/healthz", {}, 200),
        ]
    problems = []
    for listener, path, headers, expected in checks:
        response = envoy.request("GET", path, headers, listener=listener)
        if response.status != expected:
            what = "a token" if headers else "no token"
            problems.append(
                f"{listener}: GET {path} with {what} answered {response.status}, not {expected}: "
                f"{response.text[:200]}"
            )
    return problems
