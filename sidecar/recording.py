"""Counts each answered Check: decisions by result and reason, and time to decide.

Shared by both protocol edges (gRPC and HTTP). Label children are looked up
once per (result, reason) and kept, so a Check costs two metric updates.
"""

from __future__ import annotations

import time

from prometheus_client import Counter

from lastguard.sidecar import metrics
from lastguard.sidecar.decision import Decision


class CheckRecorder:
    def __init__(self) -> None:
        self._counters: dict[tuple[bool, str], Counter] = {}

    def record(self, decision: Decision, started: float) -> None:
        """Counts `decision`; `started` is the `time.perf_counter()` when the Check arrived."""
        key = (decision.allowed, decision.reason)
        counter = self._counters.get(key)
        if counter is None:
            counter = metrics.DECISIONS.labels(
                "allow" if decision.allowed else "deny", decision.reason
            )
            self._counters[key] = counter
        counter.inc()
        metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
