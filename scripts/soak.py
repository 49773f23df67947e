"""Does lastguard's memory stay flat under steady load? `make soak` (or `python scripts/soak.py`).

Two answers from one lastguard process behind one Envoy, all on 127.0.0.1, built
from scripts/bench.py's parts (its policy, its `lastguard` listener, its token
pool and wrk scripts, its /proc readings; see docs/performance.md):

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
import math
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import bench  # also puts the repository on sys.path, for tests.support
import yaml

from lastguard.sidecar import cli as sidecar_cli
from lastguard.sidecar import devissuer
from tests.support import envoy as envoy_support
from tests.support.sidecar import SidecarError, SidecarProcess

ALG = "RS256"
FILL_CASE = "miss-rs256"
SOAK_CASE = "mix-rs256"
#: The longest wrk run of a fill; shorter ones near the end, so it stops close to N.
FILL_CHUNK_SECONDS = 10
#: A fill slower than this many tokens a second is stuck: give up rather than run on.
FILL_MIN_RATE = 200
#: Fresh tokens set aside per slice, over the paced rate's expected share.
SLICE_TOKEN_MARGIN = 1.5
#: The verdict's tolerance: whichever is larger (the module docstring says why).
TOLERANCE_MB = 3.0
TOLERANCE_SHARE = 0.05


@dataclass(frozen=True)
class SoakSettings:
    """Built once from the flags."""

    minutes: float = 10.0
    slice_seconds: int = 30
    fill_tokens: int = 100_000
    #: The sidecar's token cache bounds; None: its own defaults (not passed).
    cache_entries: int | None = None
    cache_mib: int | None = None
    workdir: Path = bench.ROOT / ".bench"

    @property
    def slices(self) -> int:
        return round(self.minutes * 60 / self.slice_seconds)

    @property
    def logdir(self) -> Path:
        return self.workdir / "soak"

    @property
    def pooldir(self) -> Path:
        """Not bench's .bench/tokens/: a bench running meanwhile may be growing that pool."""
        return self.workdir / "soak-tokens"

    def slice_tokens(self, runs: bench.Settings) -> int:
        """Fresh tokens set aside for one slice of the soak."""
        expected: float = self.slice_seconds * runs.paced_rate * bench.CASES[SOAK_CASE].fresh_share
        return math.ceil(expected * SLICE_TOKEN_MARGIN) + 100

    def sidecar_args(self) -> list[str]:
        args = []
        if self.cache_entries is not None:
            args += ["--token-cache-entries", str(self.cache_entries)]
        if self.cache_mib is not None:
            args += ["--token-cache-mib", str(self.cache_mib)]
        return args

    def cache_bounds(self) -> tuple[int, int]:
        """(entries, MiB) the sidecar runs with: ours, or its own defaults."""
        defaults = sidecar_cli.build_parser().parse_args(["sidecar", "--policy-file", "-"])
        entries = self.cache_entries
        mib = self.cache_mib
        return (
            int(defaults.token_cache_entries) if entries is None else entries,
            int(defaults.token_cache_mib) if mib is None else mib,
        )


class PoolLines:
    """The pool's lines never sent to this sidecar: each run takes its slice from here."""

    def __init__(self, end: int) -> None:
        self.next = 0
        self.end = end

    def take(self, count: int) -> int:
        """The first line of `count` unsent ones (wrk may send fewer; see `sent`)."""
        if self.next + count > self.end:
            raise bench.BenchError(f"the {self.end:,} pool lines planned for are used up")
        return self.next

    def sent(self, start: int, count: int, result: bench.RunResult, connections: int) -> None:
        """Marks the lines a run may have sent as used.

        wrk's one thread takes the slice's lines in order; lastguard verified
        `cache_misses` of them, and each connection may have had one more in
        flight when wrk stopped. Lines after those were never sent: later runs use them.
        """
        self.next = start + min(count, result.cache_misses + connections)


