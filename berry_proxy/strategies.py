"""The routing strategies of SPEC §3, each a small unit behind one interface.

A strategy turns the backends eligible for one request (enabled, provider enabled, breaker
not open, matching the user's tags: the router has filtered them) into an attempt order,
most preferred first; the proxy walks that order until an attempt succeeds. Weights come
from ``weights.weigh`` (the one formula), passed in the same order as the backends.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Protocol

from .pool import Backend


class Strategy(Protocol):
    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        """All of ``backends``, most preferred first."""
        ...


def weighted_draw(
    backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
) -> list[Backend]:
    """Draw proportionally to weight, without replacement.

    The first pick follows the weights exactly; the rest give failover an order that
    still prefers heavier backends. Zero weights only come after every positive one.
    """
    remaining = list(backends)
    left = list(weights)
    ordered: list[Backend] = []
    while remaining:
        total = sum(left)
        index = len(remaining) - 1
        if total > 0:
            point = rng.random() * total
            for i, weight in enumerate(left):
                point -= weight
                if point < 0:
                    index = i
                    break
        else:
            index = rng.randrange(len(remaining))
        ordered.append(remaining.pop(index))
        left.pop(index)
    return ordered


def healthy_first(
    backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
) -> list[Backend]:
    """Weighted draw among healthy backends, then the rest (also weighted) as last resort."""
    healthy = [(b, w) for b, w in zip(backends, weights, strict=True) if b.healthy]
    sick = [(b, w) for b, w in zip(backends, weights, strict=True) if not b.healthy]
    return weighted_draw([b for b, _ in healthy], [w for _, w in healthy], rng) + weighted_draw(
        [b for b, _ in sick], [w for _, w in sick], rng
    )


class WeightedRandom:
    """``weighted_random`` and ``smart_ai``: draw proportional to effective weight.

    For ``smart_ai`` the adaptivity lives in the weights (``weights.weigh``), not here.
    """

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        return weighted_draw(backends, weights, rng)


class UniformRandom:
    """``random``: every eligible backend equally likely."""

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        ordered = list(backends)
        rng.shuffle(ordered)
        return ordered


class SmoothRoundRobin:
    """``round_robin``: nginx's smooth weighted round robin.

    Each pick adds every backend's weight to its running score, takes the highest score
    and subtracts the total from it: weights 5, 1, 1 give a a b a c a a, spread out
    rather than a a a a a b c. Failover continues with the next-highest scores. State is
    kept per model, keyed by the backend's position in the model's list.
    """

    def __init__(self) -> None:
        self.scores: dict[int, float] = {}

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        scores = self.scores
        for backend, weight in zip(backends, weights, strict=True):
            scores[backend.index] = scores.get(backend.index, 0.0) + weight
        # sorted() is stable: equal scores keep the configured order, as nginx does.
        ordered = sorted(backends, key=lambda b: -scores[b.index])
        if ordered:
            scores[ordered[0].index] -= sum(weights)
        return ordered


class LeastLatency:
    """``least_latency``: lowest EWMA latency, by power of two choices.

    Backends never tried go first (so they get measured). Otherwise two distinct backends
    are drawn at random and the faster leads: the slowest never leads, and near-equal
    fast backends share the load instead of all traffic herding onto whichever measured
    fastest last. The rest follow, fastest first. A backend failing right now counts as
    slower by its failure streak (latency x (1 + consecutive failures)), and one that has
    only ever failed comes last: an average of its successes would say nothing.
    """

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        untried = [b for b in backends if b.stats.total_requests == 0]
        rng.shuffle(untried)
        measured = sorted((b for b in backends if b.stats.total_requests), key=_score)
        if len(measured) >= 2:
            first, second = rng.sample(measured, 2)
            lead = first if _score(first) <= _score(second) else second
            measured.remove(lead)
            measured.insert(0, lead)
        return untried + measured


def _score(backend: Backend) -> float:
    stats = backend.stats
    if stats.latency_ewma is None:
        return math.inf
    return stats.latency_ewma * (1 + stats.consecutive_failures)


class Failover:
    """``failover``: the lowest ``priority`` number that has a healthy backend.

    Within a tier, weighted random. A lower tier is reached only when every backend of
    the tiers above has failed (in the order) or is unhealthy; unhealthy backends (last
    probe failed) come after every healthy one as a last resort.
    """

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        by_tier: dict[tuple[bool, int], list[tuple[Backend, float]]] = {}
        for backend, weight in zip(backends, weights, strict=True):
            key = (not backend.healthy, backend.config.priority)
            by_tier.setdefault(key, []).append((backend, weight))
        ordered: list[Backend] = []
        for key in sorted(by_tier):
            tier = by_tier[key]
            ordered += weighted_draw([b for b, _ in tier], [w for _, w in tier], rng)
        return ordered


class WeightedFailover:
    """``weighted_failover``: weighted random over healthy backends; the rest last.

    ``smart_weighted_failover`` is the same rule; its weights (``weights.weigh``) carry
    the staged recovery factor.
    """

    def order(
        self, backends: Sequence[Backend], weights: Sequence[float], rng: random.Random
    ) -> list[Backend]:
        return healthy_first(backends, weights, rng)


def make_strategy(name: str) -> Strategy:
    """A fresh strategy (stateful ones keep per-model state) for a strategy name."""
    factories: dict[str, type[Strategy]] = {
        "weighted_random": WeightedRandom,
        "round_robin": SmoothRoundRobin,
        "least_latency": LeastLatency,
        "failover": Failover,
        "random": UniformRandom,
        "weighted_failover": WeightedFailover,
        "smart_weighted_failover": WeightedFailover,
        "smart_ai": WeightedRandom,
    }
    return factories[name]()
