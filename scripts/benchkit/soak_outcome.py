"""What a soak measured and what it means: the RSS verdict, the outcome, the printed report.

No I/O but printing. The verdict compares the highest RSS over the last third
of the slices with the RSS after the first one; scripts/soak.py's docstring
says why the tolerance is max(3 MB, 5%).
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from benchkit import soak_runs, summary

#: The verdict's tolerance: whichever is larger (scripts/soak.py's docstring says why).
TOLERANCE_MB = 3.0
TOLERANCE_SHARE = 0.05


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
    def of(samples: Sequence[soak_runs.Sample]) -> Verdict:
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
    fill: soak_runs.Fill | None = None
    top_up: soak_runs.Fill | None = None
    samples: list[soak_runs.Sample] = field(default_factory=list)
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


def slices_table(samples: Sequence[soak_runs.Sample]) -> None:
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
    summary.print_table(rows, right=[True] * len(header))


def print_report(settings: soak_runs.SoakSettings, outcome: Outcome) -> None:
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
