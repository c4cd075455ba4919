"""Prometheus metrics: every family of SPEC §5, defined once here, counted almost for free.

The families (names, help, labels, buckets) are module-level constants. Their values
live in one ``Metrics`` object per app (its ``Gateway`` holds it, through every reload),
as plain dictionaries keyed by label tuples: the hot path pays a dictionary update per
count and a ``bisect`` per observation, never a lock or ``prometheus_client``'s label
lookup, and a test that builds many apps gets as many independent sets of numbers (no
registry to collide in).

What describes state (breaker state, backend health, effective weights, in-flight requests,
build info) is not counted at all: ``GatewayCollector`` reads it from the pool and the
router when Prometheus scrapes, so it shows exactly what routing sees, with the weights the
router draws with (``Router.breakdowns``). ``registry_for`` builds the app's registry: that
collector plus ``prometheus_client``'s process, platform and GC collectors. The state
families read the config being served now: after a reload, the new one.

Label values come from config ids only (route templates, model, user and provider ids,
status codes, failure kinds): nothing a client sends becomes a label, so each family has
a bounded number of series.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .breaker import BreakerState

if TYPE_CHECKING:
    from .context import RequestContext
    from .pool import BackendPool
    from .routing import Router

# Seconds. Time to first token and request duration: from ~10 ms (an embedding, a cached
# answer) to minutes (a long reasoning stream).
LLM_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# The gateway's own share of a request: from 50 µs to 100 ms.
OVERHEAD_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # without the _total suffix of counters (prometheus_client adds it)
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


REQUESTS = Family(
    "berry_requests",
    "Requests answered, by route template, model, user and status",
    ("route", "model", "user", "status"),
)
REQUEST_DURATION = Family(
    "berry_request_duration_seconds",
    "Time from a request's arrival to its answer's end",
    ("route", "model"),
    LLM_SECONDS,
)
TIME_TO_FIRST_TOKEN = Family(
    "berry_time_to_first_token_seconds",
    "Time from a stream request's arrival to its first content",
    ("model", "provider"),
    LLM_SECONDS,
)
OVERHEAD = Family(
    "berry_overhead_seconds",
    "The gateway's own time before an answer started (not upstream waits)",
    ("route",),
    OVERHEAD_SECONDS,
)
UPSTREAM_REQUESTS = Family(
    "berry_upstream_requests",
    "Attempts sent upstream, by provider, model and outcome",
    ("provider", "model", "outcome"),
)
UPSTREAM_DURATION = Family(
    "berry_upstream_duration_seconds",
    "Time an attempt held its provider connection (a stream: until it ended)",
    ("provider",),
    LLM_SECONDS,
)
FAILOVERS = Family(
    "berry_failovers",
    "Attempts made after an earlier attempt of the same request failed, by the failure",
    ("model", "reason"),
)
TOKENS = Family(
    "berry_tokens",
    "Tokens the upstreams reported, by user, model and type",
    ("user", "model", "type"),
)
RATE_LIMITED = Family(
    "berry_rate_limited", "Requests refused by a per-user rate limit", ("user", "limit")
)
RATE_LIMIT_STORE_ERRORS = Family(
    "berry_rate_limit_store_errors",
    "Calls to the shared rate-limit store (Redis) that failed or timed out",
    (),
)
RATE_LIMIT_STORE_DEGRADED = Family(
    "berry_rate_limit_store_degraded",
    "1 while the shared rate-limit store is unreachable and limits are per instance",
    (),
)
AUTH_FAILURES = Family("berry_auth_failures", "Requests refused for their token", ("reason",))
HEALTH_PROBES = Family(
    "berry_health_probes", "Health probes of providers, by result", ("provider", "result")
)
LB_SELECTIONS = Family(
    "berry_lb_selections",
    "Backends chosen for an attempt, by model, strategy and provider",
    ("model", "strategy", "provider"),
)
CONFIG_RELOADS = Family("berry_config_reloads", "Configuration reloads, by result", ("result",))
IN_FLIGHT = Family(
    "berry_in_flight_requests", "Requests being answered now, by route template", ("route",)
)
BREAKER_STATE = Family(
    "berry_circuit_breaker_state",
    "A provider's circuit breaker: 0 closed, 1 half-open, 2 open",
    ("provider",),
)
BACKEND_HEALTHY = Family(
    "berry_backend_healthy",
    "1 when a provider's upstream model is healthy, else 0",
    ("provider", "model"),
)
EFFECTIVE_WEIGHT = Family(
    "berry_backend_effective_weight",
    "The weight the router draws a backend with now",
    ("model", "provider", "backend_model"),
)
BUILD_INFO = Family("berry_build_info", "The running version (always 1)", ("version",))

COUNTERS = (
    REQUESTS, UPSTREAM_REQUESTS, FAILOVERS, TOKENS, RATE_LIMITED, RATE_LIMIT_STORE_ERRORS,
    AUTH_FAILURES, HEALTH_PROBES, LB_SELECTIONS, CONFIG_RELOADS,
)  # fmt: skip
HISTOGRAMS = (REQUEST_DURATION, TIME_TO_FIRST_TOKEN, OVERHEAD, UPSTREAM_DURATION)
GAUGES = (
    IN_FLIGHT,
    RATE_LIMIT_STORE_DEGRADED,
    BREAKER_STATE,
    BACKEND_HEALTHY,
    EFFECTIVE_WEIGHT,
    BUILD_INFO,
)
# Every family name as a scrape shows it (counters with their _total suffix); the shipped
# dashboard and alert rules may name only these (and a histogram's _bucket/_sum/_count).
EXPORTED_METRICS = frozenset(
    [f"{f.name}_total" for f in COUNTERS] + [f.name for f in HISTOGRAMS + GAUGES]
)

BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

Labels = tuple[str, ...]


class Histogram:
    """Observations per label set, in ``bounds`` buckets (each counted once; cumulated at
    scrape time) with their sum."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        counts, total = series
        counts[bisect.bisect_left(self.bounds, value)] += 1
        total[0] += value

    def family(self, spec: Family) -> HistogramMetricFamily:
        family = HistogramMetricFamily(spec.name, spec.help, labels=spec.labels)
        edges = [_bound(b) for b in self.bounds] + ["+Inf"]
        for labels, (counts, total) in self.series.items():
            running, buckets = 0, []
            for edge, count in zip(edges, counts, strict=True):
                running += count
                buckets.append((edge, float(running)))
            family.add_metric(list(labels), buckets, total[0])
        return family


