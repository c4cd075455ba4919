"""SmartAI (``smart_ai.py``, ``weights.py``): confidence, the weight formula, adaptation.

The headline requirement is measured twice, with an injected clock and RNG: at pool level
(the router's own loop, thousands of requests in milliseconds) and end to end through a
real gateway with fake upstreams. A backend that fails every request must get under 5% of
the traffic after 100 requests, and win its share back within 100 requests after it heals.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from berry_proxy.config import ConfidenceAdjustments, SmartAISettings, build_config
from berry_proxy.errors import FailureKind, UpstreamFailure
from berry_proxy.pool import Backend, BackendPool
from berry_proxy.routing import Router
from berry_proxy.smart_ai import DECAY_HALF_LIFE_SECONDS, Confidence
from berry_proxy.weights import MIN_LATENCY_FACTOR, weigh

from .conftest import (
    ADMIN_TOKEN,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    failed,
    gateway_config,
    served,
)

SETTINGS = SmartAISettings()


# --------------------------------------------------------------------------------------
# Confidence
# --------------------------------------------------------------------------------------


def test_confidence_starts_at_initial_and_rises_by_success_boost() -> None:
    settings = SmartAISettings(
        initial_confidence=0.5, confidence_adjustments=ConfidenceAdjustments(success_boost=0.05)
    )
    confidence = Confidence(settings, 0.0)
    assert confidence.value(0.0) == 0.5
    confidence.record(None, 0.0)
    assert confidence.value(0.0) == pytest.approx(0.55)
    for _ in range(100):
        confidence.record(None, 0.0)
    assert confidence.value(0.0) == 1.0, "capped at 1"


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        (FailureKind.NETWORK, "network_error_penalty"),
        (FailureKind.TIMEOUT, "timeout_penalty"),
        (FailureKind.SERVER, "server_error_penalty"),
        (FailureKind.RATE_LIMIT, "rate_limit_penalty"),
        (FailureKind.AUTH, "auth_error_penalty"),
        (FailureKind.PROTOCOL, "model_error_penalty"),
    ],
)
def test_each_error_class_costs_its_own_penalty(kind: FailureKind, key: str) -> None:
    adjustments = ConfidenceAdjustments(**{key: 0.123})
    confidence = Confidence(SmartAISettings(confidence_adjustments=adjustments), 0.0)
    confidence.record(kind, 0.0)
    assert confidence.value(0.0) == pytest.approx(0.8 - 0.123)


def test_confidence_never_falls_below_min_confidence() -> None:
    settings = SmartAISettings(min_confidence=0.2)
    confidence = Confidence(settings, 0.0)
    for _ in range(20):
        confidence.record(FailureKind.AUTH, 0.0)
    assert confidence.value(0.0) == 0.2


def test_stale_confidence_decays_toward_neutral() -> None:
    confidence = Confidence(SETTINGS, 0.0)
    for _ in range(10):
        confidence.record(FailureKind.SERVER, 0.0)
    low = confidence.value(0.0)
    assert low == SETTINGS.min_confidence
    half = confidence.value(DECAY_HALF_LIFE_SECONDS)
    assert half == pytest.approx(0.8 - (0.8 - low) / 2)
    assert confidence.value(20 * DECAY_HALF_LIFE_SECONDS) == pytest.approx(0.8, abs=1e-3)
    # High confidence decays down toward neutral too.
    high = Confidence(SETTINGS, 0.0)
    for _ in range(5):
        high.record(None, 0.0)
    assert high.value(DECAY_HALF_LIFE_SECONDS) == pytest.approx(0.9)


def test_time_decay_can_be_disabled() -> None:
    confidence = Confidence(SmartAISettings(enable_time_decay=False), 0.0)
    confidence.record(FailureKind.SERVER, 0.0)
    assert confidence.value(1e6) == pytest.approx(0.6)


# --------------------------------------------------------------------------------------
# The formula
# --------------------------------------------------------------------------------------


def smart_pool(
    settings: dict[str, Any] | None = None, tags: tuple[list[str], list[str]] = ([], [])
) -> tuple[BackendPool, Router, FakeClock]:
    raw: dict[str, Any] = {
        "providers": {"a": {"type": "mock"}, "b": {"type": "mock"}},
        "models": {
            "chat": {
                "strategy": "smart_ai",
                "backends": [
                    {"provider": "a", "model": "m", "tags": tags[0]},
                    {"provider": "b", "model": "m", "tags": tags[1]},
                ],
            }
        },
        "users": {"u": {"token": "smart-ai-token-0123456789"}},
        "settings": settings or {},
    }
    clock = FakeClock()
    pool = BackendPool(build_config(raw, env={}), clock)
    return pool, Router(pool, random.Random(1234)), clock


def effective(router: Router, backend: Backend) -> float:
    return router.breakdowns(backend.model, [backend])[0].effective_weight


def test_fresh_backends_weigh_weight_times_confidence_times_bonus() -> None:
    pool, router, _ = smart_pool(tags=(["premium"], []))
    a, b = pool.backends["chat"]
    assert effective(router, a) == pytest.approx(0.8)  # premium: no bonus
    assert effective(router, b) == pytest.approx(0.8 * 1.1)


def test_latency_factor_is_relative_to_the_fastest_backend() -> None:
    pool, router, _ = smart_pool({"smart_ai": {"exploration_ratio": 0.0}})
    a, b = pool.backends["chat"]
    served(pool, a, 0.5)
    served(pool, b, 1.0)
    breakdown = router.breakdowns(b.model, [a, b])
    assert [w.latency_factor for w in breakdown] == [1.0, 0.5]
    assert breakdown[1].effective_weight == pytest.approx(breakdown[0].effective_weight / 2)
    served(pool, b, 1000.0)
    assert router.breakdowns(b.model, [b])[0].latency_factor == MIN_LATENCY_FACTOR


def test_exploration_ratio_is_the_share_of_weight_latency_does_not_touch() -> None:
    for ratio, expected in ((0.0, 0.5), (0.2, 0.6), (1.0, 1.0)):
        pool, router, _ = smart_pool({"smart_ai": {"exploration_ratio": ratio}})
        a, b = pool.backends["chat"]
        served(pool, a, 0.5)
        served(pool, b, 1.0)
        wa, wb = (w.effective_weight for w in router.breakdowns(a.model, [a, b]))
        assert wb / wa == pytest.approx(expected), ratio


def test_error_factor_follows_the_failure_streak() -> None:
    pool, router, _ = smart_pool({"circuit_breaker_failure_threshold": 100})
    a, _ = pool.backends["chat"]
    failure = UpstreamFailure(FailureKind.SERVER, "boom")
    factors = []
    for _ in range(3):
        failed(pool, a, failure)
        factors.append(router.breakdowns(a.model, [a])[0].error_factor)
    assert factors == [1 / 2, 1 / 3, 1 / 4]
    served(pool, a, 0.1)
    assert router.breakdowns(a.model, [a])[0].error_factor == 1.0


def test_health_factor_halves_a_backend_whose_probe_failed() -> None:
    pool, router, _ = smart_pool()
    a, b = pool.backends["chat"]
    pool.record_probe(a.provider, "health check timed out")
    assert router.breakdowns(a.model, [a])[0].health_factor == 0.5
    assert effective(router, a) == pytest.approx(effective(router, b) / 2)


def test_non_premium_stability_bonus_takes_effect() -> None:
    pool, router, _ = smart_pool({"smart_ai": {"non_premium_stability_bonus": 1.5}})
    a, _ = pool.backends["chat"]
    assert effective(router, a) == pytest.approx(0.8 * 1.5)


def test_weigh_is_what_the_router_draws_with() -> None:
    """The router's draw follows the effective weights shown by the views."""
    pool, router, clock = smart_pool({"circuit_breaker_failure_threshold": 100})
    a, b = pool.backends["chat"]
    for _ in range(2):
        failed(pool, b, UpstreamFailure(FailureKind.SERVER, "boom"))
    wa = weigh(a, pool.config.settings.smart_ai, None, clock()).effective_weight
    wb = weigh(b, pool.config.settings.smart_ai, None, clock()).effective_weight
    model, user = pool.config.models["chat"], pool.config.users["u"]
    draws = 20_000
    firsts = Counter(router.plan(model, user)[0].provider.id for _ in range(draws))
    p = wb / (wa + wb)
    assert abs(firsts["b"] / draws - p) < 0.015, (firsts, p)


