"""The Redis rate-limit store: N gateway instances, one limit (SPEC §5 "Rate limits").

Each decision is one server-side Lua script, one round trip: it reads the user's limits,
checks every one with ``ratelimit.gcra``'s formula and spends on all of them only when each
admits the request, atomically, on Redis's clock (``TIME``), so instances whose clocks
differ still share one window. Concurrency leases are a sorted set per user scored by
their expiry, so a lease of an instance that died holding it lapses by itself. Keys are
``<key_prefix>{<user id>}:<limit>``: the braces keep one user's keys in one cluster slot.

Redis being down never turns into a 401, a 500 or a hang. Every call is bounded by a short
timeout without retries; the first failure logs one warning, counts in
``berry_rate_limit_store_errors_total`` and switches decisions to this instance's memory
(``MemoryStore``: per-instance limits) while a background task pings Redis each second;
the first answer switches back, with one log line. A request admitted by one store
settles and returns its lease to that same store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config_model import RateLimitStoreConfig
from .log import get_logger
from .metrics import Metrics
from .ratelimit import (
    LEASE_SECONDS,
    MAX_CONCURRENT,
    Decision,
    MemoryStore,
    Rule,
    Store,
    StoreUnavailable,
    UserLimits,
    rule_view,
)

log = get_logger("berry_proxy.ratelimit")
T = TypeVar("T")

# Each call to Redis, connection included, gets this long: a request must not wait on a
# sick Redis for longer than it takes to notice it is sick.
CALL_TIMEOUT_SECONDS = 0.25
RECOVERY_INTERVAL_SECONDS = 1.0
MAX_CONNECTIONS = 64
# Leases whose return Redis missed, kept to return when it answers: bounded, as the
# requests of one outage are.
MAX_UNRETURNED = 100_000

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: one per rule. ARGV: interval, window, cost per rule. Returns {1, remaining, reset,
# ...} per rule when admitted (and spent), {0, index, remaining, wait} when refused.
DECIDE = (
    _NOW
    + """
