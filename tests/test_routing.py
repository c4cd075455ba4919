"""Routing (``strategies.py``, ``routing.py``): which backends a request may try, in what order.

Each strategy is checked on its own: draws follow the weights within statistical
tolerance (seeded RNG, so deterministic), round robin in its exact order, failover by
tiers, least latency by power of two choices. The router's shared rules follow: disabled
backends/providers, other users' tagged backends and open breakers are never tried; a
half-open backend gets its trial first; a provider cooling down after a 429 goes last; no
eligible backend at all is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web

from berry_proxy import keys, strategies
from berry_proxy.breaker import BreakerState
from berry_proxy.config import STRATEGIES, Config, build_config
from berry_proxy.errors import FailureKind, ServiceUnavailable, UpstreamFailure
from berry_proxy.pool import Backend, BackendPool
from berry_proxy.routing import Router
from berry_proxy.strategies import (
    EXPLORATION,
    Failover,
    LeastLatency,
    SmoothRoundRobin,
    Strategy,
    UniformRandom,
    WeightedFailover,
    WeightedRandom,
    make_strategy,
)

from .conftest import (
    ADMIN_TOKEN,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    failed,
    gateway_config,
    served,
)

DRAWS = 20_000


def raw_config() -> dict[str, Any]:
    token = iter(f"routing-token-{i:012d}" for i in range(100))
    return {
        "providers": {
            "light": {"type": "mock"},
            "medium": {"type": "mock"},
            "heavy": {"type": "mock"},
            "eu": {"type": "mock"},
            "us": {"type": "mock"},
            "off": {"type": "mock", "enabled": False},
        },
        "models": {
            "weighted": {
                "strategy": "weighted_random",
                "backends": [
                    {"provider": "light", "model": "m", "weight": 1},
                    {"provider": "medium", "model": "m", "weight": 3},
                    {"provider": "heavy", "model": "m", "weight": 6},
                ],
            },
            "filtered": {
                "strategy": "weighted_random",
                "backends": [
                    {"provider": "light", "model": "plain"},
                    {"provider": "medium", "model": "disabled", "enabled": False},
                    {"provider": "off", "model": "provider-disabled"},
                    {"provider": "eu", "model": "eu-only", "tags": ["eu"]},
                    {"provider": "us", "model": "us-only", "tags": ["us"]},
                    {"provider": "heavy", "model": "eu-premium", "tags": ["premium", "eu"]},
                ],
            },
            "single": {"backends": [{"provider": "light", "model": "only"}]},
            "nothing-usable": {
                "backends": [
                    {"provider": "off", "model": "a"},
                    {"provider": "light", "model": "b", "enabled": False},
                ]
            },
        },
        "users": {
            "untagged": {"token": next(token)},
            "eu-user": {"token": next(token), "tags": ["eu"]},
            "us-user": {"token": next(token), "tags": ["us"]},
            "both": {"token": next(token), "tags": ["us", "eu"]},
            "other": {"token": next(token), "tags": ["apac"]},
        },
    }


@pytest.fixture
def config() -> Config:
    return build_config(raw_config(), env={})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(config: Config, clock: FakeClock) -> BackendPool:
    return BackendPool(config, clock, lambda: 1_700_000_000.0)


def names(backends: list[Backend]) -> list[str]:
    return [b.config.model if b.model.id == "filtered" else b.provider.id for b in backends]


def within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    expected = total * p
    return abs(count - expected) <= sigmas * math.sqrt(total * p * (1 - p))


def weights(backends: Sequence[Backend]) -> list[float]:
    return [b.config.weight for b in backends]


def first_picks(
    strategy: Strategy, backends: Sequence[Backend], seed: int, draws: int = DRAWS
) -> Counter[str]:
    rng = random.Random(seed)
    w = weights(backends)
    return Counter(strategy.order(backends, w, rng)[0].provider.id for _ in range(draws))


def fail(pool: BackendPool, backend: Backend, kind: FailureKind = FailureKind.NETWORK) -> None:
    failed(pool, backend, UpstreamFailure(kind, "boom"))


def open_breaker(pool: BackendPool, backend: Backend) -> None:
    for _ in range(pool.config.settings.circuit_breaker_failure_threshold):
        fail(pool, backend)
    assert backend.provider.breaker.state is BreakerState.OPEN


# --------------------------------------------------------------------------------------
# Every strategy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_orders_a_permutation(pool: BackendPool, name: str) -> None:
    backends = pool.backends["weighted"]
    strategy = make_strategy(name)
    rng = random.Random(3)
    for _ in range(200):
        order = strategy.order(backends, weights(backends), rng)
        assert sorted(b.index for b in order) == [0, 1, 2]
    assert strategy.order([], [], rng) == []


# --------------------------------------------------------------------------------------
# weighted_random, random
# --------------------------------------------------------------------------------------


def test_weighted_random_first_pick_is_proportional_to_weight(pool: BackendPool) -> None:
    firsts = first_picks(WeightedRandom(), pool.backends["weighted"], 20240611)
    for provider, p in (("light", 0.1), ("medium", 0.3), ("heavy", 0.6)):
        assert within(firsts[provider], DRAWS, p), (provider, firsts)


def test_weighted_random_failover_order_still_prefers_heavier(pool: BackendPool) -> None:
    # After the heaviest is drawn first, the second pick follows the remaining weights 1:3.
    backends = pool.backends["weighted"]
    rng = random.Random(7)
    seconds: Counter[str] = Counter()
    for _ in range(DRAWS):
        order = WeightedRandom().order(backends, weights(backends), rng)
        if order[0].provider.id == "heavy":
            seconds[order[1].provider.id] += 1
    total = sum(seconds.values())
    assert within(total, DRAWS, 0.6)
    assert within(seconds["medium"], total, 0.75), seconds


def test_weighted_random_same_seed_same_orders(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]

    def orders(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [names(WeightedRandom().order(backends, weights(backends), rng)) for _ in range(50)]

    assert orders(5) == orders(5)
    assert orders(5) != orders(6)


def test_random_ignores_weights(pool: BackendPool) -> None:
    firsts = first_picks(UniformRandom(), pool.backends["weighted"], 99)
    for provider in ("light", "medium", "heavy"):
        assert within(firsts[provider], DRAWS, 1 / 3), firsts


# --------------------------------------------------------------------------------------
# round_robin
# --------------------------------------------------------------------------------------


def test_round_robin_is_nginx_smooth_weighted_order(pool: BackendPool) -> None:
    backends = pool.backends["weighted"][:3]
    strategy = SmoothRoundRobin()
    rng = random.Random(0)
    picks = [strategy.order(backends, [5.0, 1.0, 1.0], rng)[0].provider.id for _ in range(14)]
    cycle = ["light", "light", "medium", "light", "heavy", "light", "light"]
    assert picks == cycle + cycle


def test_round_robin_equal_weights_take_turns(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]
    strategy = SmoothRoundRobin()
    rng = random.Random(0)
    picks = [strategy.order(backends, [1.0, 1.0, 1.0], rng)[0].provider.id for _ in range(6)]
    assert picks == ["light", "medium", "heavy"] * 2


def test_round_robin_failover_order_follows_the_next_turns(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]
    order = SmoothRoundRobin().order(backends, [5.0, 3.0, 1.0], random.Random(0))
    assert names(order) == ["light", "medium", "heavy"]


# --------------------------------------------------------------------------------------
# least_latency
# --------------------------------------------------------------------------------------


def test_least_latency_tries_unmeasured_backends_first(pool: BackendPool) -> None:
    light, medium, heavy = pool.backends["weighted"]
    served(pool, light, 0.010)
    served(pool, medium, 0.500)
    rng = random.Random(1)
    for _ in range(50):
        order = LeastLatency().order([light, medium, heavy], [1.0] * 3, rng)
        assert order[0] is heavy
        assert order[1:] == [light, medium]


def test_least_latency_keeps_a_fast_backend_ahead_of_two_slow_ones(pool: BackendPool) -> None:
    """The issue's case: one backend answering at once, two 250 ms slower. Only
    exploration (2 %) ever lets a slow one lead."""
    light, medium, heavy = pool.backends["weighted"]
    for backend, latency in ((light, 0.01), (medium, 0.26), (heavy, 0.26)):
        served(pool, backend, latency)
    firsts = first_picks(LeastLatency(), [light, medium, heavy], 5)
    assert firsts["light"] >= 0.95 * DRAWS, firsts
    assert within(firsts["light"], DRAWS, 1 - EXPLORATION), firsts


def test_least_latency_shares_the_load_among_near_equal_backends(pool: BackendPool) -> None:
    light, medium, heavy = pool.backends["weighted"]
    for backend, latency in ((light, 0.100), (medium, 0.140), (heavy, 0.900)):
        served(pool, backend, latency)  # 0.14 is within 1.5x of 0.1: both are the best
    firsts = first_picks(LeastLatency(), [light, medium, heavy], 6)
    for fast in ("light", "medium"):
        assert 0.40 * DRAWS <= firsts[fast] <= 0.60 * DRAWS, firsts
    assert within(firsts["heavy"], DRAWS, EXPLORATION), firsts


def test_least_latency_best_means_within_one_and_a_half_times_or_five_ms(
    pool: BackendPool,
) -> None:
    light, medium, _ = pool.backends["weighted"]
    served(pool, light, 0.100)
    served(pool, medium, 0.160)  # 1.6x: not among the best
    firsts = first_picks(LeastLatency(), [light, medium], 7)
    assert within(firsts["light"], DRAWS, 1 - EXPLORATION), firsts
    light.stats.unary_latency_ewma, medium.stats.unary_latency_ewma = 0.002, 0.006
    firsts = first_picks(LeastLatency(), [light, medium], 8)  # 3x, but only 4 ms apart
    assert 0.40 * DRAWS <= firsts["light"] <= 0.60 * DRAWS, firsts


def test_least_latency_compares_streams_and_plain_requests_apart(pool: BackendPool) -> None:
    """``light`` starts streams at once but is slow to finish long answers; ``medium`` is
    the other way round: each leads for its kind."""
    light, medium, _ = pool.backends["weighted"]
    served(pool, light, 0.05, stream=True)
    served(pool, light, 3.0, stream=False)
    served(pool, medium, 0.8, stream=True)
    served(pool, medium, 0.5, stream=False)
    strategy, rng = LeastLatency(), random.Random(9)
    streams = Counter(
        strategy.order([light, medium], [1.0, 1.0], rng, stream=True)[0].provider.id
        for _ in range(1000)
    )
    plain = Counter(
        strategy.order([light, medium], [1.0, 1.0], rng, stream=False)[0].provider.id
        for _ in range(1000)
    )
    assert streams["light"] >= 950, streams
    assert plain["medium"] >= 950, plain


def test_least_latency_a_backend_turning_slow_loses_its_lead_and_wins_it_back(
    pool: BackendPool,
) -> None:
    """Each request goes to the lead, which is measured: ``light`` is fast, then 300 ms
    slower for a while, then fast again. It loses the lead within a few requests, and
    exploration measures it again, so it wins the lead back within a bounded number."""
    light, medium, heavy = pool.backends["weighted"]
    backends = [light, medium, heavy]
    for backend, latency in ((light, 0.01), (medium, 0.2), (heavy, 0.2)):
        served(pool, backend, latency)
    strategy, rng = LeastLatency(), random.Random(10)
    slow_light = False

    def serve_one() -> Backend:
        lead = strategy.order(backends, [1.0] * 3, rng)[0]
        if lead is light:
            served(pool, light, 0.5 if slow_light else 0.01)
        else:
            served(pool, lead, 0.2)
        return lead

    assert [serve_one() for _ in range(20)].count(light) >= 18
    slow_light = True
    leads = [serve_one() for _ in range(50)]
    lost_after = next(i for i in range(len(leads)) if light not in leads[i : i + 10])
    # A few slow answers move its average past 1.5x the others': it stops leading.
    assert lost_after <= 20, [b.provider.id for b in leads]
    slow_light = False
    leads = [serve_one() for _ in range(500)]
    back_at = next(i for i in range(len(leads)) if leads[i : i + 20].count(light) >= 18)
    # One exploration (2 %) measures it again; a few fast answers bring it back.
    assert back_at <= 300, [b.provider.id for b in leads]


def test_least_latency_follows_the_moving_average(pool: BackendPool) -> None:
    light, medium, _ = pool.backends["weighted"]
    served(pool, light, 0.1)
    served(pool, medium, 0.2)
    for _ in range(10):
        served(pool, light, 1.0)  # light got slow
    order = LeastLatency().order([light, medium], [1.0, 1.0], random.Random(0))
    assert order == [medium, light]


# --------------------------------------------------------------------------------------
# failover, weighted_failover
# --------------------------------------------------------------------------------------


def tiered_config() -> Config:
    raw = raw_config()
    raw["models"]["tiered"] = {
        "strategy": "failover",
        "backends": [
            {"provider": "light", "model": "backup", "priority": 1},
            {"provider": "medium", "model": "primary-a", "priority": 0, "weight": 3},
            {"provider": "heavy", "model": "primary-b", "priority": 0, "weight": 1},
            {"provider": "eu", "model": "last", "priority": 2},
        ],
    }
    return build_config(raw, env={})


def test_failover_tries_tiers_in_priority_order() -> None:
    pool = BackendPool(tiered_config())
    backends = pool.backends["tiered"]
    rng = random.Random(8)
    firsts: Counter[str] = Counter()
    for _ in range(4000):
        order = [b.config.model for b in Failover().order(backends, weights(backends), rng)]
        assert set(order[:2]) == {"primary-a", "primary-b"}
        assert order[2:] == ["backup", "last"]
        firsts[order[0]] += 1
    # Within a tier: weighted random (3:1).
    assert within(firsts["primary-a"], 4000, 0.75), firsts


def test_failover_moves_an_unhealthy_tier_behind_the_healthy_ones() -> None:
    pool = BackendPool(tiered_config())
    backends = pool.backends["tiered"]
    for provider in ("medium", "heavy"):
        pool.record_probe(pool.providers[provider], "health check answered HTTP 503")
    order = Failover().order(backends, weights(backends), random.Random(0))
    models = [b.config.model for b in order]
    assert models[:2] == ["backup", "last"]
    assert set(models[2:]) == {"primary-a", "primary-b"}, "last resort, still tried"


def test_weighted_failover_prefers_healthy_then_all(pool: BackendPool) -> None:
    light, medium, heavy = pool.backends["weighted"]
    pool.record_probe(heavy.provider, "health check timed out")
    rng = random.Random(4)
    firsts: Counter[str] = Counter()
    for _ in range(DRAWS):
        order = WeightedFailover().order([light, medium, heavy], [1.0, 3.0, 6.0], rng)
        assert order[-1] is heavy
        firsts[order[0].provider.id] += 1
    assert within(firsts["medium"], DRAWS, 0.75), firsts


def test_smart_weighted_failover_stages_a_recovering_backend(
    config: Config, clock: FakeClock
) -> None:
    raw = raw_config()
    raw["models"]["weighted"]["strategy"] = "smart_weighted_failover"
    raw["settings"] = {"circuit_breaker_failure_threshold": 2}
    cfg = build_config(raw, env={})
    pool = BackendPool(cfg, clock)
    router = Router(pool, random.Random(0))
    model = cfg.models["weighted"]
    light, medium, heavy = pool.backends["weighted"]

    def effective(backend: Backend) -> float:
        return router.breakdowns(model, [backend])[0].effective_weight

    assert effective(heavy) == 6.0
    fail(pool, heavy)
    fail(pool, heavy)
    assert effective(heavy) == 0.0, "open: not eligible"
    clock.now += cfg.settings.circuit_breaker_timeout_seconds
    stages = []
    for _ in range(6):
        stages.append(effective(heavy) / 6.0)
        served(pool, heavy, 0.1)
    # Half-open trial at 10%; then 1-2 successes 30%, 3-4 50%, 5 fully back.
    assert stages == pytest.approx([0.1, 0.3, 0.3, 0.5, 0.5, 1.0])
    assert effective(light) == 1.0
    assert effective(medium) == 3.0


# --------------------------------------------------------------------------------------
# Router.plan: eligibility and the shared rules
# --------------------------------------------------------------------------------------


def plan(config: Config, pool: BackendPool, model: str, user: str, seed: int = 1) -> list[Backend]:
    router = Router(pool, random.Random(seed))
    return router.plan(config.models[model], config.users[user])


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        # An untagged user reaches every usable backend, tagged or not.
        ("untagged", {"plain", "eu-only", "us-only", "eu-premium"}),
        # A tagged user reaches backends sharing one of its tags, and untagged ones.
        ("eu-user", {"plain", "eu-only", "eu-premium"}),
        ("us-user", {"plain", "us-only"}),
        ("both", {"plain", "eu-only", "us-only", "eu-premium"}),
        ("other", {"plain"}),
    ],
)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_filters_disabled_and_other_tags(user: str, expected: set[str], strategy: str) -> None:
    raw = raw_config()
    raw["models"]["filtered"]["strategy"] = strategy
    config = build_config(raw, env={})
    pool = BackendPool(config)
    for seed in range(10):
        planned = names(plan(config, pool, "filtered", user, seed))
        assert len(planned) == len(set(planned))
        assert set(planned) == expected
        # Never a disabled backend, nor one whose provider is disabled.
        assert "disabled" not in planned
        assert "provider-disabled" not in planned


def test_plan_with_one_candidate(config: Config, pool: BackendPool) -> None:
    assert names(plan(config, pool, "single", "untagged")) == ["light"]


def test_plan_with_no_usable_backend_is_a_503(config: Config, pool: BackendPool) -> None:
    with pytest.raises(ServiceUnavailable) as caught:
        plan(config, pool, "nothing-usable", "untagged")
    assert caught.value.code == "no_healthy_backends"
    assert caught.value.details == {
        "model": "nothing-usable",
        "total_backends": 2,
        "healthy_backends": 0,
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_never_includes_an_open_breaker(strategy: str, clock: FakeClock) -> None:
    raw = raw_config()
    raw["models"]["weighted"]["strategy"] = strategy
    config = build_config(raw, env={})
    pool = BackendPool(config, clock)
    heavy = pool.backends["weighted"][2]
    open_breaker(pool, heavy)
    for seed in range(30):
        assert "heavy" not in names(plan(config, pool, "weighted", "untagged", seed))


def test_every_breaker_open_is_a_503_with_retry_after(
    config: Config, pool: BackendPool, clock: FakeClock
) -> None:
    for backend in pool.backends["weighted"]:
        open_breaker(pool, backend)
        clock.now += 7  # the later ones reopen later
    with pytest.raises(ServiceUnavailable) as caught:
        plan(config, pool, "weighted", "untagged")
    assert caught.value.code == "no_healthy_backends"
    assert caught.value.details == {"model": "weighted", "total_backends": 3, "healthy_backends": 0}
    # The first breaker opened 21 s ago and reopens after 60 s: retry in 39 s.
    timeout = config.settings.circuit_breaker_timeout_seconds
    assert caught.value.headers["Retry-After"] == str(int(timeout - 21))


def test_a_model_whose_only_trial_is_taken_is_a_503_retry_after_one_second(
    config: Config, pool: BackendPool, clock: FakeClock
) -> None:
    """Its breaker is half-open, not open: another request holds the trial. Nothing to
    wait for but that request, so no time in the future: come back in a second."""
    (only,) = pool.backends["single"]
    open_breaker(pool, only)
    clock.now += config.settings.circuit_breaker_timeout_seconds
    trial = pool.begin(only)
    assert trial is not None
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            plan(config, pool, "single", "untagged")
    finally:
        pool.end(only, trial)
    assert caught.value.code == "no_healthy_backends"
    assert caught.value.headers["Retry-After"] == "1"


def test_a_backend_whose_trial_is_taken_makes_retry_after_one_second_whatever_the_others(
    config: Config, pool: BackendPool, clock: FakeClock
) -> None:
    """One backend may be back any moment (its trial is in flight); another reopens only
    in 29 s. The soonest is what a client should wait for, not the other's reopening."""
    light, medium, heavy = pool.backends["weighted"]
    timeout = config.settings.circuit_breaker_timeout_seconds
    open_breaker(pool, light)
    clock.now += 31
    open_breaker(pool, medium)
    open_breaker(pool, heavy)
    clock.now += timeout - 31  # light is half-open; medium and heavy reopen in 31 s
    trial = pool.begin(light)
    assert trial is not None
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            plan(config, pool, "weighted", "untagged")
    finally:
        pool.end(light, trial)
    assert caught.value.headers["Retry-After"] == "1"


