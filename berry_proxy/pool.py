"""Runtime state of providers and backends, and which backends may serve a request.

The config is frozen; everything that changes while serving (request counts, latency,
last errors) lives here. Routing strategies, the circuit breaker and the health prober
read and update the same objects, so every endpoint shows what the router sees.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .config import BackendConfig, Config, ModelConfig, ProviderConfig, UserConfig
from .errors import UpstreamFailure

Clock = Callable[[], float]

# Weight of the newest sample in the exponentially weighted moving latency average.
LATENCY_EWMA_ALPHA = 0.3


@dataclass(slots=True)
class Stats:
    """Counters kept for a provider, a backend and a model alike."""

    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    consecutive_failures: int = 0
    latency_sum: float = 0.0
    latency_ewma: float | None = None
    last_success: float | None = None  # wall-clock seconds
    last_failure: float | None = None
    last_error: str | None = None

    def record_success(self, latency: float, now: float) -> None:
        self.total_requests += 1
        self.successful_requests += 1
        self.consecutive_failures = 0
        self.latency_sum += latency
        ewma = self.latency_ewma
        self.latency_ewma = (
            latency if ewma is None else ewma + LATENCY_EWMA_ALPHA * (latency - ewma)
        )
        self.last_success = now

    def record_failure(self, message: str, now: float) -> None:
        self.total_requests += 1
        self.failed_requests += 1
        self.consecutive_failures += 1
        self.last_failure = now
        self.last_error = message


@dataclass(slots=True)
class ProviderState:
    config: ProviderConfig
    # Bounds concurrent upstream requests to this provider (max_connections).
    slots: asyncio.Semaphore
    stats: Stats = field(default_factory=Stats)

    @property
    def id(self) -> str:
        return self.config.id


@dataclass(slots=True)
class Backend:
    """One (provider, upstream model) pair serving a public model."""

    model: ModelConfig
    config: BackendConfig
    provider: ProviderState
    stats: Stats = field(default_factory=Stats)

    @property
    def usable(self) -> bool:
        return self.config.enabled and self.provider.config.enabled

    def serves_tags(self, user_tags: Sequence[str]) -> bool:
        """A tagged user reaches backends sharing one of its tags, or untagged ones."""
        if not user_tags or not self.config.tags:
            return True
        return any(tag in self.config.tags for tag in user_tags)


class BackendPool:
    def __init__(self, config: Config, wall_clock: Clock = time.time) -> None:
        self.wall_clock = wall_clock
        self.providers = {
            pid: ProviderState(p, asyncio.Semaphore(p.max_connections))
            for pid, p in config.providers.items()
        }
        self.backends: dict[str, tuple[Backend, ...]] = {
            mid: tuple(Backend(m, b, self.providers[b.provider]) for b in m.backends)
            for mid, m in config.models.items()
        }
        self.model_stats = {mid: Stats() for mid in config.models}

    def candidates(self, model: ModelConfig, user: UserConfig) -> list[Backend]:
        """Backends that may serve this user's request for ``model`` right now."""
        return [b for b in self.backends[model.id] if b.usable and b.serves_tags(user.tags)]

    def record_success(self, backend: Backend, latency: float) -> None:
        now = self.wall_clock()
        backend.stats.record_success(latency, now)
        backend.provider.stats.record_success(latency, now)

    def record_failure(self, backend: Backend, failure: UpstreamFailure) -> None:
        now = self.wall_clock()
        backend.stats.record_failure(failure.message, now)
        backend.provider.stats.record_failure(failure.message, now)

    def record_model_outcome(self, model_id: str, ok: bool, latency: float) -> None:
        stats = self.model_stats[model_id]
        now = self.wall_clock()
        if ok:
            stats.record_success(latency, now)
        else:
            stats.record_failure("request failed", now)
