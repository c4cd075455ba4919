"""Runtime state of providers and backends, and how outcomes update it.

The config is frozen; everything that changes while serving (request counts, latency,
breakers, probe results, SmartAI confidence, recovery stage, rate-limit cool-down,
connection slots) lives here. The router, the health prober and every status view read
these same objects, so what an endpoint shows is what routing does.

Two breakers guard each backend (SPEC §5 "Breaker evidence"): its provider's, charged by
connection-level failures (connect, reset, timeout, a rejected provider key), and its
own, shared by every backend of the same provider and upstream model, charged by answers
that say the model is broken (5xx, a malformed answer). So one model's 500s never take
the provider's other models out. One request charges each breaker at most once, however
many attempts it makes there (``Evidence``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .breaker import BreakerState, CircuitBreaker, Ticket
from .config import BackendConfig, Config, ModelConfig, ProviderConfig, Settings, UserConfig
from .errors import FailureKind, UpstreamFailure
from .log import get_logger
from .metrics import Metrics
from .smart_ai import Confidence

Clock = Callable[[], float]

log = get_logger("berry_proxy.pool")

# smart_weighted_failover: weight share while recovering, by successes since the breaker
# opened: none yet → 10%, 1-2 → 30%, 3-4 → 50%; after as many successes as there are
# stages (5) the backend is fully recovered.
RECOVERY_STAGES = (0.1, 0.3, 0.3, 0.5, 0.5)
# Weight of the newest sample in the exponentially weighted moving latency average.
LATENCY_EWMA_ALPHA = 0.3
# Failures that say the provider cannot be reached or refuses its key: its breaker.
PROVIDER_FAILURES = frozenset({FailureKind.NETWORK, FailureKind.TIMEOUT, FailureKind.AUTH})
# Answers that say one upstream model is broken: the backend's breaker. The provider did
# answer, so for its breaker such an attempt is a success. Neither breaker counts a 429
# ("busy, come back later": the Retry-After cool-down and SmartAI's rate-limit penalty
# handle it) or saturation (the gateway's own limit).
BACKEND_FAILURES = frozenset({FailureKind.SERVER, FailureKind.PROTOCOL})
# Weight of the newest hold time in a provider's average connection-slot hold time.
HOLD_EWMA_ALPHA = 0.2


def moved(ewma: float | None, sample: float) -> float:
    """An exponentially weighted moving average after one more sample."""
    return sample if ewma is None else ewma + LATENCY_EWMA_ALPHA * (sample - ewma)


@dataclass(slots=True)
class Stats:
    """Counters kept for a provider, a backend and a model alike."""

    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    consecutive_failures: int = 0
    latency_sum: float = 0.0
    latency_ewma: float | None = None
    # The same average kept apart per kind of request, for ``least_latency``: time to
    # first content for streams, total time for the rest (a long generation must not make
    # a backend look slow for short answers).
    stream_latency_ewma: float | None = None
    unary_latency_ewma: float | None = None
    # Failure streaks per kind: a backend whose streams fail while its plain requests
    # succeed must not look untried for streams after every plain success.
    stream_failures: int = 0
    unary_failures: int = 0
    last_success: float | None = None  # wall-clock seconds
    last_failure: float | None = None
    last_error: str | None = None

    def record_success(self, latency: float, now: float, stream: bool | None = None) -> None:
        """A success after ``latency`` seconds; ``stream`` (when known) says which of the
        per-kind averages it also moves."""
        self.total_requests += 1
        self.successful_requests += 1
        self.consecutive_failures = 0
        self.latency_sum += latency
        self.latency_ewma = moved(self.latency_ewma, latency)
        if stream is True:
            self.stream_latency_ewma = moved(self.stream_latency_ewma, latency)
            self.stream_failures = 0
        elif stream is False:
            self.unary_latency_ewma = moved(self.unary_latency_ewma, latency)
            self.unary_failures = 0
        self.last_success = now

    def kind_latency(self, stream: bool) -> float | None:
        """The average ``least_latency`` compares for this kind of request."""
        return self.stream_latency_ewma if stream else self.unary_latency_ewma

    def kind_failures(self, stream: bool) -> int:
        """The current failure streak of this kind of request."""
        return self.stream_failures if stream else self.unary_failures

    def record_failure(self, message: str, now: float, stream: bool | None = None) -> None:
        self.total_requests += 1
        self.failed_requests += 1
        self.consecutive_failures += 1
        if stream is True:
            self.stream_failures += 1
        elif stream is False:
            self.unary_failures += 1
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
    # Monotonic time of the next scheduled probe (None: not probed, or not scheduled yet).
    next_probe_at: float | None = None
    # Monotonic time before which the provider asked not to be called (429 Retry-After).
    cooldown_until: float = 0.0
    # Connection slots: held now, requests waiting for one, how long one is held on
    # average (seconds; None until one was released), and how often none freed in time.
    in_flight: int = 0
    waiting: int = 0
    hold_ewma: float | None = None
    saturations: int = 0
    last_saturation_log: float = float("-inf")

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


@dataclass(slots=True)
class Recovery:
    """A backend's recovery stage, one object shared by its ``Backend`` in every reload
    of the config: a request of an older config that opens a breaker resets the stage
    routing reads now."""

    successes: int | None = None


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class Backend:
    """One (provider, upstream model) pair serving a public model."""

    model: ModelConfig
    config: BackendConfig
    provider: ProviderState
    index: int  # position in the model's backend list: a stable key for strategies
    confidence: Confidence
    # The upstream model's own breaker, shared with every backend of the same provider
    # and upstream model (whichever public models they serve).
    breaker: CircuitBreaker
    stats: Stats = field(default_factory=Stats)
    recovery: Recovery = field(default_factory=Recovery)

    @property
    def recovery_successes(self) -> int | None:
        """smart_weighted_failover: successes since a breaker of this backend last
        opened; None once fully recovered."""
        return self.recovery.successes

    @recovery_successes.setter
    def recovery_successes(self, value: int | None) -> None:
        self.recovery.successes = value

    @property
    def usable(self) -> bool:
        """Enabled by config, it and its provider."""
        return self.config.enabled and self.provider.config.enabled

    @property
    def healthy(self) -> bool:
        return (
            self.config.enabled
            and self.provider.healthy
            and self.breaker.state is not BreakerState.OPEN
        )

    @property
    def breaker_state(self) -> BreakerState:
        """The stricter of the provider's and the model's breaker: open if either is."""
        provider, own = self.provider.breaker.state, self.breaker.state
        if BreakerState.OPEN in (provider, own):
            return BreakerState.OPEN
        if BreakerState.HALF_OPEN in (provider, own):
            return BreakerState.HALF_OPEN
        return BreakerState.CLOSED

    def available(self) -> bool:
        """May an attempt be sent now, as far as both breakers are concerned?"""
        return self.provider.breaker.available() and self.breaker.available()

    def serves_tags(self, user_tags: Sequence[str]) -> bool:
        """A tagged user reaches backends sharing one of its tags, or untagged ones."""
        if not user_tags or not self.config.tags:
            return True
        return any(tag in self.config.tags for tag in user_tags)


class Admission(NamedTuple):
    """Both breakers' tickets for one attempt (see ``CircuitBreaker.acquire``)."""

    provider: Ticket
    backend: Ticket


