"""The health prober: a free ``GET {base_url}/models`` per provider, on a jittered timer.

Probed: every enabled provider serving at least one enabled ``per_token`` backend of an
enabled model. A provider with only ``per_request`` backends is never probed (every call
to it is billed); it is judged by its traffic alone. Each probe is bounded by
``health_check_timeout_seconds``; its result feeds the provider's breaker (a success closes
an open one, a failure counts like a failed request) and what ``/health`` shows.

Schedule: one round at start-up, then each provider again after
``health_check_interval_seconds``, or ``recovery_check_interval_seconds`` while its breaker
is open, each ± ``JITTER`` so that providers (and gateway instances) do not probe in step.
A breaker that opens between probes is re-probed within seconds (``RECOVERY_PROBE_DELAY``):
a provider that is back must not wait out a whole recovery interval. Each provider's next
probe time is kept on its state (``next_probe_at``), where the router reads it to promise
no later a ``Retry-After`` than the next probe. ``probe_once()`` runs one round now; tests
call it directly. ``run_forever()`` is ``run()`` restarted after a crash (logged), so a
bug of ours never leaves the gateway without health checks.

A probe counts as answered when the server replies below 400, or 404/405 (an
OpenAI-compatible server without a model list is still up); 401/403 (a rejected key),
429, 5xx, timeouts and connection errors are failures.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .breaker import BreakerState
from .config import Settings
from .errors import UpstreamFailure, upstream_errors
from .log import get_logger
from .pool import BackendPool, ProviderState
from .upstream import Adapter

Sleep = Callable[[float], Awaitable[None]]

log = get_logger("berry_proxy.health")

# Each interval is stretched or shrunk by up to this fraction, at random.
JITTER = 0.1
# Never spin: the loop sleeps at least this long between rounds.
MIN_SLEEP_SECONDS = 0.05
# A breaker that just opened is re-probed after about this long (± JITTER).
RECOVERY_PROBE_DELAY = 2.0
# After a crash, run() is restarted after this long, doubling up to the maximum.
RESTART_DELAY_SECONDS = 1.0
MAX_RESTART_DELAY_SECONDS = 30.0
ANSWERED = frozenset({404, 405})


class HealthProber:
    def __init__(
        self,
        pool: BackendPool,
        adapters: Mapping[str, Adapter],
        settings: Settings,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.pool = pool
        self.adapters = adapters
        self.settings = settings
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.sleep = sleep
        # Provider id -> monotonic time. A provider a reload carried over keeps the
        # schedule the previous prober gave it.
        self.next_due: dict[str, float] = {
            p.id: p.next_probe_at for p in self.probed_providers() if p.next_probe_at is not None
        }
        self._wake = asyncio.Event()  # set when a schedule moved earlier
        pool.on_provider_opened = self.expedite

    def expedite(self, provider: ProviderState) -> None:
        """Probe ``provider`` within seconds (its breaker just opened).

        Only a provider this prober's pool probes: one a request of an older config
        opened may be gone from this one, or no longer probed (a stale schedule would
        make the loop spin).
        """
        if self.pool.providers.get(provider.id) is not provider or not (
            provider.probed and provider.config.enabled
        ):
            return
        due = self.pool.clock() + RECOVERY_PROBE_DELAY * (1 + self.rng.uniform(-JITTER, JITTER))
        if due < self.next_due.get(provider.id, float("inf")):
            self._schedule(provider, due)
            self._wake.set()

    def _schedule(self, provider: ProviderState, due: float) -> None:
        self.next_due[provider.id] = due
        provider.next_probe_at = due

    def probed_providers(self) -> list[ProviderState]:
        return [p for p in self.pool.providers.values() if p.config.enabled and p.probed]

    async def probe_once(
        self, providers: Sequence[ProviderState] | None = None
    ) -> dict[str, str | None]:
        """Probe ``providers`` (default: all probed ones) now, concurrently.

        Returns each provider's error, None for a healthy answer, and schedules its next
        probe.
        """
        targets = list(self.probed_providers() if providers is None else providers)
        errors = await asyncio.gather(*(self._probe(p) for p in targets))
        now = self.pool.clock()
        for provider, error in zip(targets, errors, strict=True):
            was_healthy = provider.healthy
            self.pool.record_probe(provider, error)
            if provider.healthy != was_healthy:
                log.info(
                    "provider_health_changed",
                    provider=provider.id,
                    healthy=provider.healthy,
                    error=error,
                )
            self._schedule(provider, now + self.interval(provider))
        return {p.id: e for p, e in zip(targets, errors, strict=True)}

    def interval(self, provider: ProviderState) -> float:
        """Seconds until ``provider``'s next probe, jittered."""
        settings = self.settings
        base = (
            settings.recovery_check_interval_seconds
            if provider.breaker.state is BreakerState.OPEN
            else settings.health_check_interval_seconds
        )
        return base * (1 + self.rng.uniform(-JITTER, JITTER))

    async def run(self) -> None:
        """Probe forever: due providers each round, sleeping until the next is due.

        Those without a schedule yet are probed at once.
        """
        providers = self.probed_providers()
        if not providers:
            return
        clock = self.pool.clock
        unscheduled = [p for p in providers if p.id not in self.next_due]
        if unscheduled:
            await self.probe_once(unscheduled)
        while True:
            # Only its own providers: a schedule for one it does not probe never comes due.
            wake = min(self.next_due.get(p.id, float("inf")) for p in providers)
            await self._nap(max(MIN_SLEEP_SECONDS, wake - clock()))
            now = clock()
            due = [p for p in providers if self.next_due[p.id] <= now]
            if due:
                await self.probe_once(due)

    async def _nap(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a schedule moves earlier meanwhile."""
        self._wake.clear()
        sleeping = asyncio.ensure_future(self.sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, woken):
                task.cancel()
        if sleeping.done() and not sleeping.cancelled():
            sleeping.result()  # an injected sleep may raise to end the loop (tests)

    async def run_forever(self) -> None:
        """``run()``, restarted after a crash (logged) until cancelled."""
        delay = RESTART_DELAY_SECONDS
        while True:
            try:
                await self.run()
                return  # nothing to probe
            except Exception:
                log.exception("health_prober_crashed", restart_in_seconds=delay)
            await self.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY_SECONDS)

    async def _probe(self, provider: ProviderState) -> str | None:
        try:
            with upstream_errors("health check"):
                async with asyncio.timeout(self.settings.health_check_timeout_seconds):
                    status = await self.adapters[provider.id].probe()
        except UpstreamFailure as failure:
            return failure.message
        except Exception:
            # Not a transport failure: a bug of ours. Keep probing the others.
            log.exception("health_check_error", provider=provider.id)
            return "health check failed"
        if status < 400 or status in ANSWERED:
            return None
        return f"health check answered HTTP {status}"
