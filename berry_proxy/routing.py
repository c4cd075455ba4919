"""Routing: which backends may serve one request, and in what order to try them.

``Router.plan`` filters a model's backends (config, tags, breakers), asks the model's
strategy for an order using the one effective-weight formula (``weights.weigh``), then
applies two rules every strategy shares:

- a backend whose breaker (its provider's or its own) is half-open goes first: its
  single trial request decides
  whether it rejoins (nginx and Envoy likewise send live traffic as the trial). Not under
  ``failover``: a lower tier is tried only when the tiers above have failed, so a
  half-open backup keeps its place (recovery probes or a failing primary test it);
- a backend whose provider asked to be left alone (429 with ``Retry-After``) goes last,
  tried only when nothing else is left.

When the breakers of every backend the user may use are open, ``plan`` fails fast with
503 ``no_healthy_backends`` and a ``Retry-After`` of the soonest moment one could serve
again: its breaker's reopening, or its provider's next health probe if that comes first.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from .breaker import BreakerState
from .config import ModelConfig, UserConfig
from .errors import ServiceUnavailable
from .pool import Backend, BackendPool
from .strategies import Strategy, make_strategy
from .weights import WeightBreakdown, best_latency, weigh

# Strategies whose order is a promise (priority tiers) that a trial must not jump.
TIERED_STRATEGIES = frozenset({"failover"})


class Router:
    def __init__(self, pool: BackendPool, rng: random.Random | None = None) -> None:
        self.pool = pool
        self.rng = rng or random.Random()  # noqa: S311  # load balancing, not cryptography
        self.strategies: dict[str, Strategy] = {
            mid: make_strategy(m.strategy) for mid, m in pool.config.models.items()
        }

    def breakdowns(self, model: ModelConfig, backends: Sequence[Backend]) -> list[WeightBreakdown]:
        """The effective weight (with its factors) of each of ``backends`` of ``model``."""
        pool = self.pool
        best = best_latency(pool.backends[model.id])
        now = pool.clock()
        settings = pool.config.settings.smart_ai
        return [weigh(b, settings, best, now) for b in backends]

    def plan(self, model: ModelConfig, user: UserConfig, stream: bool = False) -> list[Backend]:
        """The attempt order for one request (a stream or not): eligible backends, most
        preferred first."""
        candidates = self.pool.candidates(model, user)
        eligible = [b for b in candidates if b.available()]
        if not eligible:
            raise self.no_healthy_backends(model, candidates)
        if len(eligible) == 1:
            return eligible
        weights = [w.effective_weight for w in self.breakdowns(model, eligible)]
        ordered = self.strategies[model.id].order(eligible, weights, self.rng, stream)
        now = self.pool.clock()
        trials = (
            []
            if model.strategy in TIERED_STRATEGIES
            else [b for b in ordered if b.breaker_state is BreakerState.HALF_OPEN]
        )
        cooling = [b for b in ordered if b.provider.cooldown_until > now and b not in trials]
        if not trials and not cooling:
            return ordered
        rest = [b for b in ordered if b not in trials and b not in cooling]
        return trials + rest + cooling

    def no_healthy_backends(
        self, model: ModelConfig, candidates: Sequence[Backend]
    ) -> ServiceUnavailable:
        """503 for ``model``, retry after the soonest of ``candidates`` could serve again."""
        now = self.pool.clock()
        # A candidate that may be back any moment (another request holds its half-open
        # trial, or its probe is due or running) makes the soonest wait 0: 1 s then.
        waits = [max(0.0, back_in(b) - now) for b in candidates]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        return ServiceUnavailable(
            "no_healthy_backends",
            "No healthy backends available for the requested model",
            details={
                "model": model.name,
                "total_backends": len(self.pool.backends[model.id]),
                "healthy_backends": 0,
            },
            headers={"Retry-After": str(retry_after)},
        )


def back_in(backend: Backend) -> float:
    """When ``backend`` could take a request again (clock seconds), as far as its open
    breakers say: each one's reopening, or for the provider's the next health probe if it
    comes sooner (a good probe closes it). Now or earlier when neither is open."""
    when = float("-inf")
    provider = backend.provider
    if provider.breaker.state is BreakerState.OPEN:
        reopens = provider.breaker.reopens_at
        probe = provider.next_probe_at
        when = reopens if probe is None else min(reopens, probe)
    if backend.breaker.state is BreakerState.OPEN:
        when = max(when, backend.breaker.reopens_at)
    return when
