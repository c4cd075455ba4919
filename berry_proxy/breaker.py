"""The circuit breaker of one provider: a pure state machine on an injected clock.

States and transitions (Envoy's outlier-detection vocabulary, nginx's one-trial recovery)::

    closed ──(threshold consecutive failures, or a failure ratio ≥ 80% over the
    │         last RATIO_WINDOW outcomes)──▶ open
    open ──(open window elapsed)──▶ half-open
    half-open ──(the single trial succeeds, or a recovery probe succeeds)──▶ closed
    half-open ──(the trial fails)──▶ open, for a longer window
    open ──(a recovery probe succeeds)──▶ closed

The open window starts at ``circuit_breaker_timeout_seconds`` and doubles with every trip
that follows another without a close in between, up to ``MAX_OPEN_MULTIPLIER`` times the
base. The caller decides what counts: caller errors (400/404/413/422), client disconnects
and the gateway's own saturation are never reported here.

No I/O and no ``await``: the clock is passed in, so tests drive time by hand.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

Clock = Callable[[], float]

# A trip that follows another without a close in between doubles the open window, up to
# this many times the configured timeout (Envoy caps its ejection time the same way).
MAX_OPEN_MULTIPLIER = 8
# The failure-ratio rule looks at this many latest outcomes and trips at this ratio; it
# catches a provider failing most requests but never `threshold` times in a row. High on
# purpose: a provider failing 30% of requests is flaky, not down; failover hides its errors
# and SmartAI already weighs it down. (Envoy's failure-percentage default is 85%.)
RATIO_WINDOW = 20
RATIO_THRESHOLD = 0.8


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The state as a number (0 closed, 1 half-open, 2 open), for Prometheus."""
        return _GAUGE[self]


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Ticket(NamedTuple):
    """The right to send one request, from ``acquire``; hand it back with the outcome.

    ``generation`` counts the breaker's trips when it was issued: the outcome of a request
    that began before the latest trip is old news and moves nothing. ``trial`` marks the
    half-open state's single trial request, the only one whose outcome decides it.
    """

    generation: int
    trial: bool


class CircuitBreaker:
    def __init__(self, failure_threshold: int, open_seconds: float, clock: Clock) -> None:
        self.failure_threshold = failure_threshold
        self.base_open_seconds = open_seconds
        self.clock = clock
        self._state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self._outcomes: deque[bool] = deque(maxlen=RATIO_WINDOW)  # True = failure
        self._opened_at = 0.0
        self.open_seconds = open_seconds  # the current open window
        self._trips_in_a_row = 0
        self._trial_in_flight = False
        self.total_trips = 0

    def retune(self, failure_threshold: int, open_seconds: float) -> None:
        """New settings (a reload); the state, and an open window already set, stay."""
        self.failure_threshold = failure_threshold
        self.base_open_seconds = open_seconds

    @property
    def state(self) -> BreakerState:
        """The state now; an open breaker whose window has passed reads as half-open."""
        if self._state is BreakerState.OPEN and self.clock() >= self.reopens_at:
            self._state = BreakerState.HALF_OPEN
            self._trial_in_flight = False
        return self._state

    @property
    def reopens_at(self) -> float:
        """When an open breaker lets a trial request through (clock seconds)."""
        return self._opened_at + self.open_seconds

    def available(self) -> bool:
        """May a request be sent now? (Closed, or half-open with its trial still free.)"""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._trial_in_flight
        )

    def acquire(self) -> Ticket | None:
        """Claim the right to send one request; None if the breaker refuses it.

        In half-open state only one request (the trial) is let through until it settles.
        """
        if self._state is BreakerState.CLOSED:  # the usual case, without the clock
            return Ticket(self.total_trips, False)
        if not self.available():
            return None
        trial = self._state is BreakerState.HALF_OPEN
        if trial:
            self._trial_in_flight = True
        return Ticket(self.total_trips, trial)

    def release(self, ticket: Ticket) -> None:
        """The request is over; if it was the trial and recorded no outcome (a caller
        error, a departed client), the next request may be the trial instead.
        """
        if ticket.trial and ticket.generation == self.total_trips:
            self._trial_in_flight = False

    def record_success(self, ticket: Ticket) -> bool:
        """A request admitted with ``ticket`` succeeded; True if that closed the breaker."""
        if ticket.generation != self.total_trips:
            return False  # began before the latest trip: stale news, the window stands
        if self._state is not BreakerState.CLOSED and self.state is BreakerState.HALF_OPEN:
            if ticket.trial:
                self._close()
                return True
            return False
        self._closed_outcome(failed=False)
        return False

    def record_failure(self, ticket: Ticket) -> bool:
        """A request admitted with ``ticket`` failed; True if that opened the breaker."""
        if ticket.generation != self.total_trips:
            return False
        if self._state is not BreakerState.CLOSED and self.state is BreakerState.HALF_OPEN:
            if ticket.trial:
                self._trip()
                return True
            return False
        return self._closed_outcome(failed=True)

    def _closed_outcome(self, failed: bool) -> bool:
        """Count one outcome while closed; trip (and say so) when the rules say so."""
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0
        self._outcomes.append(failed)
        if failed and self._should_trip():
            self._trip()
            return True
        return False

    def record_probe(self, ok: bool) -> None:
        """A health probe's result: it counts like a request's outcome, and a success
        also closes an open breaker (whichever comes first, a good trial or a good probe).
        """
        state = self.state
        if state is BreakerState.CLOSED:
            self._closed_outcome(failed=not ok)
        elif ok:
            self._close()
        elif state is BreakerState.HALF_OPEN:
            self._trip()

    def _should_trip(self) -> bool:
        if self.consecutive_failures >= self.failure_threshold:
            return True
        outcomes = self._outcomes
        return len(outcomes) == RATIO_WINDOW and sum(outcomes) >= RATIO_THRESHOLD * RATIO_WINDOW

    def _trip(self) -> None:
        self._trips_in_a_row += 1
        self.total_trips += 1
        multiplier = min(2 ** (self._trips_in_a_row - 1), MAX_OPEN_MULTIPLIER)
        self.open_seconds = self.base_open_seconds * multiplier
        self._opened_at = self.clock()
        self._state = BreakerState.OPEN
        self._trial_in_flight = False

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._trips_in_a_row = 0
        self.open_seconds = self.base_open_seconds
        self.consecutive_failures = 0
        self._outcomes.clear()
        self._trial_in_flight = False
