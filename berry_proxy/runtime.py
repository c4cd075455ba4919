"""A config and everything derived from it (``Runtime``), and what outlives it (``Gateway``).

``Runtime`` is one immutable bundle: the config, its generation, the backend pool, the
router, the authenticator, the CORS policy, the rate limiter, the provider adapters, the
proxy and the health prober. A request takes the gateway's current runtime once, when it
arrives (``middlewares``), and uses that one to its end: a request in flight finishes on
the config it started with, whatever a reload does meanwhile.

``Gateway`` is the process's half: the upstream ``ClientSession``, the counted metrics,
the rate-limit store, the drain, the clocks, and ``runtime``, the current one. A reload
(``Gateway.reload``: SIGHUP and ``POST /admin/reload`` alike) reads and validates the
file in a worker thread, off the event loop; a bad file changes nothing. A good one is
built into a new runtime that carries over the state of every unchanged provider and of
its backends (``BackendPool``: breakers, health, SmartAI confidence, latency averages,
counters) and shares the rate-limit store (its windows), then swapped in with one
assignment, so no request ever sees half of one config and half of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from .auth import Authenticator
from .config import Config, ConfigError, RateLimitStoreConfig, load_config
from .config_diff import changes, nothing_changed, restart_required
from .cors import CorsPolicy, policy_for
from .drain import Drain
from .health import HealthProber
from .log import get_logger
from .metrics import Metrics
from .mock import MockAdapter
from .notify import Notifier
from .pool import BackendPool, ProviderState
from .proxy import Proxy
from .ratelimit import MemoryStore, RateLimiter, Store
from .ratelimit_redis import RedisStore
from .routing import Router
from .upstream import Adapter, AzureAdapter, OpenAIAdapter

Clock = Callable[[], float]

log = get_logger("berry_proxy")


@dataclass(frozen=True, slots=True, eq=False)
class Runtime:
    config: Config
    generation: int  # 1 at start-up, one more per successful reload
    pool: BackendPool
    router: Router
    authenticator: Authenticator
    cors: CorsPolicy | None  # None when CORS is off (``server.cors_allow_origins: []``)
    limiter: RateLimiter
    adapters: Mapping[str, Adapter]
    proxy: Proxy
    prober: HealthProber


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: ``ok`` with the new generation and what changed, or the errors
    (every one of them) that left the old config serving."""

    ok: bool
    generation: int
    # Why a reload failed: "invalid" (the file), "stopping" (the drain began), "internal"
    # (a bug of ours while building the new config).
    failure: str | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    restart_required: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        if not self.ok:
            return {"reloaded": False, "config_generation": self.generation, "errors": self.errors}
        return {
            "reloaded": True,
            "config_generation": self.generation,
            "changes": self.changes,
            "restart_required": self.restart_required,
            "ignored": self.ignored,
        }


def build_adapters(
    config: Config,
    session: aiohttp.ClientSession,
    previous: Runtime | None = None,
) -> dict[str, Adapter]:
    """One adapter per provider; an unchanged provider keeps its adapter (and whatever it
    holds, such as a mock's random sequence)."""
    adapters: dict[str, Adapter] = {}
    for pid, provider in config.providers.items():
        if previous is not None and previous.config.providers.get(pid) == provider:
            adapters[pid] = previous.adapters[pid]
        elif provider.type == "azure":
            adapters[pid] = AzureAdapter(provider, session)
        elif provider.type == "mock":
            adapters[pid] = MockAdapter(provider)
        else:
            adapters[pid] = OpenAIAdapter(provider, session)
    return adapters


def build_store(config: RateLimitStoreConfig, clock: Clock, metrics: Metrics) -> Store:
    """The rate-limit store ``rate_limit_store.backend`` names."""
    if config.backend == "redis":
        return RedisStore(config, clock, metrics)
    return MemoryStore(clock)


