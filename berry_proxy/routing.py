"""Routing: the order in which a request tries the backends of its model.

A strategy turns the eligible backends into an attempt order; the proxy walks that order
until one attempt succeeds. ``effective_weight`` is the ONE formula for a backend's
weight: the strategies draw with it and every endpoint that shows a weight shows it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from .config import ModelConfig, UserConfig
from .pool import Backend, BackendPool


def effective_weight(backend: Backend) -> float:
    """The weight the router uses for ``backend`` at this moment."""
    return backend.config.weight


class Strategy(Protocol):
    def order(self, backends: Sequence[Backend], rng: random.Random) -> list[Backend]:
        """All of ``backends``, most preferred first."""
        ...


class WeightedRandom:
    """Draw proportionally to effective weight, without replacement.

    The first pick follows the weights exactly; the rest give failover an order that
    still prefers heavier backends.
    """

    def order(self, backends: Sequence[Backend], rng: random.Random) -> list[Backend]:
        remaining = list(backends)
        weights = [effective_weight(b) for b in remaining]
        ordered: list[Backend] = []
        while remaining:
            total = sum(weights)
            point = rng.random() * total
            index = len(remaining) - 1
            for i, weight in enumerate(weights):
                point -= weight
                if point < 0:
                    index = i
                    break
            ordered.append(remaining.pop(index))
            weights.pop(index)
        return ordered


# Every configured strategy name is accepted by the config; until the dedicated
# strategies land, each routes by weighted random draw.
_STRATEGIES: dict[str, Strategy] = {}
_DEFAULT_STRATEGY = WeightedRandom()


def strategy_for(name: str) -> Strategy:
    return _STRATEGIES.get(name, _DEFAULT_STRATEGY)


class Router:
    def __init__(self, pool: BackendPool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rng = rng or random.Random()  # noqa: S311  # load balancing, not cryptography

    def plan(self, model: ModelConfig, user: UserConfig) -> list[Backend]:
        """The attempt order for one request: eligible backends, most preferred first."""
        candidates = self.pool.candidates(model, user)
        if len(candidates) <= 1:
            return candidates
        return strategy_for(model.strategy).order(candidates, self.rng)
