"""Runtime state of providers and backends, and how outcomes update it.

The config is frozen; everything that changes while serving (request counts, latency,
breaker, probe results, SmartAI confidence, recovery stage, rate-limit cool-down) lives
here. The router, the health prober and every status view read these same objects, so
what an endpoint shows is what routing does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .breaker import BreakerState, CircuitBreaker, Ticket
from .config import BackendConfig, Config, ModelConfig, ProviderConfig, UserConfig
from .errors import FailureKind, UpstreamFailure
from .log import get_logger
from .smart_ai import Confidence

Clock = Callable[[], float]

log = get_logger("berry_proxy.pool")

# smart_weighted_failover: weight share while recovering, by successes since the breaker
# opened: none yet → 10%, 1-2 → 30%, 3-4 → 50%; after as many successes as there are
# stages (5) the backend is fully recovered.
RECOVERY_STAGES = (0.1, 0.3, 0.3, 0.5, 0.5)
# Weight of the newest sample in the exponentially weighted moving latency average.
LATENCY_EWMA_ALPHA = 0.3
# Failures that say something about the provider, and so count against its breaker.
# A 429 means "busy, come back later" (handled by the Retry-After cool-down, and by
# SmartAI's rate-limit penalty), not "broken"; saturation is the gateway's own limit.
BREAKER_FAILURES = frozenset(
    {
        FailureKind.NETWORK,
        FailureKind.TIMEOUT,
        FailureKind.SERVER,
        FailureKind.AUTH,
        FailureKind.PROTOCOL,
    }
)


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

    @property
    def success_rate(self) -> float | None:
        return self.successful_requests / self.total_requests if self.total_requests else None

    @property
    def average_latency_ms(self) -> float | None:
        if not self.successful_requests:
            return None
        return self.latency_sum / self.successful_requests * 1000


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class ProviderState:
    config: ProviderConfig
    # Bounds concurrent upstream requests to this provider (max_connections).
    slots: asyncio.Semaphore
    breaker: CircuitBreaker
    # True when it serves an enabled per_token backend: only those get health probes.
    probed: bool
    stats: Stats = field(default_factory=Stats)
    last_check: float | None = None  # wall-clock seconds of the last probe
    probe_ok: bool | None = None  # None: never probed
    probe_error: str | None = None
    # Monotonic time before which the provider asked not to be called (429 Retry-After).
    cooldown_until: float = 0.0

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def healthy(self) -> bool:
        """Enabled, breaker not open, and its last probe (if any) succeeded."""
        return (
            self.config.enabled
            and self.breaker.state is not BreakerState.OPEN
            and self.probe_ok is not False
        )

    @property
    def error(self) -> str | None:
        """Why the provider is not healthy, in words safe to show anyone."""
        if not self.config.enabled:
            return "provider disabled"
        if self.breaker.state is BreakerState.OPEN:
            return f"circuit breaker open: {self.stats.last_error or 'repeated failures'}"
        if self.probe_ok is False:
            return self.probe_error
        return None


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Backend:
    """One (provider, upstream model) pair serving a public model."""

    model: ModelConfig
    config: BackendConfig
    provider: ProviderState
    index: int  # position in the model's backend list: a stable key for strategies
    confidence: Confidence
    stats: Stats = field(default_factory=Stats)
    # smart_weighted_failover: successes since the provider's breaker last opened;
    # None once fully recovered.
    recovery_successes: int | None = None

    @property
    def usable(self) -> bool:
        """Enabled by config, it and its provider."""
        return self.config.enabled and self.provider.config.enabled

    @property
    def healthy(self) -> bool:
        return self.config.enabled and self.provider.healthy

    def serves_tags(self, user_tags: Sequence[str]) -> bool:
        """A tagged user reaches backends sharing one of its tags, or untagged ones."""
        if not user_tags or not self.config.tags:
            return True
        return any(tag in self.config.tags for tag in user_tags)


class BackendPool:
    def __init__(
        self, config: Config, clock: Clock = time.monotonic, wall_clock: Clock = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        settings = config.settings
        now = clock()
        self.providers = {
            pid: ProviderState(
                p,
                asyncio.Semaphore(p.max_connections),
                CircuitBreaker(
                    settings.circuit_breaker_failure_threshold,
                    settings.circuit_breaker_timeout_seconds,
                    clock,
                ),
                probed=_serves_per_token(config, pid),
            )
            for pid, p in config.providers.items()
        }
        self.backends: dict[str, tuple[Backend, ...]] = {
            mid: tuple(
                Backend(m, b, self.providers[b.provider], i, Confidence(settings.smart_ai, now))
                for i, b in enumerate(m.backends)
            )
            for mid, m in config.models.items()
        }
        self.model_stats = {mid: Stats() for mid in config.models}
        self.in_flight = 0
        self.total_requests = 0

    def all_backends(self) -> list[Backend]:
        return [b for backends in self.backends.values() for b in backends]

    def candidates(self, model: ModelConfig, user: UserConfig) -> list[Backend]:
        """Backends the config lets serve this user's request for ``model``."""
        return [b for b in self.backends[model.id] if b.usable and b.serves_tags(user.tags)]

    # ----------------------------------------------------------------------------------
    # One attempt: begin, then one outcome (or none), then end
    # ----------------------------------------------------------------------------------

    def begin(self, backend: Backend) -> Ticket | None:
        """Claim an attempt on ``backend``; None when its breaker refuses one now."""
        return backend.provider.breaker.acquire()

    def end(self, backend: Backend, ticket: Ticket) -> None:
        """The attempt is over; frees a half-open trial that recorded no outcome."""
        backend.provider.breaker.release(ticket)

    def confirm_trial(self, backend: Backend, ticket: Ticket) -> None:
        """A trial stream reached its first content: the provider works again.

        Closing the breaker now, not when the stream ends minutes later, lets other
        requests back in meanwhile. Only a trial ticket does anything here.
        """
        if ticket.trial:
            self._breaker_success(backend.provider, ticket)

    def record_success(self, backend: Backend, latency: float, ticket: Ticket) -> None:
        now, wall = self.clock(), self.wall_clock()
        provider = backend.provider
        backend.stats.record_success(latency, wall)
        provider.stats.record_success(latency, wall)
        backend.confidence.record(None, now)
        if provider.probe_ok is False:
            # A served request is fresher evidence than the probe that failed before it.
            provider.probe_ok = None
            provider.probe_error = None
        if backend.recovery_successes is not None:
            backend.recovery_successes += 1
            if backend.recovery_successes >= len(RECOVERY_STAGES):
                backend.recovery_successes = None
        self._breaker_success(provider, ticket)

    def record_failure(self, backend: Backend, failure: UpstreamFailure, ticket: Ticket) -> None:
        now, wall = self.clock(), self.wall_clock()
        provider = backend.provider
        backend.stats.record_failure(failure.message, wall)
        provider.stats.record_failure(failure.message, wall)
        backend.confidence.record(failure.kind, now)
        if failure.kind is FailureKind.RATE_LIMIT and failure.retry_after:
            provider.cooldown_until = max(provider.cooldown_until, now + failure.retry_after)
        if failure.kind in BREAKER_FAILURES:
            if backend.recovery_successes is not None:
                backend.recovery_successes = 0
            trips = provider.breaker.total_trips
            provider.breaker.record_failure(ticket)
            if provider.breaker.total_trips != trips:
                self._opened(provider, failure.kind.value)

    def _breaker_success(self, provider: ProviderState, ticket: Ticket) -> None:
        breaker = provider.breaker
        was = breaker.state
        breaker.record_success(ticket)
        if was is BreakerState.HALF_OPEN and breaker.state is BreakerState.CLOSED:
            self._closed(provider, "trial request succeeded")

    def record_probe(self, provider: ProviderState, error: str | None) -> None:
        """A health probe's result (``error`` None: it answered)."""
        provider.last_check = self.wall_clock()
        provider.probe_ok = error is None
        provider.probe_error = error
        was = provider.breaker.state
        trips = provider.breaker.total_trips
        provider.breaker.record_probe(error is None)
        if error is None and was is not BreakerState.CLOSED:
            self._closed(provider, "recovery probe succeeded")
        elif provider.breaker.total_trips != trips:
            self._opened(provider, "probe_failed")

    def record_model_outcome(self, model_id: str, ok: bool, latency: float) -> None:
        stats = self.model_stats[model_id]
        now = self.wall_clock()
        if ok:
            stats.record_success(latency, now)
        else:
            stats.record_failure("request failed", now)

    def _opened(self, provider: ProviderState, reason: str) -> None:
        for backend in self.all_backends():
            if backend.provider is provider:
                backend.recovery_successes = 0
        log.warning(
            "circuit_open",
            provider=provider.id,
            reason=reason,
            open_seconds=provider.breaker.open_seconds,
        )

    def _closed(self, provider: ProviderState, reason: str) -> None:
        # The provider answers again: its backends' failure streaks are over.
        for backend in self.all_backends():
            if backend.provider is provider:
                backend.stats.consecutive_failures = 0
        provider.stats.consecutive_failures = 0
        log.info("circuit_closed", provider=provider.id, reason=reason)


def _serves_per_token(config: Config, provider_id: str) -> bool:
    return any(
        b.provider == provider_id and b.enabled and b.billing_mode == "per_token"
        for m in config.models.values()
        if m.enabled
        for b in m.backends
    )
