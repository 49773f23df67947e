"""The sidecar's garbage-collector settings: frozen startup objects, rare automatic
full collections, and a scheduled one instead."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from lastguard.sidecar import gc_tuning


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


def test_configure_freezes_startup_objects_and_defers_full_collections(restore_gc: None) -> None:
    gc.unfreeze()
    gc_tuning.configure()
    assert gc.get_threshold() == gc_tuning.THRESHOLDS
    assert gc.get_freeze_count() > 0


async def test_full_collection_runs_on_schedule(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="lastguard.gc")
    task = asyncio.create_task(gc_tuning.collect_periodically(0.01))
    try:
        async with asyncio.timeout(5):
            while not any("scheduled full garbage collection" in r.message for r in caplog.records):
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    record = next(r for r in caplog.records if "scheduled" in r.message)
    assert set(record.fields) == {"ms", "found"}  # type: ignore[attr-defined]