def test_a_half_open_backend_gets_its_trial_first(
    config: Config, pool: BackendPool, clock: FakeClock
) -> None:
    light = pool.backends["weighted"][0]
    open_breaker(pool, light)
    clock.now += config.settings.circuit_breaker_timeout_seconds
    for seed in range(20):
        assert plan(config, pool, "weighted", "untagged", seed)[0] is light
    # Once a request holds the trial, others do not wait for it: light is left out.
    trial = pool.begin(light)
    assert trial is not None
    for seed in range(20):
        assert light not in plan(config, pool, "weighted", "untagged", seed)
    pool.record_success(light, 0.2, trial)
    pool.end(light, trial)
    assert light.provider.breaker.state is BreakerState.CLOSED


def test_a_provider_cooling_down_after_429_goes_last(
    config: Config, pool: BackendPool, clock: FakeClock
) -> None:
    heavy = pool.backends["weighted"][2]
    failed(pool, heavy, UpstreamFailure(FailureKind.RATE_LIMIT, "429", status=429, retry_after=30))
    for seed in range(30):
        assert plan(config, pool, "weighted", "untagged", seed)[-1] is heavy
    assert heavy.provider.breaker.state is BreakerState.CLOSED, "a 429 is not a breakdown"
    clock.now += 30
    firsts = Counter(
        plan(config, pool, "weighted", "untagged", s)[0].provider.id for s in range(300)
    )
    assert firsts["heavy"] > 100, "after Retry-After it is back in the draw"


