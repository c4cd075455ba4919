"""Routing (``routing.py`` and ``pool.py``): which backends a request may try, in what order.

Weighted random draws must follow the configured weights (checked statistically with a
seeded RNG, so the test is deterministic), every eligible backend must appear exactly once
in the attempt order, and disabled backends/providers and other users' tagged backends must
never be tried.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from berry_proxy.config import Config, build_config
from berry_proxy.pool import Backend, BackendPool
from berry_proxy.routing import Router, WeightedRandom, effective_weight

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
def pool(config: Config) -> BackendPool:
    return BackendPool(config)


def names(backends: list[Backend]) -> list[str]:
    return [b.config.model if b.model.id == "filtered" else b.provider.id for b in backends]


def within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    expected = total * p
    return abs(count - expected) <= sigmas * math.sqrt(total * p * (1 - p))


# --------------------------------------------------------------------------------------
# WeightedRandom
# --------------------------------------------------------------------------------------


def test_effective_weight_is_the_configured_weight(pool: BackendPool) -> None:
    assert [effective_weight(b) for b in pool.backends["weighted"]] == [1.0, 3.0, 6.0]


def test_first_pick_is_proportional_to_weight(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]
    rng = random.Random(20240611)
    strategy = WeightedRandom()
    firsts = Counter(strategy.order(backends, rng)[0].provider.id for _ in range(DRAWS))
    assert set(firsts) == {"light", "medium", "heavy"}
    for provider, p in (("light", 0.1), ("medium", 0.3), ("heavy", 0.6)):
        assert within(firsts[provider], DRAWS, p), (provider, firsts)


def test_failover_order_still_prefers_heavier_backends(pool: BackendPool) -> None:
    # After the heaviest is drawn first, the second pick follows the remaining weights 1:3.
    backends = pool.backends["weighted"]
    rng = random.Random(7)
    strategy = WeightedRandom()
    seconds: Counter[str] = Counter()
    for _ in range(DRAWS):
        order = strategy.order(backends, rng)
        if order[0].provider.id == "heavy":
            seconds[order[1].provider.id] += 1
    total = sum(seconds.values())
    assert within(total, DRAWS, 0.6)
    assert within(seconds["medium"], total, 0.75), seconds


def test_order_is_a_permutation_of_all_candidates(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]
    rng = random.Random(3)
    strategy = WeightedRandom()
    seen_orders = set()
    for _ in range(500):
        order = strategy.order(backends, rng)
        assert len(order) == len(backends)
        assert {id(b) for b in order} == {id(b) for b in backends}
        seen_orders.add(tuple(b.provider.id for b in order))
    assert len(seen_orders) == 6  # every one of the 3! orders occurs


def test_a_tiny_weight_is_almost_never_first() -> None:
    raw = raw_config()
    raw["models"]["weighted"]["backends"][0]["weight"] = 1e6
    raw["models"]["weighted"]["backends"][1]["weight"] = 1e-6
    raw["models"]["weighted"]["backends"][2]["weight"] = 1e-6
    backends = BackendPool(build_config(raw, env={})).backends["weighted"]
    rng = random.Random(11)
    strategy = WeightedRandom()
    firsts = Counter(strategy.order(backends, rng)[0].provider.id for _ in range(2000))
    assert firsts == {"light": 2000}


def test_same_seed_same_orders(pool: BackendPool) -> None:
    backends = pool.backends["weighted"]

    def orders(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [names(WeightedRandom().order(backends, rng)) for _ in range(50)]

    assert orders(5) == orders(5)
    assert orders(5) != orders(6)


def test_empty_and_single_candidate_lists(pool: BackendPool) -> None:
    rng = random.Random(0)
    assert WeightedRandom().order([], rng) == []
    only = pool.backends["single"]
    assert WeightedRandom().order(only, rng) == list(only)


# --------------------------------------------------------------------------------------
# Router.plan: eligibility
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
def test_plan_filters_disabled_and_other_tags(
    config: Config, pool: BackendPool, user: str, expected: set[str]
) -> None:
    for seed in range(20):
        planned = names(plan(config, pool, "filtered", user, seed))
        assert len(planned) == len(set(planned))
        assert set(planned) == expected
        # Never a disabled backend, nor one whose provider is disabled.
        assert "disabled" not in planned
        assert "provider-disabled" not in planned


def test_plan_with_one_candidate(config: Config, pool: BackendPool) -> None:
    assert names(plan(config, pool, "single", "untagged")) == ["light"]


def test_plan_with_no_usable_backend_is_empty(config: Config, pool: BackendPool) -> None:
    assert plan(config, pool, "nothing-usable", "untagged") == []


def test_plan_first_pick_follows_weights(config: Config, pool: BackendPool) -> None:
    router = Router(pool, random.Random(99))
    model, user = config.models["weighted"], config.users["untagged"]
    firsts = Counter(router.plan(model, user)[0].provider.id for _ in range(DRAWS))
    for provider, p in (("light", 0.1), ("medium", 0.3), ("heavy", 0.6)):
        assert within(firsts[provider], DRAWS, p), (provider, firsts)