local new, out = {}, {1}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local stored = redis.call('GET', KEYS[i])
  local tat = stored and tonumber(stored) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local wait = new_tat - now - window
  if wait > 1e-9 then
    return {0, i, math.max(0, math.floor((window - (tat - now)) / interval)), tostring(wait)}
  end
  new[i] = new_tat
  out[#out + 1] = math.max(0, math.floor((window - (new_tat - now)) / interval + 1e-9))
  out[#out + 1] = tostring(new_tat - now)
end
for i = 1, #KEYS do
  local ttl = math.ceil((new[i] - now) * 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.17g', new[i]), 'PX', ttl)
end
return out
"""
)

# KEYS: the token rule's key. ARGV: interval, delta (units, negative for a refund).
SETTLE = (
    _NOW
    + """
local stored = redis.call('GET', KEYS[1])
local tat = stored and tonumber(stored) or now
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[2]) * tonumber(ARGV[1])
if new_tat < now then new_tat = now end
local ttl = math.ceil((new_tat - now) * 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl)
return 1
"""
)

# KEYS: the user's lease set. ARGV: limit, lease id, lease seconds. Returns 1 if taken.
ACQUIRE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""
)

# KEYS: one per rule, then the lease set. Returns, per rule, tat - now (0 when full), then
# the leases in use.
PEEK = (
    _NOW
    + """
local out = {}
for i = 1, #KEYS - 1 do
  local stored = redis.call('GET', KEYS[i])
  local used = stored and (tonumber(stored) - now) or 0
  out[i] = tostring(math.max(0, used))
end
redis.call('ZREMRANGEBYSCORE', KEYS[#KEYS], '-inf', now)
out[#KEYS] = redis.call('ZCARD', KEYS[#KEYS])
return out
"""
)


class RedisStore(Store):
    name = "redis"

    def __init__(
        self,
        config: RateLimitStoreConfig,
        clock: Callable[[], float],
        metrics: Metrics,
        recovery_interval: float = RECOVERY_INTERVAL_SECONDS,
    ) -> None:
        self.prefix = config.key_prefix
        self.metrics = metrics
        self.fallback = MemoryStore(clock)
        self.degraded = False
        self.recovery_interval = recovery_interval
        self._recovering: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # leases returned late
        self._unreturned: set[tuple[str, str]] = set()  # (key, lease) Redis missed
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=CALL_TIMEOUT_SECONDS,  # the wait for a free pooled connection
            socket_timeout=CALL_TIMEOUT_SECONDS,
            socket_connect_timeout=CALL_TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = aioredis.Redis.from_pool(pool)  # it owns the pool: aclose closes it
        self._decide = self.client.register_script(DECIDE)
        self._settle = self.client.register_script(SETTLE)
        self._acquire = self.client.register_script(ACQUIRE)
        self._peek = self.client.register_script(PEEK)

    # -- state --------------------------------------------------------------------------

    def current(self) -> Store:
        return self.fallback if self.degraded else self

    def status(self) -> dict[str, Any]:
        return {"backend": self.name, "degraded": self.degraded, "key_prefix": self.prefix}

    async def start(self) -> None:
        """Check Redis once at start-up: unreachable, the gateway starts on memory."""
        with contextlib.suppress(StoreUnavailable):
            await self._call(self.client.ping)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._recovering is not None:
            self._recovering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovering
        await self.client.aclose()

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                return await call()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise StoreUnavailable from None

    def _failed(self, exc: BaseException) -> None:
        self.metrics.rate_limit_store_errors += 1
        if self.degraded:
            return
        self.degraded = True
        self.metrics.rate_limit_store_degraded = 1
        # The error's type only: redis-py's messages can name the host and port.
        log.warning(
            "rate_limit_store_unavailable",
            store=self.name,
            error=type(exc).__name__,
            effect="limits are per instance until Redis answers again",
        )
        if self._recovering is None or self._recovering.done():
            self._recovering = asyncio.get_running_loop().create_task(
                self._recover(), name="rate-limit-store-recovery"
            )

    async def _recover(self) -> None:
        probe = f"{self.prefix}probe"
        while self.degraded:
            await asyncio.sleep(self.recovery_interval)
            try:
                async with asyncio.timeout(CALL_TIMEOUT_SECONDS):
                    # A write, not a PING: a Redis that answers but refuses writes (out of
                    # memory, a read-only replica) is still down for the limiter.
                    await self.client.set(probe, b"1", px=1000)
                    await self._return_unreturned()
            except Exception:  # any failure: still down; the task must live
                self.metrics.rate_limit_store_errors += 1
                continue
            self.degraded = False
            self.metrics.rate_limit_store_degraded = 0
            log.info("rate_limit_store_recovered", store=self.name)

    # -- decisions ----------------------------------------------------------------------

    def _key(self, limits: UserLimits, name: str) -> str:
        return f"{self.prefix}{{{limits.user}}}:{name}"

    async def decide(self, limits: UserLimits, tokens: int) -> Decision:
        rules = limits.rules
        args: list[float] = []
        for rule in rules:
            args += (rule.interval, rule.window, tokens if rule.tokens else 1)
        keys = [self._key(limits, rule.name) for rule in rules]
        answer = await self._call(lambda: self._decide(keys=keys, args=args))
        return _decision(rules, answer)

    async def settle(self, limits: UserLimits, delta_tokens: int) -> None:
        rule = limits.tokens
        if rule is None or not delta_tokens:
            return
        key = self._key(limits, rule.name)
        # A settlement Redis missed only leaves the estimate charged: nothing to redo.
        with contextlib.suppress(StoreUnavailable):
            await self._call(lambda: self._settle(keys=[key], args=[rule.interval, delta_tokens]))

    async def acquire(self, limits: UserLimits, lease: str) -> bool:
        key = self._key(limits, MAX_CONCURRENT)
        args: list[str | int | float] = [limits.max_concurrent or 0, lease, LEASE_SECONDS]
        call = asyncio.ensure_future(self._call(lambda: self._acquire(keys=[key], args=args)))
        try:
            return bool(await asyncio.shield(call))
        except asyncio.CancelledError:
            # The client left while the script was on its way: it may still take the
            # lease, which must then go back now, not lapse in an hour.
            call.add_done_callback(lambda done: self._return_late(done, limits, lease))
            raise

    def _return_late(self, done: asyncio.Future[Any], limits: UserLimits, lease: str) -> None:
        if done.cancelled() or done.exception() is not None or not done.result():
            return
        task = asyncio.get_running_loop().create_task(self.release(limits, lease))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def release(self, limits: UserLimits, lease: str) -> None:
        key = self._key(limits, MAX_CONCURRENT)
        try:
            if self.degraded:  # do not wait on a Redis known to be down
                raise StoreUnavailable
            await self._call(lambda: self.client.zrem(key, lease))
        except StoreUnavailable:
            # Given back when Redis answers again (before decisions return to it), not
            # left to lapse after LEASE_SECONDS, which would hold a user's slot meanwhile.
            if len(self._unreturned) < MAX_UNRETURNED:
                self._unreturned.add((key, lease))

    async def _return_unreturned(self) -> None:
        while self._unreturned:
            key, lease = next(iter(self._unreturned))
            await self.client.zrem(key, lease)
            self._unreturned.discard((key, lease))

    async def peek(self, limits: UserLimits) -> dict[str, Any]:
        if self.degraded:
            return await self.fallback.peek(limits)
        rules = limits.rules
        keys = [self._key(limits, r.name) for r in rules] + [self._key(limits, MAX_CONCURRENT)]
        try:
            answer = await self._call(lambda: self._peek(keys=keys, args=[]))
        except StoreUnavailable:
            return await self.fallback.peek(limits)
        view: dict[str, Any] = {}
        for rule, used in zip(rules, answer, strict=False):
            view[rule.name] = rule_view(rule, float(used), 0.0)  # tat - now, seen at 0
        if limits.max_concurrent is not None:
            view[MAX_CONCURRENT] = {"limit": limits.max_concurrent, "in_use": int(answer[-1])}
        return view


def _decision(rules: tuple[Rule, ...], answer: list[Any]) -> Decision:
    """The DECIDE script's answer as a ``Decision``."""
    if int(answer[0]) == 1:
        states = tuple(
            (rule, int(answer[1 + 2 * i]), float(answer[2 + 2 * i])) for i, rule in enumerate(rules)
        )
        return Decision(states)
    refused = rules[int(answer[1]) - 1]
    wait = float(answer[3])
    return Decision((), refused, wait)
