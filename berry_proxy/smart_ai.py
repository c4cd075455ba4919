"""SmartAI's confidence model: how much the gateway trusts one backend right now.

Confidence lives in ``[min_confidence, 1]`` and starts at ``initial_confidence``. Every
outcome moves it: a success adds ``success_boost``; a failure subtracts the penalty of
its class (network, timeout, server, rate limit, auth, or "model error" for a protocol
failure such as a 200 that is not JSON). With ``enable_time_decay`` a confidence nobody
has updated for a while drifts back toward ``initial_confidence`` (the neutral value),
halving its distance every ``DECAY_HALF_LIFE_SECONDS``: a backend that failed a minute
ago and has had no traffic since (its breaker open, say) is given a fair chance again.

Pure: no I/O, the clock reading is passed in.
"""

from __future__ import annotations

from .config import ConfidenceAdjustments, SmartAISettings
from .errors import FailureKind

# How fast stale confidence returns toward neutral. One minute matches the default
# circuit-breaker window, so a backend whose breaker reopens has regained most of it.
DECAY_HALF_LIFE_SECONDS = 60.0


# Which ``confidence_adjustments`` key penalises each failure class. SATURATED (the
# gateway's own connection limit) says nothing about the backend: no penalty.
PENALTY_KEYS = {
    FailureKind.NETWORK: "network_error_penalty",
    FailureKind.TIMEOUT: "timeout_penalty",
    FailureKind.SERVER: "server_error_penalty",
    FailureKind.RATE_LIMIT: "rate_limit_penalty",
    FailureKind.AUTH: "auth_error_penalty",
    FailureKind.PROTOCOL: "model_error_penalty",
}


def adjustment(kind: FailureKind | None, adjustments: ConfidenceAdjustments) -> float:
    """How much one outcome moves confidence: ``None`` is a success."""
    if kind is None:
        return adjustments.success_boost
    key = PENALTY_KEYS.get(kind)
    return 0.0 if key is None else -float(getattr(adjustments, key))


class Confidence:
    """One backend's confidence, decaying toward neutral between updates."""

    __slots__ = ("_settings", "_updated_at", "_value")

    def __init__(self, settings: SmartAISettings, now: float) -> None:
        self._settings = settings
        self._value = settings.initial_confidence
        self._updated_at = now

    def retune(self, settings: SmartAISettings) -> None:
        """New settings (a reload): the confidence earned so far stays."""
        self._settings = settings

    def value(self, now: float) -> float:
        settings = self._settings
        value = self._value
        age = now - self._updated_at
        if settings.enable_time_decay and age > 0:
            neutral = settings.initial_confidence
            value = neutral + (value - neutral) * 0.5 ** (age / DECAY_HALF_LIFE_SECONDS)
        return min(1.0, max(settings.min_confidence, value))

    def record(self, kind: FailureKind | None, now: float) -> None:
        """Move confidence for one outcome (``None``: success) observed at ``now``."""
        settings = self._settings
        value = self.value(now) + adjustment(kind, settings.confidence_adjustments)
        self._value = min(1.0, max(settings.min_confidence, value))
        self._updated_at = now