# --------------------------------------------------------------------------------------
# Adaptation, at pool level
# --------------------------------------------------------------------------------------


def serve(
    pool: BackendPool,
    router: Router,
    clock: FakeClock,
    broken: set[str] | Callable[[Backend], bool],
    requests: int,
) -> list[str]:
    """Serve ``requests`` like the proxy does; returns each request's first pick.

    ``broken``: the providers that fail every request, or a predicate deciding per try.
    """
    fails = broken if callable(broken) else (lambda backend: backend.provider.id in broken)
    model, user = pool.config.models["chat"], pool.config.users["u"]
    firsts = []
    for _ in range(requests):
        clock.now += 0.05  # 20 requests per second
        order = router.plan(model, user)
        firsts.append(order[0].provider.id)
        for backend in order:
            ticket = pool.begin(backend)
            if ticket is None:
                continue
            try:
                if fails(backend):
                    pool.record_failure(backend, UpstreamFailure(FailureKind.SERVER, "500"), ticket)
                    continue
                pool.record_success(backend, 0.2, ticket)
                break
            finally:
                pool.end(backend, ticket)
        else:
            raise AssertionError("a request failed although one backend works")
    return firsts


@pytest.mark.parametrize("threshold", [5, 10_000], ids=["with-breaker", "smart-ai-alone"])
def test_a_failing_backend_loses_its_traffic_and_wins_it_back(threshold: int) -> None:
    pool, router, clock = smart_pool({"circuit_breaker_failure_threshold": threshold})
    warmup = serve(pool, router, clock, {"b"}, 100)
    assert 0 < warmup.count("b") < 20
    after = serve(pool, router, clock, {"b"}, 100)
    assert after.count("b") / 100 < 0.05, Counter(after)

    clock.now += 60  # it heals; a minute later (the default breaker window) ...
    healed = serve(pool, router, clock, set(), 100)
    share = healed[50:].count("b") / 50
    assert share >= 0.3, Counter(healed)  # a fair share is 50%