@dataclass
class Fill:
    """Distinct tokens sent once each at saturation, and what they cost."""

    target: int
    verified: int = 0  # lastguard's cache misses, summed over the fill's wrk runs
    cache_hits: int = 0  # tokens of the last, short run sent again (still cached)
    requests: int = 0
    seconds: float = 0.0
    lastguard_cpu_seconds: float = 0.0
    runs: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    #: Read once the fill is over: lastguard's miss counter from before to after it
    #: (late checks included), and its RSS a second later.
    lastguard_misses: float = math.nan
    rss_after_mb: float = math.nan

    @property
    def problems(self) -> list[str]:
        out = []
        if self.non_2xx or self.socket_errors:
            out.append(f"{self.non_2xx} non-2xx responses, {self.socket_errors} socket errors")
        if self.verified < self.target:
            out.append(f"{self.verified:,} tokens verified, not {self.target:,}")
        return out


@dataclass
class Sample:
    """One slice of the soak and lastguard's RSS right after it."""

    result: bench.RunResult
    elapsed: float  # seconds since the soak started, at the slice's end
    rss_mb: float
    cpu_cores: float  # lastguard's, on average over the slice

    def as_dict(self) -> dict[str, Any]:
        return {
            "elapsed_seconds": self.elapsed,
            "rss_mb": self.rss_mb,
            "lastguard_cpu_cores": self.cpu_cores,
            "lastguard_cpu_ms_per_request": self.result.cpu_per_1k("lastguard"),
            "problems": self.result.problems,
            **asdict(self.result),
        }


@dataclass(frozen=True)
class Verdict:
    baseline_mb: float  # after the first slice
    last_third_max_mb: float
    tolerance_mb: float
    slope_mb_per_minute: float | None  # least squares over the slices after the first

    @property
    def growth_mb(self) -> float:
        return self.last_third_max_mb - self.baseline_mb

    @property
    def grew(self) -> bool:
        return not self.growth_mb <= self.tolerance_mb  # a NaN reading counts as growth

    @staticmethod
    def of(samples: Sequence[Sample]) -> Verdict:
        baseline = samples[0].rss_mb
        later = samples[1:]
        slope = None
        if len(later) >= 2:
            minutes = [s.elapsed / 60 for s in later]
            slope = statistics.linear_regression(minutes, [s.rss_mb for s in later]).slope
        return Verdict(
            baseline_mb=baseline,
            last_third_max_mb=_max_or_nan([s.rss_mb for s in samples[-last_third(len(samples)) :]]),
            tolerance_mb=max(TOLERANCE_MB, TOLERANCE_SHARE * baseline),
            slope_mb_per_minute=slope,
        )


