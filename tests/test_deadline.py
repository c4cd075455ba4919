"""The stream watchdog (``deadline.py``): one re-armed deadline for reads and writes.

The watchdog guards an ``asyncio.timeout(None)`` block: steps that keep coming keep it
alive however long the block runs; a gap longer than the limit, or the hard limit,
expires it, and ``expired`` names which. The gaps here are tenths of a second on the
event loop's own clock, with wide margins either side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from berry_proxy.deadline import Phase, Watchdog

GAP = 0.2
STEP = 0.04


async def steady_steps(watchdog: Watchdog, count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(STEP)
        watchdog.progress()


async def test_steps_within_the_gap_keep_it_alive_for_many_gaps() -> None:
    watchdog = Watchdog()
    async with asyncio.timeout(None) as timeout:
        watchdog.start(timeout, GAP, None, Phase.UPSTREAM)
        await steady_steps(watchdog, 25)  # ~1 s: five times the gap
        watchdog.cancel()
    assert watchdog.expired is None


async def stall(watchdog: Watchdog) -> None:
    await asyncio.Event().wait()


async def guarded(
    watchdog: Watchdog,
    body: Callable[[Watchdog], Awaitable[None]],
    gap: float,
    hard_in: float | None = None,
    phase: Phase = Phase.UPSTREAM,
) -> None:
    """Run ``body`` in a block ``watchdog`` guards (``hard_in``: seconds from now)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(None) as timeout:
        watchdog.start(timeout, gap, None if hard_in is None else loop.time() + hard_in, phase)
        try:
            await body(watchdog)
        finally:
            watchdog.cancel()


async def test_a_gap_longer_than_the_limit_expires_it_and_names_the_phase() -> None:
    watchdog = Watchdog()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def three_steps_then_a_stalled_write(watchdog: Watchdog) -> None:
        await steady_steps(watchdog, 3)
        watchdog.phase = Phase.CLIENT
        await stall(watchdog)

    with pytest.raises(TimeoutError):
        await guarded(watchdog, three_steps_then_a_stalled_write, GAP, phase=Phase.FIRST_BYTE)
    elapsed = loop.time() - started
    assert watchdog.expired is Phase.CLIENT
    assert 3 * STEP + GAP <= elapsed < 3 * STEP + GAP + 1.0


async def test_the_hard_limit_expires_it_despite_steady_steps() -> None:
    watchdog = Watchdog()

    async def many_steps(watchdog: Watchdog) -> None:
        await steady_steps(watchdog, 100)

    with pytest.raises(TimeoutError):
        await guarded(watchdog, many_steps, GAP, hard_in=0.3)
    assert watchdog.expired is Phase.DEADLINE


async def test_a_shorter_limit_takes_effect_at_once() -> None:
    watchdog = Watchdog()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def shorten_then_stall(watchdog: Watchdog) -> None:
        watchdog.limit(GAP, None, Phase.UPSTREAM)
        await stall(watchdog)

    with pytest.raises(TimeoutError):
        await guarded(watchdog, shorten_then_stall, 30.0, phase=Phase.FIRST_BYTE)
    assert watchdog.expired is Phase.UPSTREAM
    assert loop.time() - started < 2.0


async def test_a_departed_client_cancels_through_it_unchanged() -> None:
    """Cancellation from outside (the client left) stays a CancelledError."""
    watchdog = Watchdog()
    started = asyncio.Event()

    async def guarded() -> None:
        async with asyncio.timeout(None) as timeout:
            watchdog.start(timeout, GAP, None, Phase.UPSTREAM)
            started.set()
            try:
                await asyncio.Event().wait()
            finally:
                watchdog.cancel()

    task = asyncio.create_task(guarded())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watchdog.expired is None
