"""eager.start: a coroutine's result at once when it never waits, else a Task that finishes it."""

from __future__ import annotations

import asyncio

import pytest

from lastguard.sidecar import eager


async def no_wait(value: int) -> int:
    return value * 2


async def waits_on(future: asyncio.Future[int], trace: list[str]) -> int:
    trace.append("before")
    value = await future
    trace.append("after")
    await asyncio.sleep(0)  # a bare yield to the loop, as asyncio.sleep(0) does
    return value + 1


async def test_a_coroutine_that_never_waits_is_done_at_once() -> None:
    outcome = eager.start(no_wait(21))
    assert isinstance(outcome, eager.Done) and outcome.value == 42


async def test_an_exception_before_waiting_reaches_the_caller() -> None:
    async def fails() -> int:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        eager.start(fails())


async def test_a_waiting_coroutine_is_finished_by_a_task_from_where_it_stopped() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    trace: list[str] = []
    outcome = eager.start(waits_on(future, trace))
    assert isinstance(outcome, asyncio.Task)
    assert trace == ["before"]  # stepped once, synchronously
    await asyncio.sleep(0)
    assert not outcome.done()
    future.set_result(9)
    assert await outcome == 10
    assert trace == ["before", "after"]


async def test_an_exception_after_waiting_is_the_tasks() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    outcome = eager.start(waits_on(future, []))
    assert isinstance(outcome, asyncio.Task)
    future.set_exception(KeyError("gone"))
    with pytest.raises(KeyError):
        await outcome


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def guarded() -> int:
        try:
            return await future
        finally:
            cleaned.append("finally ran")

    outcome = eager.start(guarded())
    assert isinstance(outcome, asyncio.Task)
    await asyncio.sleep(0)
    outcome.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome
    assert cleaned == ["finally ran"]
    assert future.cancelled()