def _max_or_nan(values: Sequence[float]) -> float:
    """max(), except that one unreadable (NaN) value makes the result NaN."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def last_third(slices: int) -> int:
    return max(1, slices // 3)


@dataclass
class Outcome:
    """Everything measured, for the report and soak.json."""

    idle_rss_mb: float
    fill: Fill | None = None
    top_up: Fill | None = None
    samples: list[Sample] = field(default_factory=list)
    #: lastguard's scheduled full garbage collections (its log lines), which may move RSS.
    full_collections: list[dict[str, Any]] = field(default_factory=list)
    soak_started_at: float = math.nan  # time.time()

    @property
    def verdict(self) -> Verdict | None:
        return Verdict.of(self.samples) if self.samples else None

    @property
    def problems(self) -> list[str]:
        out = [f"fill: {p}" for p in (self.fill.problems if self.fill else [])]
        out += [f"top-up: {p}" for p in (self.top_up.problems if self.top_up else [])]
        return out + [
            f"slice {n}: {problem}"
            for n, sample in enumerate(self.samples, 1)
            for problem in sample.result.problems
        ]

    def as_dict(self) -> dict[str, Any]:
        verdict = self.verdict
        return {
            "rss_mb": {
                "idle": self.idle_rss_mb,
                "after_fill": self.fill and self.fill.rss_after_mb,
            },
            "fill": self.fill and asdict(self.fill),
            "top_up": self.top_up and asdict(self.top_up),
            "slices": [sample.as_dict() for sample in self.samples],
            "verdict": verdict
            and asdict(verdict) | {"growth_mb": verdict.growth_mb, "grew": verdict.grew},
            "full_collections": self.full_collections,
            "problems": self.problems,
        }


# --- the runs ---------------------------------------------------------------------------------


def fill(runner: bench.Bench, lines: PoolLines, target: int, say: Callable[[str], None]) -> Fill:
    """Sends `target` tokens never sent before, each once, at saturation.

    wrk stops after a time, not a count: each run is given at most 10 s and as
    many lines as the rate ceiling could use in that time, and the runs stop
    once lastguard counted `target` misses. Near the end a run lasts 1 s and
    gets just the lines still needed; if it uses them up early it sends some
    again, which are cache hits and count for nothing.
    """
    s = runner.settings
    done = Fill(target=target)
    before = bench.token_cache_lookups(runner.metrics_port)
    rate = float(s.miss_rate_ceiling)  # until the first run measured lastguard's
    deadline = time.monotonic() + 60 + target / FILL_MIN_RATE
    while done.verified < target:
        if time.monotonic() > deadline:
            raise bench.BenchError(f"fill stuck: {done.verified:,} of {target:,} after its time")
        remaining = target - done.verified
        seconds = max(1, min(FILL_CHUNK_SECONDS, int(remaining / rate)))
        count = min(remaining, seconds * s.miss_rate_ceiling)
        start = lines.take(count)
        spec = bench.RunSpec(-1, "lastguard", FILL_CASE, "saturate", start, count)
        result = runner.run(spec, seconds)
        lines.sent(start, count, result, s.connections)
        done.verified += result.cache_misses
        done.cache_hits += result.cache_hits
        done.requests += result.requests
        done.seconds += result.seconds
        done.lastguard_cpu_seconds += result.cpu["lastguard"]
        done.non_2xx += result.non_2xx
        done.socket_errors += result.socket_errors
        done.runs += 1
        rate = max(result.cache_misses / result.seconds, 1.0)
        say(f"  {done.verified:>9,} of {target:,} verified ({rate:,.0f}/s)")
    time.sleep(1.0)  # as before the idle reading
    done.lastguard_misses = bench.token_cache_lookups(runner.metrics_port)["miss"] - before["miss"]
    done.rss_after_mb = bench.rss_mb(runner.pids["lastguard"])
    return done


def soak(
    runner: bench.Bench, lines: PoolLines, settings: SoakSettings, say: Callable[[str], None]
) -> list[Sample]:
    s = runner.settings
    count = settings.slice_tokens(s)
    began = time.monotonic()
    samples = []
    for n in range(settings.slices):
        start = lines.take(count)
        spec = bench.RunSpec(n, "lastguard", SOAK_CASE, "paced", start, count)
        result = runner.run(spec, settings.slice_seconds)
        lines.sent(start, count, result, s.paced_connections)
        sample = Sample(
            result,
            elapsed=time.monotonic() - began,
            rss_mb=bench.rss_mb(runner.pids["lastguard"]),
            cpu_cores=result.cpu["lastguard"] / result.seconds,
        )
        samples.append(sample)
        flag = "  !! " + "; ".join(result.problems) if result.problems else ""
        say(
            f"slice {n + 1:>2}/{settings.slices}  {result.rps:5,.0f} req/s  "
            f"p99 {result.p99_ms:6.2f} ms  lastguard {sample.cpu_cores:.2f} cores, "
            f"RSS {sample.rss_mb:6.1f} MB{flag}"
        )
    return samples


def sanity_check(envoy: envoy_support.EnvoyProcess, hot: str, fresh: str) -> list[str]:
    """lastguard's listener allows the hot and a pool token and denies no token."""
    problems = []
    checks = [("the hot token", hot, 200), ("a pool token", fresh, 200), ("no token", "", 401)]
    for what, token, expected in checks:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        response = envoy.request("GET", bench.REQUEST_PATH, headers, listener="lastguard")
        if response.status != expected:
            problems.append(f"{what}: {response.status}, not {expected}: {response.text[:200]}")
    return problems