def test_first_pick_through_the_router_follows_weights(config: Config, pool: BackendPool) -> None:
    router = Router(pool, random.Random(99))
    model, user = config.models["weighted"], config.users["untagged"]
    firsts = Counter(router.plan(model, user)[0].provider.id for _ in range(DRAWS))
    for provider, p in (("light", 0.1), ("medium", 0.3), ("heavy", 0.6)):
        assert within(firsts[provider], DRAWS, p), (provider, firsts)


def test_failover_keeps_a_half_open_backup_in_its_tier(clock: FakeClock) -> None:
    """A lower tier is tried only after the tiers above: its trial does not jump them."""
    config = tiered_config()
    pool = BackendPool(config, clock)
    backup = next(b for b in pool.backends["tiered"] if b.config.model == "backup")
    open_breaker(pool, backup)
    clock.now += config.settings.circuit_breaker_timeout_seconds
    assert backup.provider.breaker.state is BreakerState.HALF_OPEN
    for seed in range(20):
        order = [b.config.model for b in plan(config, pool, "tiered", "untagged", seed)]
        assert set(order[:2]) == {"primary-a", "primary-b"}
        assert order[2] == "backup"


def test_least_latency_puts_a_backend_that_only_fails_last(
    pool: BackendPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(strategies, "EXPLORATION", 0.0)  # exploration may pick it: below
    light, medium, heavy = pool.backends["weighted"]
    served(pool, light, 0.5)
    served(pool, medium, 0.9)
    failed(pool, heavy, UpstreamFailure(FailureKind.RATE_LIMIT, "429"))  # no Retry-After
    rng = random.Random(2)
    for _ in range(50):
        assert LeastLatency().order([light, medium, heavy], [1.0] * 3, rng)[-1] is heavy


def test_least_latency_explores_a_backend_that_only_failed_now_and_then(
    pool: BackendPool,
) -> None:
    """Else nothing would ever try it again (its breaker may never open: 429s)."""
    light, medium, heavy = pool.backends["weighted"]
    served(pool, light, 0.5)
    served(pool, medium, 0.9)
    failed(pool, heavy, UpstreamFailure(FailureKind.RATE_LIMIT, "429"))
    firsts = first_picks(LeastLatency(), [light, medium, heavy], 11)
    # Exploration (2 %) draws among medium (outside the best) and heavy alike.
    assert within(firsts["heavy"], DRAWS, EXPLORATION / 2), firsts


def test_least_latency_keeps_failure_streaks_per_kind(pool: BackendPool) -> None:
    """A backend whose streams fail while its plain requests succeed: after each plain
    success it is not untried again for streams; it stays last for them."""
    light, medium, _ = pool.backends["weighted"]
    served(pool, light, 0.2, stream=True)
    for _ in range(3):
        failed(pool, medium, UpstreamFailure(FailureKind.SERVER, "500"), stream=True)
        served(pool, medium, 0.1, stream=False)
    rng = random.Random(12)
    leads = Counter(
        LeastLatency().order([light, medium], [1.0, 1.0], rng, stream=True)[0].provider.id
        for _ in range(1000)
    )
    assert leads["light"] >= 950, leads


def test_least_latency_counts_a_failure_streak_against_a_fast_backend(
    pool: BackendPool,
) -> None:
    light, medium, _ = pool.backends["weighted"]
    served(pool, light, 0.1)
    served(pool, medium, 0.25)
    for _ in range(3):  # light is failing now: 0.1 s x (1 + 3) is slower than 0.25 s
        failed(pool, light, UpstreamFailure(FailureKind.SERVER, "500"))
    assert LeastLatency().order([light, medium], [1.0, 1.0], random.Random(0)) == [medium, light]


# --------------------------------------------------------------------------------------
# least_latency end to end: real fake upstreams, one fast and two slow
# --------------------------------------------------------------------------------------


@dataclass
class SlowUpstream(FakeUpstream):
    """A fake upstream that waits ``delay`` seconds before each answer."""

    delay: float = 0.0

    async def respond(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(self.delay)
        return await super().respond(request)


async def test_least_latency_end_to_end_sends_everything_to_the_fast_backend(
    start_gateway: GatewayFactory, aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakes = [SlowUpstream(delay=delay) for delay in (0.0, 0.25, 0.25)]
    for fake in fakes:
        fake.server = await aiohttp_server(fake.app())
    raw = gateway_config(*fakes)
    raw["models"]["gpt-test"]["strategy"] = "least_latency"
    server = await start_gateway(raw, rng=random.Random(14))
    # Without exploration the count is exact whatever the draws: 30 of 30 after warm-up.
    monkeypatch.setattr(strategies, "EXPLORATION", 0.0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=ADMIN_TOKEN, max_retries=0
    )
    providers: Counter[str] = Counter()
    async with client:
        for _ in range(33):  # the first three measure each backend once
            raw_answer = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}]
            )
            providers[raw_answer.headers["x-berry-provider"]] += 1
    assert providers["up1"] == 31, providers