def _bound(value: float) -> str:
    return repr(float(value))


class Metrics:
    """The counted numbers of one app. Every method is a few dictionary operations."""

    __slots__ = (
        "auth_failures",
        "auth_successes",
        "config_reloads",
        "failovers",
        "health_probes",
        "in_flight",
        "lb_selections",
        "overhead",
        "proxied_in_flight",
        "proxied_requests",
        "rate_limit_store_degraded",
        "rate_limit_store_errors",
        "rate_limited",
        "request_duration",
        "requests",
        "time_to_first_token",
        "tokens",
        "upstream_duration",
        "upstream_requests",
    )

    def __init__(self) -> None:
        self.requests: dict[Labels, int] = {}
        self.upstream_requests: dict[Labels, int] = {}
        self.failovers: dict[Labels, int] = {}
        self.tokens: dict[Labels, int] = {}
        self.rate_limited: dict[Labels, int] = {}
        self.rate_limit_store_errors = 0  # counted by the shared store
        self.rate_limit_store_degraded = 0  # set by the shared store when it switches
        self.auth_failures: dict[Labels, int] = {}
        self.auth_successes = 0
        self.health_probes: dict[Labels, int] = {}
        self.lb_selections: dict[Labels, int] = {}
        self.config_reloads: dict[Labels, int] = {}
        self.in_flight: dict[str, int] = {}
        # Proxied requests (chat, completions, embeddings): all so far, and being served.
        self.proxied_requests = 0
        self.proxied_in_flight = 0
        self.request_duration = Histogram(REQUEST_DURATION.buckets)
        self.time_to_first_token = Histogram(TIME_TO_FIRST_TOKEN.buckets)
        self.overhead = Histogram(OVERHEAD.buckets)
        self.upstream_duration = Histogram(UPSTREAM_DURATION.buckets)

    # A request, from the middleware: at its start and at its end -----------------------

    def request_started(self, route: str) -> None:
        in_flight = self.in_flight
        in_flight[route] = in_flight.get(route, 0) + 1

    def request_ended(self, ctx: RequestContext, duration: float) -> None:
        route, model = ctx.route, ctx.model or ""
        self.in_flight[route] -= 1
        _add(self.requests, (route, model, ctx.user or "", str(ctx.status or 0)), 1)
        self.request_duration.observe((route, model), duration)
        if ctx.overhead is not None:
            self.overhead.observe((route,), ctx.overhead)
        status = ctx.status
        if ctx.stream and status == 200 and ctx.time_to_first_byte is not None and ctx.provider:
            self.time_to_first_token.observe((model, ctx.provider), ctx.time_to_first_byte)
        user = ctx.user or ""
        # Only positive counts: an upstream reporting -5 must not make a counter go down.
        prompt, completion = ctx.prompt_tokens, ctx.completion_tokens
        if prompt is not None and prompt > 0:
            _add(self.tokens, (user, model, "prompt"), prompt)
        if completion is not None and completion > 0:
            _add(self.tokens, (user, model, "completion"), completion)

    # Authentication, attempts, probes -----------------------------------------------------

    def authenticated(self) -> None:
        self.auth_successes += 1

    def auth_failed(self, reason: str) -> None:
        _add(self.auth_failures, (reason,), 1)

    def rate_limit_refused(self, user: str, limit: str) -> None:
        _add(self.rate_limited, (user, limit), 1)

    def selected(self, model: str, strategy: str, provider: str) -> None:
        """The router's order put this backend up for an attempt that is being sent."""
        _add(self.lb_selections, (model, strategy, provider), 1)

    def failed_over(self, model: str, reason: str) -> None:
        _add(self.failovers, (model, reason), 1)

    def attempted(self, provider: str, model: str, outcome: str, seconds: float) -> None:
        _add(self.upstream_requests, (provider, model, outcome), 1)
        self.upstream_duration.observe((provider,), seconds)

    def probed(self, provider: str, ok: bool) -> None:
        _add(self.health_probes, (provider, "ok" if ok else "failed"), 1)

    def config_reloaded(self, ok: bool) -> None:
        _add(self.config_reloads, ("success" if ok else "failed",), 1)

    @property
    def auth_total(self) -> int:
        return self.auth_successes + sum(self.auth_failures.values())

    def selections_by_strategy(self) -> dict[str, int]:
        usage: dict[str, int] = {}
        for (_, strategy, _), count in self.lb_selections.items():
            usage[strategy] = usage.get(strategy, 0) + count
        return usage