def pool_lines_needed(settings: SoakSettings, runs: bench.Settings, top_up: int) -> int:
    """Pool lines the plan may reach: the fill's and top-up's tokens (a fill run takes at
    most the lines still needed, and may skip a connection's worth), then every slice's."""
    fresh = settings.fill_tokens + top_up
    skipped: int = runs.connections * (2 + fresh // 5_000)
    return fresh + skipped + settings.slices * settings.slice_tokens(runs)


def measure(
    settings: SoakSettings,
    wrk: str,
    issuer: bench.BenchIssuer,
    pool: bench.TokenPool,
    pool_end: int,
    say: Callable[[str], None],
) -> Outcome:
    """Starts lastguard and Envoy, fills, soaks; stops both on every way out."""
    logs = settings.logdir
    partner = devissuer.DevIssuer("https://partners.bench.lastguard.dev")
    jobs = devissuer.DevIssuer("https://jobs.bench.lastguard.dev")
    policy_file = logs / "policy.yaml"
    policy = bench.bench_policy(issuer.jwks_json(), partner, jobs)
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
    hot_token = issuer.mint(f"hot-{ALG.lower()}", ALG)
    runs = bench.Settings(threads=1, workdir=logs)
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
        outcome = Outcome(idle_rss_mb=bench.rss_mb(sidecar.pid))
        say(
            f"lastguard  127.0.0.1:{sidecar.port} (pid {sidecar.pid}), "
            f"idle RSS {outcome.idle_rss_mb:.1f} MB"
        )
        envoy = envoy_support.EnvoyProcess(
            [bench.authz_listener("lastguard", sidecar.port)],
            workdir=logs / "envoy",
            startup_timeout=30.0,
        )
        stack.callback(envoy.stop)
        envoy.start()
        envoy_pid = bench.pid_running(envoy.config_path)
        say(f"envoy      lastguard :{envoy.port('lastguard')} (pid {envoy_pid}, --concurrency 1)")
        failed = sanity_check(envoy, hot_token, pool.line(pool_end))  # a line no run takes
        if failed:
            raise bench.BenchError("sanity check failed: " + "; ".join(failed))

        runner = bench.Bench(
            runs,
            wrk,
            envoy,
            {"lastguard": sidecar.pid, "envoy": envoy_pid},
            {ALG: hot_token},
            {ALG: pool.path},
            metrics_port=sidecar.metrics_port or 0,
        )
        runner.wrk_log.unlink(missing_ok=True)
        lines = PoolLines(pool_end)
        entries, _ = settings.cache_bounds()
        if settings.fill_tokens:
            say(f"fill: {settings.fill_tokens:,} distinct tokens, once each, at saturation")
            outcome.fill = fill(runner, lines, settings.fill_tokens, say)
            say(
                f"fill: lastguard counted {outcome.fill.lastguard_misses:,.0f} cache misses; "
                f"RSS {outcome.idle_rss_mb:.1f} MB idle, {outcome.fill.rss_after_mb:.1f} MB after"
            )
        top_up = max(0, entries - settings.fill_tokens)
        if settings.minutes and top_up:
            say(f"top-up: {top_up:,} more distinct tokens, so the token cache is at its bound")
            outcome.top_up = fill(runner, lines, top_up, say)
        if settings.minutes:
            say(
                f"soak: {settings.slices} slices of {settings.slice_seconds}s of {SOAK_CASE} "
                f"({bench.CASES[SOAK_CASE].title}) at about {runs.paced_rate:,}/s"
            )
            outcome.soak_started_at = time.time()
            outcome.samples = soak(runner, lines, settings, say)
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


# --- the report --------------------------------------------------------------------------------


def slices_table(samples: Sequence[Sample]) -> None:
    header = (
        "slice", "end", "requests", "req/s", "non-2xx", "errors", "p99 ms", "max ms",
        "CPU cores", "CPU ms/req", "RSS MB", "vs 1st", "cache hits", "other cores",
    )  # fmt: skip
    rows = [header]
    for n, sample in enumerate(samples, 1):
        r = sample.result
        minutes, seconds = divmod(round(sample.elapsed), 60)
        rows.append(
            (
                str(n),
                f"{minutes}:{seconds:02d}",
                f"{r.requests:,}",
                f"{r.rps:,.0f}",
                str(r.non_2xx),
                str(r.socket_errors),
                f"{r.p99_ms:.2f}",
                f"{r.max_ms:.1f}",
                f"{sample.cpu_cores:.2f}",
                f"{r.cpu_per_1k('lastguard'):.3f}",
                f"{sample.rss_mb:.1f}",
                f"{sample.rss_mb - samples[0].rss_mb:+.1f}",
                f"{100 * r.cache_hit_share:.1f}%",
                f"{r.other_cores:.2f}",
            )
        )
    bench.print_table(rows, right=[True] * len(header))


def print_report(settings: SoakSettings, outcome: Outcome) -> None:
    entries, mib = settings.cache_bounds()
    print()
    if outcome.fill:
        f = outcome.fill
        print(
            f"RSS with the token cache filled by {f.verified:,} distinct tokens (lastguard counted "
            f"{f.lastguard_misses:,.0f} misses; cache bounds {entries:,} entries / {mib} MiB): "
            f"{outcome.idle_rss_mb:.1f} MB idle -> {f.rss_after_mb:.1f} MB "
            f"({f.verified / f.seconds:,.0f} tokens/s, "
            f"{f.lastguard_cpu_seconds / f.requests * 1000:.2f} ms lastguard CPU each)"
        )
    verdict = outcome.verdict
    if verdict:
        print()
        slices_table(outcome.samples)
        print()
        slope = verdict.slope_mb_per_minute
        first, last = (
            len(outcome.samples) - last_third(len(outcome.samples)) + 1,
            len(outcome.samples),
        )
        which = f"slice {last}" if first == last else f"slices {first}-{last}"
        print(
            f"verdict: {'GROWTH' if verdict.grew else 'no growth'}: highest RSS in the last third "
            f"({which}) {verdict.last_third_max_mb:.1f} MB, "
            f"{verdict.growth_mb:+.1f} MB against {verdict.baseline_mb:.1f} MB after the first "
            f"slice (tolerance {verdict.tolerance_mb:.1f} MB)"
            + ("" if slope is None else f"; trend after the first slice {slope:+.2f} MB/min")
        )
    for record in outcome.full_collections:
        at = datetime.fromisoformat(record["ts"]).timestamp() - outcome.soak_started_at
        when = f"{at / 60:.1f} min into the soak" if at >= 0 else "before the soak"  # or none
        print(
            f"lastguard's scheduled full garbage collection {when}: {record.get('ms')} ms, "
            f"{record.get('found')} unreachable objects found"
        )
    for problem in outcome.problems:
        print(f"INVALID {problem}", file=sys.stderr)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> SoakSettings:
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
        default=bench.ROOT / ".bench",
        help="keys, soak-tokens, soak.json, soak/",
    )
    args = parser.parse_args(argv)
    settings = SoakSettings(
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
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: stop everything
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    # A new log directory: the sidecar's port is read from its log, which a rerun appends to.
    shutil.rmtree(settings.logdir, ignore_errors=True)
    settings.logdir.mkdir(parents=True)
    wrk = bench.ensure_wrk()
    env = bench.environment(wrk)
    say(f"lastguard {env['lastguard']}; Envoy {env['envoy']}; {env['wrk']}")
    entries, mib = settings.cache_bounds()
    say(f"lastguard's token cache bounds: {entries:,} entries, {mib} MiB")

    top_up = max(0, entries - settings.fill_tokens) if settings.minutes else 0
    pool_end = pool_lines_needed(settings, bench.Settings(threads=1), top_up)
    issuer = bench.BenchIssuer(settings.workdir / "keys")
    pool = bench.TokenPool(settings.pooldir, issuer, ALG)
    pool.ensure(pool_end + 1, say)

    outcome = measure(settings, wrk, issuer, pool, pool_end, say)
    print_report(settings, outcome)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "token_cache": {"entries": entries, "mib": mib},
        "environment": env,
        "request": {"method": "GET", "path": bench.REQUEST_PATH},
        **outcome.as_dict(),
        "elapsed_seconds": time.monotonic() - started,
    }
    results = settings.workdir / "soak.json"
    results.write_text(json.dumps(bench.no_nan(report), indent=2, default=str) + "\n")
    print()
    say(f"results in {results}")
    verdict = outcome.verdict
    return 1 if outcome.problems or (verdict and verdict.grew) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
    except bench.BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        sys.exit(2)
    except (SidecarError, envoy_support.EnvoyError) as exc:
        print(f"soak could not start: {exc}", file=sys.stderr)
        sys.exit(1)