async def test_least_latency_end_to_end_routes_and_measures_each_kind_apart(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """up1 is fast to start streams and slow to answer plain requests, up2 the other way
    round: a stream goes to up1, a plain request to up2, and each moves only the average
    of its own kind."""
    monkeypatch.setattr(strategies, "EXPLORATION", 0.0)
    raw = gateway_config(upstream, upstream2)
    raw["models"]["gpt-test"]["strategy"] = "least_latency"
    server = await start_gateway(raw)
    up1, up2 = server.app[keys.GATEWAY].runtime.pool.backends["gpt-test"]
    up1.stats.stream_latency_ewma, up1.stats.unary_latency_ewma = 0.010, 1.0
    up2.stats.stream_latency_ewma, up2.stats.unary_latency_ewma = 1.0, 0.010
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key=ADMIN_TOKEN, max_retries=0
    )
    messages: Any = [{"role": "user", "content": "hi"}]
    async with client:
        async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=messages, stream=True
        ) as streamed:
            assert streamed.headers["x-berry-provider"] == "up1"
            await streamed.read()
        plain = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=messages
        )
        assert plain.headers["x-berry-provider"] == "up2"
    assert up1.stats.stream_latency_ewma != 0.010  # measured: a stream
    assert up1.stats.unary_latency_ewma == 1.0
    assert up2.stats.unary_latency_ewma != 0.010  # measured: a plain request
    assert up2.stats.stream_latency_ewma == 1.0
