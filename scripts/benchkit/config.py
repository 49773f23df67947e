"""What every part of the bench agrees on: paths, the measured request, the settings, the error.

Data only, no I/O: the one settings object is built once from the flags
(scripts/bench.py) and passed to the plan and the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchkit import ROOT

HOST = "127.0.0.1"
#: The measured request: matched by the 12th of the policy's 13 rules (scope api.read).
REQUEST_PATH = "/api/catalog/items?page=2"
#: Other processes busier than this (cores, on average over a run) make the run "shared".
OTHER_LOAD_NOTICE = 0.15


class BenchError(RuntimeError):
    """The bench cannot run or its measurements are not valid; the message says why."""


@dataclass(frozen=True)
class Settings:
    """Built once from the flags."""

    rounds: int = 3
    duration: int = 5
    connections: int = 64
    threads: int = 2
    paced_connections: int = 20
    paced_mean_delay_ms: int = 20
    #: Fresh tokens set aside per second of a saturated cache-miss run: above any
    #: Python ext_authz server's rate here (the no-op floor is ~5-6k/s), so a run
    #: never runs out. One that does is reported as invalid.
    miss_rate_ceiling: int = 8_000
    #: Requests per second a saturated run mostly of cache hits may reach (HTTP mode
    #: reached 13k here): a mix run sets aside its fresh share of this, unless that
    #: is more than `miss_rate_ceiling`.
    hit_rate_ceiling: int = 20_000
    warmup: int = 1
    #: A run during which other processes kept more than OTHER_LOAD_NOTICE cores
    #: busy is run again up to this many times; the quietest attempt counts.
    retries: int = 1
    #: Before each run, wait up to this long for other processes to quieten.
    quiet_wait: float = 10.0
    #: Waiting and runs made again stop once they took this share of the planned time.
    disturbance_budget: float = 0.5
    workdir: Path = ROOT / ".bench"

    @property
    def paced_rate(self) -> int:
        return self.paced_connections * 1000 // self.paced_mean_delay_ms


def shown(path: Path) -> Path:
    """`path` relative to the repository when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
