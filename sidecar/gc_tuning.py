"""Garbage-collector settings for a latency-sensitive sidecar.

The verified-token cache holds tens of thousands of small, acyclic objects.
CPython's automatic full collections walk all of them, and with a filled cache
each one paused Check for 40-170 ms (measured; see docs/performance.md). Those
objects never form reference cycles, so reference counting frees them on
eviction whatever the collector does.

So: objects alive after startup are frozen out of collection (`gc.freeze`),
the young generations are collected as usual (that is where short-lived cycles
from asyncio and gRPC die), automatic full collections are made practically
impossible, and one full collection runs on a fixed schedule instead, so any
cycle that reached the old generation is still reclaimed within the interval.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("lastguard.gc")

#: gen0 threshold (allocations), gen1 (gen0 runs), gen2 (gen1 runs; effectively never).
THRESHOLDS = (10_000, 50, 1_000_000)


def configure() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


async def collect_periodically(interval: float) -> None:
    """Runs a full collection every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        started = time.perf_counter()
        found = gc.collect()
        log.info(
            "scheduled full garbage collection",
            extra={
                "fields": {"ms": round((time.perf_counter() - started) * 1000, 1), "found": found}
            },
        )
