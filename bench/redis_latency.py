"""What the Redis rate-limit store adds to each request's latency.

`bench/run.py` runs this after its CPU tables when `redis-server` is installed. It starts
one `redis-server` on a loopback port (in the run's temporary directory, its own process
group, stopped with the rest) and times, in this process, the limiter's decision for a
user with a request and a token limit: `RateLimiter.admit` (the decision script; the
settlement that follows each request runs in the background) against the Redis store and
against the memory store. The difference is what a request of a limited user waits for
Redis: one round trip on loopback.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from pathlib import Path

from run import Supervisor, free_port

from berry_proxy.config_model import RateLimitConfig, RateLimitStoreConfig, UserConfig
from berry_proxy.metrics import Metrics
from berry_proxy.ratelimit import MemoryStore, RateLimiter, Store
from berry_proxy.ratelimit_redis import RedisStore

DECISIONS = 2000
LIMIT = RateLimitConfig(requests_per_minute=1_000_000_000, tokens_per_minute=1_000_000_000_000)


async def decision_micros(store: Store) -> tuple[float, float]:
    """(p50, p99) microseconds of one admitted request's limiter work on ``store``."""
    await store.start()
    user = UserConfig(id="bench", name="bench", token_sha256=b"", rate_limit=LIMIT)
    limiter = RateLimiter({"bench": user}, store, lambda _user, _limit: None)
    limits = limiter.limits_of("bench")
    assert limits is not None
    samples = []
    try:
        for _ in range(DECISIONS):
            started = time.perf_counter()
            admission = await limiter.admit(limits, 1040)
            samples.append((time.perf_counter() - started) * 1e6)
            limiter.finish(admission, 20)  # in the background: not on the request's path
    finally:
        await limiter.close()
    if store.current() is not store:
        raise RuntimeError("the Redis store fell back to memory during the bench")
    quantiles = statistics.quantiles(samples, n=100)
    return statistics.median(samples), quantiles[98]


def run_redis_latency(tmp: Path) -> None:
    """Print the Redis store's added latency per request, or why it was not measured."""
    server = shutil.which("redis-server")
    if server is None:
        print("\nRedis store latency: not measured (apt-get install redis-server)")
        return
    sup = Supervisor(tmp)
    port = free_port()
    try:
        sup.start("redis", [server, "--port", str(port), "--save", "", "--appendonly", "no"])
        time.sleep(0.5)  # redis-server listens within milliseconds; one check below
        metrics = Metrics()
        config = RateLimitStoreConfig(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0")
        redis_p50, redis_p99 = asyncio.run(
            decision_micros(RedisStore(config, time.monotonic, metrics))
        )
        memory_p50, memory_p99 = asyncio.run(decision_micros(MemoryStore(time.monotonic)))
    finally:
        sup.stop_all()
    print(f"\nRate-limit decision per request ({DECISIONS} admitted requests, one user with a")
    print("request and a token limit; the settlement after it runs in the background):")
    print(f"  memory store: p50 {memory_p50:7.1f} µs   p99 {memory_p99:7.1f} µs")
    print(f"  Redis store:  p50 {redis_p50:7.1f} µs   p99 {redis_p99:7.1f} µs  (loopback)")
    print(f"  Redis adds {redis_p50 - memory_p50:.0f} µs per request at p50")