class Evidence:
    """What one request has already charged: each breaker, and each backend's SmartAI
    confidence, at most once however many attempts the request makes."""

    __slots__ = ("charged",)

    def __init__(self) -> None:
        self.charged: set[object] = set()

    def first(self, target: object) -> bool:
        """True the first time ``target`` is charged by this request."""
        if target in self.charged:
            return False
        self.charged.add(target)
        return True


class BackendPool:
    """The runtime state of one config's providers and backends.

    With ``previous`` (the pool of the config being replaced by a reload), state carries
    over by identity: a provider whose config is unchanged keeps its ``ProviderState``
    (breaker, probe results, counters, connection slots), and each backend of such a
    provider that the new config still lists (same public model, provider and upstream
    model) keeps its stats, SmartAI confidence, recovery stage and model breaker. The
    shared objects are the same ones the old pool's in-flight requests still update, so
    what they learn is not lost. A changed provider starts afresh: its upstream may be a
    different one. ``metrics`` (the process's counted numbers) outlive any one pool.
    """

    def __init__(
        self,
        config: Config,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        metrics: Metrics | None = None,
        previous: BackendPool | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        settings = config.settings
        now = clock()
        kept = _kept_providers(config, previous)
        self.providers = {
            pid: kept.get(pid)
            or ProviderState(
                p,
                asyncio.Semaphore(p.max_connections),
                self._breaker(),
                probed=False,
            )
            for pid, p in config.providers.items()
        }
        for pid, provider in self.providers.items():
            provider.probed = _serves_per_token(config, pid)
            if not provider.probed:
                provider.next_probe_at = None  # a kept provider this config stops probing
            if pid in kept:
                _retune(provider.breaker, settings)
        self.model_breakers: dict[tuple[str, str], CircuitBreaker] = {}
        if previous is not None:
            for key, breaker in previous.model_breakers.items():
                if key[0] in kept:
                    _retune(breaker, settings)
                    self.model_breakers[key] = breaker
        earlier = _backends_by_identity(previous, kept)
        self.backends: dict[str, tuple[Backend, ...]] = {}
        for mid, m in config.models.items():
            built = []
            for i, (b, identity) in enumerate(zip(m.backends, _identities(m), strict=True)):
                before = earlier.get(identity)
                backend = Backend(
                    m,
                    b,
                    self.providers[b.provider],
                    i,
                    Confidence(settings.smart_ai, now) if before is None else before.confidence,
                    self._model_breaker(b),
                )
                if before is not None:
                    backend.confidence.retune(settings.smart_ai)
                    backend.stats = before.stats
                    backend.recovery = before.recovery
                built.append(backend)
            self.backends[mid] = tuple(built)
        old_stats: dict[str, Stats] = {} if previous is None else previous.model_stats
        self.model_stats: dict[str, Stats] = {
            mid: old_stats.get(mid) or Stats() for mid in config.models
        }
        # What Prometheus counts (requests, attempts, probes...): see metrics.py.
        self.metrics = metrics if metrics is not None else Metrics()
        # Called with a provider whose breaker just opened (the prober re-probes it soon).
        self.on_provider_opened: Callable[[ProviderState], None] | None = None

    def _breaker(self) -> CircuitBreaker:
        settings = self.config.settings
        return CircuitBreaker(
            settings.circuit_breaker_failure_threshold,
            settings.circuit_breaker_timeout_seconds,
            self.clock,
        )

    def _model_breaker(self, backend: BackendConfig) -> CircuitBreaker:
        key = (backend.provider, backend.model)
        breaker = self.model_breakers.get(key)
        if breaker is None:
            breaker = self.model_breakers[key] = self._breaker()
        return breaker

    def all_backends(self) -> list[Backend]:
        return [b for backends in self.backends.values() for b in backends]

    def candidates(self, model: ModelConfig, user: UserConfig) -> list[Backend]:
        """Backends the config lets serve this user's request for ``model``."""
        return [b for b in self.backends[model.id] if b.usable and b.serves_tags(user.tags)]

    # ----------------------------------------------------------------------------------
    # One attempt: begin, then one outcome (or none), then end
    # ----------------------------------------------------------------------------------

    def begin(self, backend: Backend) -> Admission | None:
        """Claim an attempt on ``backend``; None when either breaker refuses one now."""
        provider = backend.provider.breaker.acquire()
        if provider is None:
            return None
        own = backend.breaker.acquire()
        if own is None:
            backend.provider.breaker.release(provider)
            return None
        return Admission(provider, own)

    def end(self, backend: Backend, admission: Admission) -> None:
        """The attempt is over; frees a half-open trial that recorded no outcome."""
        backend.provider.breaker.release(admission.provider)
        backend.breaker.release(admission.backend)

    def confirm_trial(self, backend: Backend, admission: Admission) -> None:
        """A trial stream reached its first content: the provider and model work again.

        Closing the breakers now, not when the stream ends minutes later, lets other
        requests back in meanwhile. Only trial tickets do anything here.
        """
        if admission.provider.trial:
            self._breaker_success(backend, backend.provider.breaker, admission.provider)
        if admission.backend.trial:
            self._breaker_success(backend, backend.breaker, admission.backend)

    def record_success(
        self, backend: Backend, latency: float, admission: Admission, stream: bool | None = None
    ) -> None:
        """A successful attempt: ``latency`` is its time to first content for a stream
        (``stream=True``), its total time otherwise."""
        now, wall = self.clock(), self.wall_clock()
        provider = backend.provider
        backend.stats.record_success(latency, wall, stream)
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
        self._breaker_success(backend, provider.breaker, admission.provider)
        self._breaker_success(backend, backend.breaker, admission.backend)

    def record_failure(
        self,
        backend: Backend,
        failure: UpstreamFailure,
        admission: Admission,
        evidence: Evidence | None = None,
        stream: bool | None = None,
    ) -> None:
        """One failed attempt (of a stream, or not: ``stream``). With ``evidence`` (the
        request's), a breaker or a backend's confidence this request already charged is not
        charged again."""
        now, wall = self.clock(), self.wall_clock()
        provider = backend.provider
        kind = failure.kind
        backend.stats.record_failure(failure.message, wall, stream)
        provider.stats.record_failure(failure.message, wall)
        if evidence is None or evidence.first(backend.confidence):
            backend.confidence.record(kind, now)
        if kind is FailureKind.RATE_LIMIT and failure.retry_after:
            provider.cooldown_until = max(provider.cooldown_until, now + failure.retry_after)
        if kind in PROVIDER_FAILURES:
            breaker, ticket = provider.breaker, admission.provider
        elif kind in BACKEND_FAILURES:
            # It answered: the provider is reachable and its key accepted.
            self._breaker_success(backend, provider.breaker, admission.provider)
            breaker, ticket = backend.breaker, admission.backend
        else:
            return
        if backend.recovery_successes is not None:
            backend.recovery_successes = 0
        if evidence is not None and not evidence.first(breaker):
            return
        if breaker.record_failure(ticket):
            self._opened(backend, breaker, kind.value)

    def _breaker_success(self, backend: Backend, breaker: CircuitBreaker, ticket: Ticket) -> None:
        if breaker.record_success(ticket):
            self._closed(backend, breaker, "trial request succeeded")

    def record_probe(self, provider: ProviderState, error: str | None) -> None:
        """A health probe's result (``error`` None: it answered)."""
        provider.last_check = self.wall_clock()
        self.metrics.probed(provider.id, error is None)
        provider.probe_ok = error is None
        provider.probe_error = error
        breaker = provider.breaker
        was = breaker.state
        trips = breaker.total_trips
        breaker.record_probe(error is None)
        if error is None and was is not BreakerState.CLOSED:
            self._provider_closed(provider, "recovery probe succeeded")
        elif breaker.total_trips != trips:
            self._provider_opened(provider, "probe_failed")

    def record_model_outcome(self, model_id: str, ok: bool, latency: float) -> None:
        stats = self.model_stats[model_id]
        now = self.wall_clock()
        if ok:
            stats.record_success(latency, now)
        else:
            stats.record_failure("request failed", now)

    def _sharing(self, breaker: CircuitBreaker) -> list[Backend]:
        """Every backend ``breaker`` guards (a provider's, or one upstream model's)."""
        return [
            b for b in self.all_backends() if b.breaker is breaker or b.provider.breaker is breaker
        ]

    def _opened(self, backend: Backend, breaker: CircuitBreaker, reason: str) -> None:
        if breaker is backend.provider.breaker:
            self._provider_opened(backend.provider, reason)
            return
        for sharing in self._sharing(breaker):
            sharing.recovery_successes = 0
        log.warning(
            "circuit_open",
            provider=backend.provider.id,
            model=backend.config.model,
            reason=reason,
            open_seconds=breaker.open_seconds,
        )

    def _closed(self, backend: Backend, breaker: CircuitBreaker, reason: str) -> None:
        if breaker is backend.provider.breaker:
            self._provider_closed(backend.provider, reason)
            return
        for sharing in self._sharing(breaker):
            sharing.stats.consecutive_failures = 0
        log.info(
            "circuit_closed",
            provider=backend.provider.id,
            model=backend.config.model,
            reason=reason,
        )

    def _provider_opened(self, provider: ProviderState, reason: str) -> None:
        for backend in self._sharing(provider.breaker):
            backend.recovery_successes = 0
        log.warning(
            "circuit_open",
            provider=provider.id,
            reason=reason,
            open_seconds=provider.breaker.open_seconds,
        )
        if self.on_provider_opened is not None:
            self.on_provider_opened(provider)

    def _provider_closed(self, provider: ProviderState, reason: str) -> None:
        # The provider answers again: its backends' failure streaks are over.
        for backend in self._sharing(provider.breaker):
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


def _kept_providers(config: Config, previous: BackendPool | None) -> dict[str, ProviderState]:
    """The previous pool's provider states whose provider config is unchanged."""
    if previous is None:
        return {}
    return {
        pid: state
        for pid, state in previous.providers.items()
        if config.providers.get(pid) == state.config
    }


# A backend's identity across reloads: (public model id, provider id, upstream model,
# which occurrence of that pair in the model's list).
BackendIdentity = tuple[str, str, str, int]


def _identities(model: ModelConfig) -> list[BackendIdentity]:
    seen: dict[tuple[str, str], int] = {}
    identities = []
    for b in model.backends:
        nth = seen.get((b.provider, b.model), 0)
        seen[(b.provider, b.model)] = nth + 1
        identities.append((model.id, b.provider, b.model, nth))
    return identities


def _backends_by_identity(
    previous: BackendPool | None, kept: dict[str, ProviderState]
) -> dict[BackendIdentity, Backend]:
    """The previous pool's backends whose provider carries over, by identity."""
    if previous is None:
        return {}
    found: dict[BackendIdentity, Backend] = {}
    for mid, backends in previous.backends.items():
        model = previous.config.models[mid]
        for backend, identity in zip(backends, _identities(model), strict=True):
            if backend.provider.id in kept:
                found[identity] = backend
    return found


def _retune(breaker: CircuitBreaker, settings: Settings) -> None:
    breaker.retune(
        settings.circuit_breaker_failure_threshold, settings.circuit_breaker_timeout_seconds
    )
