"""One attempt's exchange with one backend: what it sends, and what it holds while it runs.

An ``Exchange`` holds two resources for the whole life of an attempt, a stream included:
the breakers' admission (``Exchange.begin``, which may refuse) and one of the provider's
connection slots (taken on ``async with``). Both are given back on the way out of the
``async with``, whatever ended the attempt (success, failure, a departed client, a bug of
ours), so nothing between acquire and release can leak a half-open trial or a slot.

Slots: ``providers.<id>.max_connections`` bounds concurrent upstream requests to one
provider, with a default high enough that ordinary load never waits. At the limit a
request waits at most ``pool_timeout_seconds`` (never longer than the connect timeout,
nor past the request's deadline), then fails with a ``SATURATED`` failure: the gateway's
own limit, never held against the provider. Its ``retry_after`` is an honest estimate of
when a slot frees up: the provider's average slot hold time, times the requests queued
ahead, spread over its slots — and never less than the time this request just waited in
vain.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from types import TracebackType

from .errors import FailureKind, UpstreamFailure
from .log import get_logger
from .openai_request import Body
from .pool import HOLD_EWMA_ALPHA, Admission, Backend, BackendPool, ProviderState
from .upstream import Adapter

log = get_logger("berry_proxy.exchange")

# A provider's saturation is logged at most this often.
SATURATION_LOG_INTERVAL_SECONDS = 1.0


@dataclass(slots=True)
class Attempt:
    """What one try of one backend sends."""

    backend: Backend
    adapter: Adapter
    body: Body
    headers: dict[str, str]
    deadline: float  # monotonic; the request's overall deadline for answering
    add_usage: bool  # we asked for usage the client did not: drop the usage-only chunk


class Exchange:
    """The breakers' admission and a connection slot, held for one attempt."""

    __slots__ = ("_acquired_at", "admission", "backend", "deadline", "pool")

    def __init__(
        self, pool: BackendPool, backend: Backend, admission: Admission, deadline: float
    ) -> None:
        self.pool = pool
        self.backend = backend
        self.admission = admission
        self.deadline = deadline  # monotonic: a slot is not awaited past it
        self._acquired_at: float | None = None

    @classmethod
    def begin(cls, pool: BackendPool, backend: Backend, deadline: float) -> Exchange | None:
        """An exchange admitted by both breakers, or None when either refuses now."""
        admission = pool.begin(backend)
        return None if admission is None else cls(pool, backend, admission, deadline)

    async def __aenter__(self) -> Exchange:
        try:
            await self._take_slot()
        except BaseException:
            self.pool.end(self.backend, self.admission)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        provider = self.backend.provider
        if self._acquired_at is not None:
            held = self.pool.clock() - self._acquired_at
            ewma = provider.hold_ewma
            provider.hold_ewma = held if ewma is None else ewma + HOLD_EWMA_ALPHA * (held - ewma)
            provider.in_flight -= 1
            provider.slots.release()
        self.pool.end(self.backend, self.admission)

    def elapsed(self) -> float:
        """Seconds since the attempt got its connection slot (0 before that)."""
        acquired = self._acquired_at
        return 0.0 if acquired is None else self.pool.clock() - acquired

    async def _take_slot(self) -> None:
        provider = self.backend.provider
        slots = provider.slots
        if slots.locked():
            await self._wait_for_slot(provider)
        else:
            await slots.acquire()  # free: returns at once
        provider.in_flight += 1
        self._acquired_at = self.pool.clock()

    async def _wait_for_slot(self, provider: ProviderState) -> None:
        config = provider.config
        clock = self.pool.clock
        started = clock()
        wait = max(
            0.0,
            min(
                config.pool_timeout_seconds, config.connect_timeout_seconds, self.deadline - started
            ),
        )
        provider.waiting += 1
        try:
            async with asyncio.timeout(wait):
                await provider.slots.acquire()
            return
        except TimeoutError:
            pass
        finally:
            provider.waiting -= 1
        provider.saturations += 1
        waited = clock() - started
        retry_after = self._slot_eta(provider, waited)
        if started - provider.last_saturation_log >= SATURATION_LOG_INTERVAL_SECONDS:
            provider.last_saturation_log = started
            log.warning(
                "provider_saturated",
                provider=provider.id,
                in_flight=provider.in_flight,
                max_connections=config.max_connections,
                waiting=provider.waiting,
                saturations=provider.saturations,
                retry_after=retry_after,
            )
        raise UpstreamFailure(
            FailureKind.SATURATED,
            "every connection to the provider is busy",
            retry_after=retry_after,
        )

    @staticmethod
    def _slot_eta(provider: ProviderState, waited: float) -> float:
        """Seconds until a slot should be free, for ``Retry-After`` (at least 1)."""
        hold = provider.hold_ewma or 0.0
        estimate = hold * (provider.waiting + 1) / provider.config.max_connections
        return float(max(1, math.ceil(max(estimate, waited))))
