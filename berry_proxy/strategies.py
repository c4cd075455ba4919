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
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
    ) -> list[Backend]:
        """All of ``backends``, most preferred first, for a request that streams
        (``stream``) or not: only ``least_latency`` tells the two apart."""
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
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
    ) -> list[Backend]:
        return weighted_draw(backends, weights, rng)


class UniformRandom:
    """``random``: every eligible backend equally likely."""

    def order(
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
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
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
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
    """``least_latency``: the fastest backends lead, sharing the load among themselves.

    The score is the backend's own moving average for this kind of request (time to first
    content for streams, total time for the rest: ``Stats.kind_latency``), scaled up by
    its failure streak of that kind (latency x (1 + consecutive failures)). Backends never
    measured for this kind and not failing it go first, so they get measured. Of the
    rest, the *best* are those within ``BEST_FACTOR`` of the fastest score (or
    ``BEST_MARGIN_SECONDS`` of it, for backends of a few milliseconds): the lead is drawn
    at random among them, so near-equal backends share the load instead of herding onto
    whichever measured fastest last. (SPEC §3 asks for power of two choices among the
    best; over two near-equal backends P2C always picks the lower average, which is
    herding, so the draw is uniform.) The others follow
    in latency order, fastest first; a backend failing with no measure of this kind comes
    last.

    A backend outside the best is still measured now and then: with probability
    ``EXPLORATION`` the lead is drawn among the others (a failing one included) instead,
    so a backend that was slow and has recovered is measured again and wins its place
    back: each exploration moves its average by ``LATENCY_EWMA_ALPHA`` toward the new
    latency, so after k of them a backend once ``slow`` seconds is at about
    ``fast + 0.7**k * (slow - fast)`` and leads again once that is within the best.
    """

    def order(
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
    ) -> list[Backend]:
        unmeasured = [b for b in backends if b.stats.kind_latency(stream) is None]
        # Never measured for this kind of request and not failing it now: first, to be
        # measured. Failing this kind with no measure of it: last.
        untried = [b for b in unmeasured if not b.stats.kind_failures(stream)]
        failing = [b for b in unmeasured if b.stats.kind_failures(stream)]
        rng.shuffle(untried)
        measured = sorted(
            (b for b in backends if b.stats.kind_latency(stream) is not None),
            key=lambda b: _score(b, stream),
        )
        rest = measured + failing
        if not measured:
            return untried + rest
        fastest = _score(measured[0], stream)
        bound = max(fastest * BEST_FACTOR, fastest + BEST_MARGIN_SECONDS)
        best = [b for b in measured if _score(b, stream) <= bound]  # a prefix: sorted
        # Exploration also reaches a backend that failed this kind and was never
        # measured for it: otherwise nothing would ever try it again.
        others = measured[len(best) :] + failing
        pool = others if others and rng.random() < EXPLORATION else best
        lead = pool[rng.randrange(len(pool))]
        rest.remove(lead)
        return [*untried, lead, *rest]


# Backends within this factor of the fastest score are "the best" and share the lead.
BEST_FACTOR = 1.5
# ... or within this many seconds of it: 2 ms and 4 ms backends are both fast.
BEST_MARGIN_SECONDS = 0.005
# How often a backend outside the best leads anyway, to be measured again.
EXPLORATION = 0.02


def _score(backend: Backend, stream: bool) -> float:
    stats = backend.stats
    latency = stats.kind_latency(stream)
    if latency is None:
        return math.inf
    return latency * (1 + stats.kind_failures(stream))


class Failover:
    """``failover``: the lowest ``priority`` number that has a healthy backend.

    Within a tier, weighted random. A lower tier is reached only when every backend of
    the tiers above has failed (in the order) or is unhealthy; unhealthy backends (last
    probe failed) come after every healthy one as a last resort.
    """

    def order(
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
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
        self,
        backends: Sequence[Backend],
        weights: Sequence[float],
        rng: random.Random,
        stream: bool = False,
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