class Gateway:
    """The process-lifetime state, and the current ``Runtime`` in ``runtime``."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: random.Random | None = None,
        health_checks: bool = True,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()  # noqa: S311  # load balancing, not cryptography
        self.health_checks = health_checks
        self.notifier = notifier or Notifier({})
        self.started_at = wall_clock()
        self.metrics = Metrics()
        self.drain = Drain()
        self.store = build_store(config.rate_limit_store, clock, self.metrics)
        self._first_config = config
        self._session: aiohttp.ClientSession | None = None
        self._probing: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """The runtime new requests get (set by ``start``, replaced by ``reload``)."""
        runtime = self._runtime
        if runtime is None:
            raise RuntimeError("the gateway has not started")
        return runtime

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the gateway has not started")
        return self._session

    async def start(self) -> None:
        """Open the upstream session and the store; build the first runtime."""
        # One session for every provider: pooled keep-alive connections. Per-provider
        # concurrency is bounded by the pool's slots, so the connector itself is unbounded.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            raise_for_status=False,
        )
        await self.store.start()
        self._install(self._build(self._first_config, 1, None))

    async def close(self) -> None:
        """Stop probing; let rate-limit settlements finish; close the store and session."""
        await self._stop_probing()
        if self._runtime is not None:
            await self._runtime.limiter.close()
        if self._session is not None:
            await self._session.close()
        self.notifier.close()

    def _build(self, config: Config, generation: int, previous: Runtime | None) -> Runtime:
        clock = self.clock
        pool = BackendPool(
            config,
            clock,
            self.wall_clock,
            self.metrics,
            None if previous is None else previous.pool,
        )
        router = Router(pool, self.rng)
        adapters = build_adapters(config, self.session, previous)
        limiter = RateLimiter(
            config.users,
            self.store,
            self.metrics.rate_limit_refused,
            None if previous is None else previous.limiter.settling,
        )
        jitter_rng = random.Random(self.rng.getrandbits(64))  # noqa: S311  # not cryptography
        prober = HealthProber(pool, adapters, config.settings, jitter_rng)
        # Whichever config a request started on, a breaker it opens is re-probed by the
        # prober running now.
        pool.on_provider_opened = self._provider_opened
        return Runtime(
            config=config,
            generation=generation,
            pool=pool,
            router=router,
            authenticator=Authenticator(config.users),
            cors=policy_for(config.server.cors_allow_origins),
            limiter=limiter,
            adapters=adapters,
            proxy=Proxy(config, pool, router, adapters, clock, limiter, self.drain),
            prober=prober,
        )

    def _provider_opened(self, provider: ProviderState) -> None:
        self.runtime.prober.expedite(provider)

    def _install(self, runtime: Runtime) -> None:
        """Make ``runtime`` the one new requests get, and its prober the one running."""
        self._runtime = runtime  # the swap: one assignment
        if self._probing is not None:
            self._probing.cancel()  # it reads the old pool; the new one takes its schedule
        if self.health_checks:
            self._probing = asyncio.create_task(
                runtime.prober.run_forever(), name=f"health-prober-{runtime.generation}"
            )

    async def _stop_probing(self) -> None:
        probing, self._probing = self._probing, None
        if probing is not None:
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing

    async def reload(self) -> ReloadResult:
        """Read the config file again and, if it is valid, serve it (one at a time)."""
        async with self._reloading:
            self.notifier.reloading()
            result: ReloadResult | None = None
            try:
                result = await self._reload()
            finally:
                if not self.drain.draining:  # else STOPPING=1 has been said: no READY=1
                    status = self.status_line()
                    if result is None or not result.ok:
                        status = f"Reload failed; {status[0].lower()}{status[1:]}"
                    self.notifier.ready(status)
            return result

    async def _reload(self) -> ReloadResult:
        current = self.runtime
        metrics = self.metrics
        if self.config_path is None:
            errors = ["the gateway was not started from a config file: nothing to reload"]
        else:
            try:
                # Parsing and validating a large file must not hold the event loop.
                config = await asyncio.to_thread(load_config, self.config_path)
                errors = []
            except ConfigError as exc:
                errors = list(exc.errors)
            except Exception as exc:  # an unreadable file, a bug: never the old config's end
                log.exception("config_reload_error")
                errors = [f"the config could not be loaded ({type(exc).__name__})"]
        if errors:
            metrics.config_reloaded(ok=False)
            log.error(
                "config_reload_failed",
                generation=current.generation,
                error_count=len(errors),
                errors=errors,
            )
            return ReloadResult(
                ok=False, generation=current.generation, failure="invalid", errors=errors
            )
        if self.drain.draining:  # the stop signal came while the file was read
            errors = ["the gateway is shutting down: the reload was not applied"]
            return ReloadResult(
                ok=False, generation=current.generation, failure="stopping", errors=errors
            )
        found = changes(current.config, config)
        later = restart_required(current.config, config)
        try:
            runtime = self._build(config, current.generation + 1, current)
        except Exception:  # a bug of ours: the old config keeps serving
            log.exception("config_reload_error", generation=current.generation)
            metrics.config_reloaded(ok=False)
            errors = ["the new config could not be applied; see the gateway's log"]
            return ReloadResult(
                ok=False, generation=current.generation, failure="internal", errors=errors
            )
        self._install(runtime)
        metrics.config_reloaded(ok=True)
        for key, why in config.ignored:
            log.warning("config_key_ignored", key=key, reason=why)
        for key in later:
            log.warning("config_restart_required", key=key)
        log.info(
            "config_reloaded",
            generation=runtime.generation,
            unchanged=nothing_changed(found),
            changes=found,
        )
        return ReloadResult(
            ok=True,
            generation=runtime.generation,
            changes=found,
            restart_required=later,
            ignored=[key for key, _ in config.ignored],
        )

    def status_line(self) -> str:
        """What ``systemctl status`` shows: the config being served."""
        runtime = self.runtime
        config = runtime.config
        return (
            f"Serving {len(config.models)} models over {len(config.providers)} providers "
            f"(config generation {runtime.generation})"
        )
