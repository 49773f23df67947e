"""A soak's settings and its two kinds of runs, on a running bench (scripts/soak.py).

The fill sends distinct tokens once each at saturation until lastguard counted
that many cache misses; the soak's slices are paced runs of bench's
`mix-rs256` requests, each followed by a reading of lastguard's RSS. Every run
takes its fresh tokens from pool lines never sent to this sidecar (`PoolLines`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchkit import ROOT, config, plan, processes, runner
from lastguard.sidecar import cli as sidecar_cli

ALG = "RS256"
FILL_CASE = "miss-rs256"
SOAK_CASE = "mix-rs256"
#: The longest wrk run of a fill; shorter ones near the end, so it stops close to N.
FILL_CHUNK_SECONDS = 10
#: A fill slower than this many tokens a second is stuck: give up rather than run on.
FILL_MIN_RATE = 200
#: Fresh tokens set aside per slice, over the paced rate's expected share.
SLICE_TOKEN_MARGIN = 1.5


@dataclass(frozen=True)
class SoakSettings:
    """Built once from the flags."""

    minutes: float = 10.0
    slice_seconds: int = 30
    fill_tokens: int = 100_000
    #: The sidecar's token cache bounds; None: its own defaults (not passed).
    cache_entries: int | None = None
    cache_mib: int | None = None
    workdir: Path = ROOT / ".bench"

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

    def slice_tokens(self, runs: config.Settings) -> int:
        """Fresh tokens set aside for one slice of the soak."""
        expected: float = self.slice_seconds * runs.paced_rate * plan.CASES[SOAK_CASE].fresh_share
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
            raise config.BenchError(f"the {self.end:,} pool lines planned for are used up")
        return self.next

    def sent(self, start: int, count: int, result: runner.RunResult, connections: int) -> None:
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

    result: runner.RunResult
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


def pool_lines_needed(settings: SoakSettings, runs: config.Settings, top_up: int) -> int:
    """Pool lines the plan may reach: the fill's and top-up's tokens (a fill run takes at
    most the lines still needed, and may skip a connection's worth), then every slice's."""
    fresh = settings.fill_tokens + top_up
    skipped: int = runs.connections * (2 + fresh // 5_000)
    return fresh + skipped + settings.slices * settings.slice_tokens(runs)


def fill(bench: runner.Bench, lines: PoolLines, target: int, say: Callable[[str], None]) -> Fill:
    """Sends `target` tokens never sent before, each once, at saturation.

    wrk stops after a time, not a count: each run is given at most 10 s and as
    many lines as the rate ceiling could use in that time, and the runs stop
    once lastguard counted `target` misses. Near the end a run lasts 1 s and
    gets just the lines still needed; if it uses them up early it sends some
    again, which are cache hits and count for nothing.
    """
    s = bench.settings
    done = Fill(target=target)
    before = processes.token_cache_lookups(bench.metrics_port)
    rate = float(s.miss_rate_ceiling)  # until the first run measured lastguard's
    deadline = time.monotonic() + 60 + target / FILL_MIN_RATE
    while done.verified < target:
        if time.monotonic() > deadline:
            raise config.BenchError(f"fill stuck: {done.verified:,} of {target:,} after its time")
        remaining = target - done.verified
        seconds = max(1, min(FILL_CHUNK_SECONDS, int(remaining / rate)))
        count = min(remaining, seconds * s.miss_rate_ceiling)
        start = lines.take(count)
        spec = plan.RunSpec(-1, "lastguard", FILL_CASE, "saturate", start, count)
        result = bench.run(spec, seconds)
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
    after = processes.token_cache_lookups(bench.metrics_port)
    done.lastguard_misses = after["miss"] - before["miss"]
    done.rss_after_mb = processes.rss_mb(bench.pids["lastguard"])
    return done


def soak(
    bench: runner.Bench, lines: PoolLines, settings: SoakSettings, say: Callable[[str], None]
) -> list[Sample]:
    s = bench.settings
    count = settings.slice_tokens(s)
    began = time.monotonic()
    samples = []
    for n in range(settings.slices):
        start = lines.take(count)
        spec = plan.RunSpec(n, "lastguard", SOAK_CASE, "paced", start, count)
        result = bench.run(spec, settings.slice_seconds)
        lines.sent(start, count, result, s.paced_connections)
        sample = Sample(
            result,
            elapsed=time.monotonic() - began,
            rss_mb=processes.rss_mb(bench.pids["lastguard"]),
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