def test_a_healthy_pair_shares_evenly() -> None:
    pool, router, clock = smart_pool()
    firsts = serve(pool, router, clock, set(), 2000)
    assert abs(firsts.count("b") / 2000 - 0.5) < 0.05


def test_a_flaky_backend_keeps_a_share_while_failover_hides_its_errors() -> None:
    """Failing 30% of requests: it keeps serving (most of its requests succeed).

    The breaker is set aside here: five failures in a row do happen now and then at 30%
    and would open it for a minute, which is the breaker's call, not SmartAI's.
    """
    pool, router, clock = smart_pool({"circuit_breaker_failure_threshold": 10_000})
    rng = random.Random(5)
    picks = serve(pool, router, clock, lambda b: b.provider.id == "b" and rng.random() < 0.3, 2000)
    firsts = Counter(picks)
    assert 0.15 < firsts["b"] / 2000 < 0.5, firsts


# --------------------------------------------------------------------------------------
# Adaptation, end to end: a real gateway and fake upstreams
# --------------------------------------------------------------------------------------


async def test_end_to_end_traffic_moves_away_and_comes_back(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    good, bad = FakeUpstream(), FakeUpstream()
    for fake in (good, bad):
        fake.server = await aiohttp_server(fake.app())
    raw = gateway_config(good, bad)
    raw["models"]["gpt-test"]["strategy"] = "smart_ai"
    clock = FakeClock()
    server = await start_gateway(raw, clock=clock, rng=random.Random(42))
    bad.mode = "status"  # 500 to every request

    async def send(session: aiohttp.ClientSession, count: int, stream: bool) -> None:
        for _ in range(count):
            clock.now += 0.05
            body: dict[str, Any] = {
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": stream,
            }
            async with session.post(
                base_url(server) + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()

    async with aiohttp.ClientSession() as session:
        await send(session, 100, stream=False)
        before = len(bad.requests)
        await send(session, 50, stream=False)
        await send(session, 50, stream=True)
        assert len(bad.requests) - before < 5, "under 5% of 100 requests"

        bad.mode = "ok"
        clock.now += 60
        await send(session, 50, stream=True)
        before = len(bad.requests)
        await send(session, 50, stream=False)
        assert len(bad.requests) - before >= 15, "back to a fair share (25 of 50)"


def test_a_dead_fast_backend_is_not_the_latency_bar() -> None:
    """Once the fastest backend's breaker opens, the live ones are compared to each other."""
    pool, router, _ = smart_pool({"circuit_breaker_failure_threshold": 1})
    a, b = pool.backends["chat"]
    served(pool, a, 0.02)
    served(pool, b, 1.0)
    assert router.breakdowns(b.model, [b])[0].latency_factor == pytest.approx(0.1)
    failed(pool, a, UpstreamFailure(FailureKind.SERVER, "500"))  # a's breaker opens
    assert router.breakdowns(b.model, [b])[0].latency_factor == 1.0
