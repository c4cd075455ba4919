"""The circuit breaker's transitions, driven by a fake clock (``breaker.py``)."""

from __future__ import annotations

import pytest

from berry_proxy.breaker import (
    MAX_OPEN_MULTIPLIER,
    RATIO_WINDOW,
    BreakerState,
    CircuitBreaker,
    Ticket,
)

from .conftest import FakeClock

THRESHOLD = 3
OPEN_SECONDS = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(THRESHOLD, OPEN_SECONDS, clock)


def state(breaker: CircuitBreaker) -> BreakerState:
    """The state, read through a call: mypy would narrow a property across asserts."""
    return breaker.state


def fail(breaker: CircuitBreaker) -> None:
    """One request, admitted now, that fails."""
    ticket = breaker.acquire()
    assert ticket is not None
    breaker.record_failure(ticket)


def succeed(breaker: CircuitBreaker) -> None:
    """One request, admitted now, that succeeds."""
    ticket = breaker.acquire()
    assert ticket is not None
    breaker.record_success(ticket)


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD):
        fail(breaker)
    assert state(breaker) is BreakerState.OPEN


def half_open_trial(breaker: CircuitBreaker, clock: FakeClock) -> Ticket:
    """Trip the breaker, let its window pass, and take the trial."""
    trip(breaker)
    clock.now += OPEN_SECONDS
    trial = breaker.acquire()
    assert trial is not None
    assert trial.trial
    return trial


def test_starts_closed_and_lets_requests_through(breaker: CircuitBreaker) -> None:
    assert state(breaker) is BreakerState.CLOSED
    assert all(breaker.acquire() for _ in range(100))


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD - 1):
        fail(breaker)
    assert state(breaker) is BreakerState.CLOSED
    fail(breaker)
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.available()
    assert not breaker.acquire()


def test_a_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    # Two failures in a row, then successes: never THRESHOLD in a row, 40% failures.
    for _ in range(10):
        fail(breaker)
        fail(breaker)
        for _ in range(3):
            succeed(breaker)
    assert state(breaker) is BreakerState.CLOSED


def test_a_high_failure_ratio_opens_it_without_a_streak(clock: FakeClock) -> None:
    breaker = CircuitBreaker(5, OPEN_SECONDS, clock)
    # Four failures, one success: never 5 in a row, but 80% of outcomes are failures.
    pattern = [fail, fail, fail, fail, succeed] * RATIO_WINDOW
    for outcome in pattern:
        if state(breaker) is BreakerState.OPEN:
            break
        outcome(breaker)
    assert state(breaker) is BreakerState.OPEN


def test_a_low_failure_ratio_never_opens_it(breaker: CircuitBreaker) -> None:
    # 30% failures, never two in a row: the breaker stays closed.
    for i in range(10 * RATIO_WINDOW):
        if i % 10 in (0, 4, 7):
            fail(breaker)
        else:
            succeed(breaker)
    assert state(breaker) is BreakerState.CLOSED


def test_half_open_after_the_timeout_admits_one_trial(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    clock.now += OPEN_SECONDS - 0.001
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.001
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.acquire(), "the trial"
    assert not breaker.acquire(), "only one trial at a time"
    assert not breaker.available()


def test_successful_trial_closes(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.now += OPEN_SECONDS
    succeed(breaker)  # the trial
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.acquire()
    assert breaker.acquire()


def test_failed_trial_reopens_for_a_growing_window(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trip(breaker)
    windows = [breaker.open_seconds]
    for _ in range(6):
        clock.now += breaker.open_seconds
        fail(breaker)  # the trial
        assert state(breaker) is BreakerState.OPEN
        windows.append(breaker.open_seconds)
    cap = OPEN_SECONDS * MAX_OPEN_MULTIPLIER
    assert windows == [10.0, 20.0, 40.0, 80.0, cap, cap, cap]
    # Just before the grown window ends it is still open.
    clock.now += cap - 1
    assert state(breaker) is BreakerState.OPEN


def test_closing_resets_the_window(breaker: CircuitBreaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.now += OPEN_SECONDS
    fail(breaker)
    assert breaker.open_seconds == 2 * OPEN_SECONDS
    clock.now += breaker.open_seconds
    succeed(breaker)
    trip(breaker)
    assert breaker.open_seconds == OPEN_SECONDS


def test_a_trial_that_settles_nothing_frees_the_slot(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A caller error or a departed client says nothing: the next request gets the trial."""
    trial = half_open_trial(breaker, clock)
    breaker.release(trial)
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.acquire()


def test_probe_success_closes_an_open_breaker(breaker: CircuitBreaker) -> None:
    trip(breaker)
    breaker.record_probe(ok=True)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0


def test_probe_failures_count_like_request_failures(breaker: CircuitBreaker) -> None:
    for _ in range(THRESHOLD):
        breaker.record_probe(ok=False)
    assert state(breaker) is BreakerState.OPEN
    # A failed probe of an open breaker changes nothing (the window is not extended).
    reopens = breaker.reopens_at
    breaker.record_probe(ok=False)
    assert breaker.reopens_at == reopens


def test_probe_success_while_closed_breaks_a_failure_streak(breaker: CircuitBreaker) -> None:
    """Failures separated by good probes are not consecutive."""
    for _ in range(5 * THRESHOLD):
        fail(breaker)
        breaker.record_probe(ok=True)
    assert state(breaker) is BreakerState.CLOSED


def test_gauge_values() -> None:
    assert [s.gauge for s in BreakerState] == [0, 1, 2]


def test_outcomes_of_requests_begun_before_a_trip_are_stale(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A request admitted before the trip settles nothing after it: a late success does
    not close the breaker, a late failure does not re-trip it or spoil the real trial.
    """
    early = [breaker.acquire() for _ in range(3)]
    trip(breaker)
    assert early[0] is not None
    breaker.record_success(early[0])
    assert state(breaker) is BreakerState.OPEN
    clock.now += OPEN_SECONDS
    trial = breaker.acquire()
    assert trial is not None
    assert early[1] is not None
    breaker.record_failure(early[1])  # e.g. a request that hung until a timeout
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.open_seconds == OPEN_SECONDS
    assert early[2] is not None
    breaker.release(early[2])
    assert breaker.acquire() is None, "another request's end does not free the trial"
    breaker.record_success(trial)
    assert state(breaker) is BreakerState.CLOSED


def test_only_the_trial_decides_a_half_open_breaker(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    trial = half_open_trial(breaker, clock)
    breaker.record_failure(trial)
    assert state(breaker) is BreakerState.OPEN
