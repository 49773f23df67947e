"""Run a coroutine eagerly: its result now if it never suspends, else a Task that finishes it.

Most Checks never wait (a cached token, a rule, a denial), yet `Authorizer.check`
is a coroutine because a token signed by an unknown key waits for a shared key
fetch. A Task per request costs an event-loop round trip and about as much CPU as
the decision itself; Python 3.12's `asyncio.eager_task_factory` avoids that, and
this is the same idea for 3.11, limited to what the HTTP edge needs.

`start(coro)` steps the coroutine once. If it returns, the result comes back
right away (`Done`). If it suspends on a future, a Task takes over from exactly
that point: `_Resume` hands the Task the future the coroutine is waiting on and,
when woken, steps the coroutine on, so the coroutine sees what it would have seen
under a Task of its own, cancellation included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Done(Generic[T]):
    """The result of a coroutine that finished without suspending."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


class _Resume(Generic[T]):
    """An awaitable that continues a coroutine already stepped once (see module doc)."""

    def __init__(self, coro: Coroutine[Any, Any, T], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, None, T]:
        pending = self._pending
        while True:
            try:
                yield pending
            except BaseException as exc:  # cancellation: deliver it where the coroutine waits
                try:
                    pending = self._coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                pending = self._coro.send(None)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


async def _finish(resume: _Resume[T]) -> T:
    return await resume


def start(coro: Coroutine[Any, Any, T]) -> Done[T] | asyncio.Task[T]:
    """Steps `coro` now; `Done` when it finished, else the Task finishing it.

    Exceptions the coroutine raises before suspending propagate to the caller.
    Must be called from the running event loop's thread.
    """
    try:
        pending = coro.send(None)
    except StopIteration as done:
        return Done(done.value)
    return asyncio.get_running_loop().create_task(_finish(_Resume(coro, pending)))