def _add(counts: dict[Labels, int], labels: Labels, amount: int) -> None:
    counts[labels] = counts.get(labels, 0) + amount


# The pool and router of the config being served now (they change at each reload).
Current = Callable[[], tuple["BackendPool", "Router"]]


class GatewayCollector(Collector):
    """Every berry_* family, at scrape time: the counted numbers, and the state read off
    the current pool and router."""

    def __init__(self, metrics: Metrics, current: Current) -> None:
        self.metrics = metrics
        self.current = current

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        counted = (
            (REQUESTS, metrics.requests),
            (UPSTREAM_REQUESTS, metrics.upstream_requests),
            (FAILOVERS, metrics.failovers),
            (TOKENS, metrics.tokens),
            (RATE_LIMITED, metrics.rate_limited),
            (RATE_LIMIT_STORE_ERRORS, {(): metrics.rate_limit_store_errors}),
            (AUTH_FAILURES, metrics.auth_failures),
            (HEALTH_PROBES, metrics.health_probes),
            (LB_SELECTIONS, metrics.lb_selections),
            (CONFIG_RELOADS, metrics.config_reloads),
        )
        for spec, counts in counted:
            counter = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, value in list(counts.items()):
                counter.add_metric(list(labels), float(value))
            yield counter
        yield metrics.request_duration.family(REQUEST_DURATION)
        yield metrics.time_to_first_token.family(TIME_TO_FIRST_TOKEN)
        yield metrics.overhead.family(OVERHEAD)
        yield metrics.upstream_duration.family(UPSTREAM_DURATION)
        yield from self._state()

    def _state(self) -> Iterator[Metric]:
        pool, router = self.current()
        metrics = self.metrics
        in_flight = _gauge(IN_FLIGHT)
        for route, count in list(metrics.in_flight.items()):
            in_flight.add_metric([route], float(count))
        yield in_flight
        degraded = _gauge(RATE_LIMIT_STORE_DEGRADED)
        degraded.add_metric([], float(metrics.rate_limit_store_degraded))
        yield degraded
        breakers = _gauge(BREAKER_STATE)
        for pid, provider in pool.providers.items():
            breakers.add_metric([pid], float(BREAKER_VALUES[provider.breaker.state]))
        yield breakers
        healthy = _gauge(BACKEND_HEALTHY)
        seen: set[tuple[str, str]] = set()
        weights = _gauge(EFFECTIVE_WEIGHT)
        for model in pool.config.models.values():
            backends = pool.backends[model.id]
            drawn: dict[tuple[str, str], float] = {}
            for backend, weight in zip(backends, router.breakdowns(model, backends), strict=True):
                key = (backend.provider.id, backend.config.model)
                if key not in seen:
                    seen.add(key)
                    healthy.add_metric(list(key), 1.0 if backend.healthy else 0.0)
                # The same upstream model listed twice for one model is drawn twice; a
                # backend the config disables is never drawn.
                drawn[key] = drawn.get(key, 0.0) + (
                    weight.effective_weight if backend.usable else 0.0
                )
            for (pid, backend_model), weight_sum in drawn.items():
                weights.add_metric([model.id, pid, backend_model], weight_sum)
        yield healthy
        yield weights
        info = _gauge(BUILD_INFO)
        info.add_metric([__version__], 1.0)
        yield info


def _gauge(spec: Family) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def registry_for(metrics: Metrics, current: Current) -> CollectorRegistry:
    """The app's registry: its berry_* families and the default process metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(metrics, current))
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(default)
    return registry
