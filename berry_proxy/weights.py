"""The ONE effective-weight formula.

The router draws with these weights and every endpoint that shows a weight
(``/admin/model-weights``, ``/smart-ai/*``, later ``/prometheus``) shows these, computed by
``weigh`` and nothing else::

    breaker open               → 0 (the backend is not eligible)
    smart_ai                   → weight * health * confidence * stability bonus
                                   * ((1 - exploration_ratio) * latency * error + exploration_ratio)
    smart_weighted_failover    → weight * recovery stage (0.1, 0.3, 0.5, then 1)
    every other strategy       → weight

SmartAI's factors:

- health: 1 when the backend is healthy; 0.5 while a breaker of it (its provider's or its
  own) is half-open or its provider's last probe failed;
- confidence: ``smart_ai.Confidence`` (success and failure history by error class);
- latency: the model's best EWMA latency divided by this backend's (1 when unmeasured),
  at least ``MIN_LATENCY_FACTOR``;
- error: ``1 / (1 + consecutive failures)``, so a backend failing right now is set aside
  at once, before its confidence has caught up;
- stability bonus: ``non_premium_stability_bonus`` for backends without the ``premium``
  tag, 1 otherwise;
- exploration: ``exploration_ratio`` of each weight ignores the latency and error factors,
  so a slower or briefly failing backend keeps some traffic and keeps being measured,
  while one that keeps failing (confidence at its floor) gets almost none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .breaker import BreakerState
from .config import SmartAISettings
from .pool import RECOVERY_STAGES, Backend

MIN_LATENCY_FACTOR = 0.1
# The tag that marks a backend as premium (no stability bonus), as in the original.
PREMIUM_TAG = "premium"


@dataclass(frozen=True, slots=True)
class WeightBreakdown:
    """A backend's effective weight and every factor that went into it."""

    weight: float
    confidence: float
    health_factor: float
    latency_factor: float
    error_factor: float
    stability_bonus: float
    recovery_factor: float
    effective_weight: float


def health_factor(backend: Backend) -> float:
    provider = backend.provider
    state = backend.breaker_state
    if state is BreakerState.OPEN:
        return 0.0
    if state is BreakerState.HALF_OPEN or provider.probe_ok is False:
        return 0.5
    return 1.0


def latency_factor(latency: float | None, best: float | None) -> float:
    if latency is None or best is None or latency <= 0:
        return 1.0
    return max(MIN_LATENCY_FACTOR, min(1.0, best / latency))


def error_factor(consecutive_failures: int) -> float:
    return 1.0 / (1 + consecutive_failures)


def recovery_factor(successes: int | None) -> float:
    if successes is None or successes >= len(RECOVERY_STAGES):
        return 1.0
    return RECOVERY_STAGES[successes]


def best_latency(backends: Sequence[Backend]) -> float | None:
    """The model's lowest EWMA latency: the reference for every backend's latency factor.

    Taken over the model's backends that could serve now (enabled, breaker not open),
    whatever the caller's tags, so a backend's weight is the same for every user and in
    every view, and a fast backend that died does not leave its old speed as the bar.
    """
    measured = [
        b.stats.latency_ewma
        for b in backends
        if b.stats.latency_ewma is not None
        and b.usable
        and b.breaker_state is not BreakerState.OPEN
    ]
    return min(measured) if measured else None


def weigh(
    backend: Backend, settings: SmartAISettings, best: float | None, now: float
) -> WeightBreakdown:
    """The effective weight of ``backend`` at ``now`` (monotonic seconds)."""
    weight = backend.config.weight
    health = health_factor(backend)
    confidence = backend.confidence.value(now)
    latency = latency_factor(backend.stats.latency_ewma, best)
    error = error_factor(backend.stats.consecutive_failures)
    bonus = 1.0 if PREMIUM_TAG in backend.config.tags else settings.non_premium_stability_bonus
    recovery = recovery_factor(backend.recovery_successes)
    strategy = backend.model.strategy
    if health == 0.0:
        effective = 0.0
    elif strategy == "smart_ai":
        explore = settings.exploration_ratio
        effective = (
            weight * health * confidence * bonus * ((1 - explore) * latency * error + explore)
        )
    elif strategy == "smart_weighted_failover":
        effective = weight * recovery
    else:
        effective = weight
    return WeightBreakdown(
        weight=weight,
        confidence=confidence,
        health_factor=health,
        latency_factor=latency,
        error_factor=error,
        stability_bonus=bonus,
        recovery_factor=recovery,
        effective_weight=effective,
    )
