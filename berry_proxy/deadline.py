"""One re-armed deadline for a stream's reads and writes, at one clock read per step.

A stream must not sit still for longer than its gap limit, whichever side is still: the
upstream sending nothing (the first-byte limit until the first bytes, then the idle
limit between any two reads, events and comments alike) or the client reading nothing
(the idle limit between two writes that completed). A hard limit (the request's deadline
before the commit, an explicit total timeout after it) may cap the whole.

Re-arming an ``asyncio`` timer at every read and write would cost a timer-heap push and
cancel per step. ``Watchdog`` only notes the time of the latest step (``progress``); its
single timer fires at the earliest moment the limit could have passed, looks at the
latest step, and either sleeps again until the new earliest moment or expires the
enclosing ``asyncio.timeout`` block, which cancels what is awaited and raises
``TimeoutError`` at the block's end. ``expired`` then says which limit it was.
"""

from __future__ import annotations

import asyncio
import enum


class Phase(enum.Enum):
    """What the stream is waiting for (and so which limit a timeout broke)."""

    FIRST_BYTE = "first byte"  # the upstream's first bytes
    UPSTREAM = "stream"  # more upstream bytes
    CLIENT = "client"  # the client to take what was written
    DEADLINE = "deadline"  # (only as ``expired``) the hard limit passed
    DRAIN = "drain"  # (only as ``expired``) the gateway's drain ran out (drain.py)


class Watchdog:
    __slots__ = ("_handle", "_loop", "_timeout", "expired", "gap", "hard", "last", "phase")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self.gap = 0.0
        self.hard: float | None = None
        self.phase = Phase.FIRST_BYTE
        self.expired: Phase | None = None
        self.last = 0.0

    def start(self, timeout: asyncio.Timeout, gap: float, hard: float | None, phase: Phase) -> None:
        """Guard the ``asyncio.timeout(None)`` block ``timeout`` with ``gap`` seconds
        between steps, and at most until ``hard`` (loop time), starting now."""
        loop = self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self.gap, self.hard, self.phase = gap, hard, phase
        self.last = loop.time()
        self._handle = loop.call_at(self._due(), self._check)

    def progress(self) -> None:
        """A step completed (bytes read, or a write the client took)."""
        self.last = self._loop.time()  # type: ignore[union-attr]  # started

    def limit(self, gap: float, hard: float | None, phase: Phase) -> None:
        """New limits from now on (e.g. the idle gap once the first bytes came)."""
        loop, handle = self._loop, self._handle
        assert loop is not None and handle is not None  # noqa: PT018, S101  # started
        self.gap, self.hard, self.phase = gap, hard, phase
        self.last = loop.time()
        if self._due() < handle.when():
            handle.cancel()
            self._handle = loop.call_at(self._due(), self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def expire(self, phase: Phase) -> None:
        """Expire the guarded block now, as ``phase`` (unless it has already expired)."""
        loop, timeout = self._loop, self._timeout
        if self.expired is not None or loop is None or timeout is None:
            return
        if self._handle is not None:
            self._handle.cancel()
        self.expired = phase
        timeout.reschedule(loop.time())

    def _due(self) -> float:
        due = self.last + self.gap
        hard = self.hard
        return due if hard is None or hard > due else hard

    def _check(self) -> None:
        loop, timeout = self._loop, self._timeout
        assert loop is not None and timeout is not None  # noqa: PT018, S101  # started
        now = loop.time()
        due = self._due()
        if now < due:
            self._handle = loop.call_at(due, self._check)
            return
        hard = self.hard
        if self.expired is None:
            self.expired = Phase.DEADLINE if hard is not None and now >= hard else self.phase
            timeout.reschedule(now)
