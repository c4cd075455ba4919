"""The attempt budget and order of one request (``failover.py``), without any I/O.

Each test builds a pool of mock providers, asks ``Failover`` for backends one after
another, and tells it what each attempt did, as the proxy does: these are the rules of
SPEC §5 "Attempts" and "Breaker evidence" (a 5xx is retried on one backend at most once)
checked one by one.
"""

from __future__ import annotations

from typing import Any

import pytest

from berry_proxy.config import build_config
from berry_proxy.errors import FailureKind, ServiceUnavailable, UpstreamFailure
from berry_proxy.failover import Failover
from berry_proxy.pool import Backend, BackendPool

from .conftest import FakeClock


def config(backends: int = 2, **settings: Any) -> dict[str, Any]:
    return {
        "providers": {f"p{i}": {"type": "mock"} for i in range(backends)},
        "models": {
            "m": {"backends": [{"provider": f"p{i}", "model": "x"} for i in range(backends)]}
        },
        "users": {"u": {"token": "failover-unit-token-0123"}},
        "settings": settings,
    }


def make(
    backends: int = 2, clock: FakeClock | None = None, **settings: Any
) -> tuple[Failover, list[Backend], FakeClock]:
    clock = clock or FakeClock()
    built = build_config(config(backends, **settings), env={})
    pool = BackendPool(built, clock)
    plan = list(pool.backends["m"])
    return Failover(plan, built.settings, clock.now + 600, clock), plan, clock


def run(failover: Failover, kinds: dict[str, FailureKind | None]) -> list[str]:
    """Attempt every backend the order yields; each fails with its provider's kind (None:
    the attempt never left, e.g. saturated). Returns the providers tried, in order."""
    tried = []
    for backend in failover:
        tried.append(backend.provider.id)
        kind = kinds[backend.provider.id]
        if kind is not None:
            failover.sent(backend)
            failover.failed(backend, UpstreamFailure(kind, kind.value))
        else:
            failover.failed(backend, UpstreamFailure(FailureKind.SATURATED, "busy"))
    return tried


def test_each_planned_backend_once_then_transient_retries() -> None:
    failover, _, _ = make(2, max_retries=10, max_internal_retries=2)
    tried = run(failover, {"p0": FailureKind.NETWORK, "p1": FailureKind.NETWORK})
    assert tried == ["p0", "p1", "p0", "p1", "p0", "p1"]
    assert failover.attempts == 6


def test_a_5xx_is_retried_on_the_same_backend_at_most_once() -> None:
    failover, _, _ = make(2, max_retries=10, max_internal_retries=5)
    tried = run(failover, {"p0": FailureKind.SERVER, "p1": FailureKind.NETWORK})
    assert tried.count("p0") == 2
    assert tried.count("p1") == 6  # one try plus max_internal_retries


@pytest.mark.parametrize("kind", [FailureKind.RATE_LIMIT, FailureKind.AUTH, FailureKind.TIMEOUT])
def test_no_same_backend_retry_after_a_429_a_rejected_key_or_a_timeout(
    kind: FailureKind,
) -> None:
    failover, _, _ = make(1, max_retries=10, max_internal_retries=3)
    assert run(failover, {"p0": kind}) == ["p0"]


def test_max_retries_counts_attempts_sent_not_attempts_that_never_left() -> None:
    failover, _, _ = make(3, max_retries=2, max_internal_retries=0)
    # p0 is saturated (never sent): it does not use up the budget.
    tried = run(failover, {"p0": None, "p1": FailureKind.SERVER, "p2": FailureKind.SERVER})
    assert tried == ["p0", "p1", "p2"]
    assert failover.attempts == 2


def test_no_attempt_after_the_deadline() -> None:
    failover, _, clock = make(2, max_retries=10)
    order = iter(failover)
    first = next(order)
    failover.sent(first)
    failover.failed(first, UpstreamFailure(FailureKind.NETWORK, "reset"))
    clock.now += 601
    assert list(order) == []
    assert failover.final_error(lambda: pytest.fail("not asked")).code == "upstream_error"


def test_final_error_counts_attempts_sent() -> None:
    failover, _, _ = make(2, max_retries=10, max_internal_retries=0)
    run(failover, {"p0": None, "p1": FailureKind.SERVER})
    error = failover.final_error(lambda: pytest.fail("not asked"))
    assert error.code == "upstream_error"
    assert error.details == {"attempts": 1, "last_error": "server_error"}


def test_nothing_tried_before_the_deadline_is_no_healthy_backends() -> None:
    failover, _, _ = make(1)
    unavailable = ServiceUnavailable("no_healthy_backends", "none")
    assert failover.final_error(lambda: unavailable) is unavailable


def test_failures_are_kept_without_their_tracebacks() -> None:
    failover, plan, _ = make(1)
    try:
        try:
            raise ConnectionResetError("the wire")
        except ConnectionResetError:
            raise UpstreamFailure(FailureKind.NETWORK, "reset")  # noqa: B904  # chained on purpose
    except UpstreamFailure as failure:
        failover.failed(plan[0], failure)
    (kept,) = failover.failures
    assert (kept.__traceback__, kept.__context__, kept.__cause__) == (None, None, None)
