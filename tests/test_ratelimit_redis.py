"""Per-user rate limits with the Redis store: N gateways, one limit (SPEC §5 "Rate limits").

Every test runs a real ``redis-server`` (Debian's, on a free loopback port, no
persistence, its own directory; stopped by its PID) and drives one or two in-process
gateways sharing it over HTTP: one limit across instances (sequential and concurrent),
``max_concurrent`` leases across instances, tokens reserved then settled in Redis, the
switch to per-instance memory limits when Redis dies, hangs or is down at start-up, and
back when it answers again. One test holds the Lua ``DECIDE`` script to
``ratelimit.gcra``'s answers through ``MemoryStore``; the last one checks that a gateway
shutting down closes its connections to Redis.

Without ``redis-server`` the tests skip, unless ``BERRY_REQUIRE_REDIS=1`` makes that a
failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.config_model import RateLimitStoreConfig
from berry_proxy.metrics import Metrics
from berry_proxy.ratelimit import (
    TOKENS_PER_MINUTE,
    Decision,
    MemoryStore,
    Rule,
    UserLimits,
    estimate_tokens,
)
from berry_proxy.ratelimit_redis import RedisStore

from .conftest import (
    ADMIN_TOKEN,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    base_url,
    chat_body,
    free_port,
    gateway_config,
    required_tool,
)

LIMITED_TOKEN = "redis-limited-user-token-0123456789"
# Every HTTP exchange of these tests is bounded: a Redis outage must never become a hang.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=5)
# The gateways' recovery ping interval in these tests (the default is 1 s; the store takes
# it as a constructor argument, which the config does not reach).
RECOVERY_INTERVAL = 0.1
# How long a gateway may take to notice that Redis answers again.
RECOVERY_WITHIN = 10.0


# ------------------------------------------------------------------------- redis-server


def redis_binary() -> str:
    """redis-server's path; skips the test without it, unless ``BERRY_REQUIRE_REDIS=1``
    makes that a failure."""
    return required_tool(("redis-server",), "BERRY_REQUIRE_REDIS", "redis-server")


async def answers_ping(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING now (bounded: 0.5 s)."""
    try:
        async with asyncio.timeout(0.5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                return await reader.readline() == b"+PONG\r\n"
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False


@dataclass
class RedisServer:
    """``redis-server`` on one loopback port, started, killed and restarted on that same
    port by the test; always stopped by its PID."""

    binary: str
    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self, within: float = 10.0) -> None:
        """Start it on ``port`` and wait until it answers PING."""
        assert not self.running, "redis-server is already running"
        self.starts += 1
        log_path = self.directory / f"redis-{self.starts}.log"
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
        ]
        with log_path.open("wb") as log:
            # Popen only forks and execs; S603: Debian's redis-server, arguments of our own.
            self.process = subprocess.Popen(  # noqa: ASYNC220, S603
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + within
        while not await answers_ping(self.port):
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited early: {log_path.read_text()}")
            if time.monotonic() > deadline:
                await self.stop()
                raise AssertionError(f"redis-server did not answer PING within {within} s")
            await asyncio.sleep(0.02)  # another process starting: nothing to await

    def pause(self) -> None:
        """SIGSTOP: Redis keeps its connections but answers nothing (a hung server)."""
        assert self.process is not None
        assert self.running
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections drop."""
        await self._signal(signal.SIGKILL, within=5.0)

    async def stop(self, within: float = 5.0) -> None:
        """SIGTERM; SIGKILL if it has not exited ``within`` seconds."""
        self.resume()  # a stopped process would not act on SIGTERM
        if not await self._signal(signal.SIGTERM, within):
            await self._signal(signal.SIGKILL, within)

    async def _signal(self, sig: signal.Signals, within: float) -> bool:
        """Send ``sig`` by PID; whether the process exited ``within`` seconds."""
        process = self.process
        if process is None or process.poll() is not None:
            return True
        process.send_signal(sig)
        try:
            await asyncio.to_thread(process.wait, within)
        except subprocess.TimeoutExpired:
            return False
        return True


@pytest.fixture
async def redis_down(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A Redis not started yet: its port is free and nothing listens there."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(redis_binary(), directory)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def redis_server(redis_down: RedisServer) -> RedisServer:
    """A running Redis (stopped by ``redis_down`` at the end of the test)."""
    await redis_down.start()
    return redis_down


# ------------------------------------------------------------------------------ helpers


def redis_config(upstream: FakeUpstream, redis: RedisServer, **limit: int) -> dict[str, Any]:
    """The conftest gateway with user ``limited`` (``limit``), its limits in ``redis``
    under a key prefix of this test's own."""
    raw = gateway_config(upstream)
    raw["users"]["limited"] = {"token": LIMITED_TOKEN, "rate_limit": limit}
    raw["rate_limit_store"] = {
        "backend": "redis",
        "redis_url": redis.url,
        "key_prefix": f"berry-test-{secrets.token_hex(6)}:",
    }
    return raw


def redis_store(server: TestServer) -> RedisStore:
    store = server.app[keys.GATEWAY].runtime.limiter.store
    assert isinstance(store, RedisStore), f"the gateway limits with {store.name}, not redis"
    return store


@pytest.fixture
def redis_gateway(start_gateway: GatewayFactory) -> GatewayFactory:
    """``start_gateway`` for a Redis-store config, whose store pings every
    ``RECOVERY_INTERVAL`` while degraded (its recovery task reads the interval at each
    round; the config does not reach it)."""

    async def start(raw: dict[str, Any]) -> TestServer:
        server = await start_gateway(raw)
        redis_store(server).recovery_interval = RECOVERY_INTERVAL
        return server

    return start


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def details(self) -> dict[str, Any]:
        error = orjson.loads(self.body)["error"]
        assert error["type"] == "rate_limit_error", self.body
        assert error["code"] == "rate_limit_exceeded", self.body
        details: dict[str, Any] = error["details"]
        return details


async def chat(server: TestServer, *, stream: bool = False, **extra: Any) -> Answer:
    """One chat completion of user ``limited``, read to its end (bounded)."""
    async with (
        aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session,
        session.post(
            base_url(server) + "/v1/chat/completions",
            data=chat_body(stream, **extra),
            headers={
                "Authorization": f"Bearer {LIMITED_TOKEN}",
                "Content-Type": "application/json",
            },
        ) as response,
    ):
        return Answer(response.status, dict(response.headers), await response.read())


async def admin_get(server: TestServer, path: str) -> aiohttp.ClientResponse:
    async with (
        aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session,
        session.get(
            base_url(server) + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as response,
    ):
        await response.read()
        assert response.status == 200, await response.text()
        return response


async def rate_limits(server: TestServer) -> Any:
    """``/admin/rate-limits``."""
    response = await admin_get(server, "/admin/rate-limits")
    return await response.json()


async def prometheus_sample(server: TestServer, name: str) -> float:
    """One unlabelled sample of ``/prometheus``."""
    response = await admin_get(server, "/prometheus")
    for line in (await response.text()).splitlines():
        metric, _, value = line.partition(" ")
        if metric == name:
            return float(value)
    raise AssertionError(f"no sample {name} in /prometheus")


async def until_store(server: TestServer, *, degraded: bool, within: float) -> Any:
    """Poll ``/admin/rate-limits`` until the store's ``degraded`` is ``degraded``."""
    deadline = time.monotonic() + within
    while True:
        view = await rate_limits(server)
        if view["store"]["degraded"] is degraded:
            return view
        assert time.monotonic() < deadline, f"store still {view['store']} after {within} s"
        await asyncio.sleep(0.05)  # the gateway's recovery task pings on its own clock


def assert_refused(answer: Answer, limit: str) -> None:
    assert answer.status == 429, answer
    details = answer.details
    assert details["limit"] == limit
    assert isinstance(details["retry_after"], int)
    assert details["retry_after"] >= 1
    assert answer.headers["Retry-After"] == str(details["retry_after"])


def statuses(answers: list[Answer]) -> list[int]:
    return [answer.status for answer in answers]


# ------------------------------------------------------------------- one limit, N gateways


async def test_two_gateways_sharing_one_redis_enforce_one_limit(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    raw = redis_config(upstream, redis_server, requests_per_minute=5)
    a = await redis_gateway(raw)
    b = await redis_gateway(raw)
    through_a = [await chat(a) for _ in range(3)]
    assert statuses(through_a) == [200, 200, 200]
    assert [x.headers["x-ratelimit-remaining-requests"] for x in through_a] == ["4", "3", "2"]
    through_b = [await chat(b) for _ in range(4)]
    assert statuses(through_b) == [200, 200, 429, 429]
    # B counts on from where A left: one limit, not one per instance.
    assert [x.headers["x-ratelimit-remaining-requests"] for x in through_b[:2]] == ["1", "0"]
    assert all(x.headers["x-ratelimit-limit-requests"] == "5" for x in through_b[:2])
    for refused in [*through_b[2:], await chat(a)]:
        assert_refused(refused, "requests_per_minute")
        assert refused.details["retry_after"] <= 12  # one refill: 60 s / 5
    assert len(upstream.requests) == 5  # refused requests never reached an upstream
    for server in (a, b):
        view = await rate_limits(server)
        assert view["store"]["backend"] == "redis"
        assert view["store"]["degraded"] is False
        assert view["store"]["errors"] == 0
        assert view["users"]["limited"]["requests_per_minute"]["remaining"] == 0


async def test_concurrent_requests_over_two_gateways_admit_exactly_the_limit(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    raw = redis_config(upstream, redis_server, requests_per_minute=7)
    a = await redis_gateway(raw)
    b = await redis_gateway(raw)
    answers = await asyncio.gather(*(chat(a if i % 2 else b) for i in range(20)))
    assert sorted(statuses(answers)) == [200] * 7 + [429] * 13
    for answer in answers:
        if answer.status == 429:
            assert_refused(answer, "requests_per_minute")
    assert len(upstream.requests) == 7
    admitted = [x for x in answers if x.status == 200]
    # Each admission saw a different count: the seven decisions were serialized.
    assert sorted(int(x.headers["x-ratelimit-remaining-requests"]) for x in admitted) == list(
        range(7)
    )
    refused = 0
    for server in (a, b):
        view = await rate_limits(server)
        assert view["store"]["degraded"] is False
        assert view["store"]["errors"] == 0
        refused += view["users"]["limited"]["requests_per_minute"]["refused"]
    assert refused == 13


# --------------------------------------------------------------------------- Redis outages


async def test_redis_dying_degrades_to_local_limits_and_its_return_restores_one_limit(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    raw = redis_config(upstream, redis_server, requests_per_minute=3)
    a = await redis_gateway(raw)
    b = await redis_gateway(raw)
    # Shared first, concurrently (several pooled connections to Redis in each gateway).
    answers = await asyncio.gather(*(chat(a if i % 2 else b) for i in range(6)))
    assert sorted(statuses(answers)) == [200] * 3 + [429] * 3

    await redis_server.kill()
    # Each gateway now limits on its own memory, which starts full: 3 more each.
    for server in (a, b):
        started = time.monotonic()
        during = [await chat(server) for _ in range(5)]
        assert time.monotonic() - started < 5.0, "requests waited on the dead Redis"
        assert statuses(during) == [200, 200, 200, 429, 429], during
        assert [x.headers["x-ratelimit-remaining-requests"] for x in during[:3]] == [
            "2",
            "1",
            "0",
        ]
        for refused in during[3:]:
            assert_refused(refused, "requests_per_minute")
        view = await rate_limits(server)
        assert view["store"]["backend"] == "redis"
        assert view["store"]["degraded"] is True
        assert view["store"]["errors"] > 0
        assert view["users"]["limited"]["requests_per_minute"]["remaining"] == 0
        assert await prometheus_sample(server, "berry_rate_limit_store_degraded") == 1
        assert await prometheus_sample(server, "berry_rate_limit_store_errors_total") > 0
    assert len(upstream.requests) == 3 + 6

    await redis_server.start()  # the same port, empty (no persistence)
    for server in (a, b):
        view = await until_store(server, degraded=False, within=RECOVERY_WITHIN)
        assert view["users"]["limited"]["requests_per_minute"]["remaining"] == 3  # Redis's
        assert await prometheus_sample(server, "berry_rate_limit_store_degraded") == 0
    # One limit again: 3 across both gateways, not 3 each.
    after = [await chat(a), await chat(b), await chat(a), await chat(b), await chat(a)]
    assert statuses(after) == [200, 200, 200, 429, 429], after
    assert [x.headers["x-ratelimit-remaining-requests"] for x in after[:3]] == ["2", "1", "0"]
    for server in (a, b):
        assert (await rate_limits(server))["store"]["degraded"] is False


async def test_a_gateway_starting_with_redis_down_serves_on_memory_limits(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_down: RedisServer
) -> None:
    assert not await answers_ping(redis_down.port)
    raw = redis_config(upstream, redis_down, requests_per_minute=2)
    started = time.monotonic()
    server = await redis_gateway(raw)
    assert time.monotonic() - started < 3.0, "start-up waited on the unreachable Redis"
    view = await rate_limits(server)
    assert view["store"]["backend"] == "redis"
    assert view["store"]["degraded"] is True
    assert view["store"]["errors"] >= 1
    answers = [await chat(server) for _ in range(3)]
    assert statuses(answers) == [200, 200, 429]
    assert_refused(answers[2], "requests_per_minute")
    assert await prometheus_sample(server, "berry_rate_limit_store_degraded") == 1
    # Once Redis is up, the gateway switches to it by itself (the first recovery round
    # sleeps the default 1 s: it began at start-up, before the fixture shortened it).
    await redis_down.start()
    view = await until_store(server, degraded=False, within=RECOVERY_WITHIN)
    assert view["users"]["limited"]["requests_per_minute"]["remaining"] == 2
    assert statuses([await chat(server) for _ in range(3)]) == [200, 200, 429]


async def test_a_hung_redis_costs_a_request_at_most_the_stores_short_timeout(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """Redis stopped (SIGSTOP) accepts connections' bytes but answers nothing: the first
    request waits out the store's call timeout (0.25 s), then the gateway decides on
    memory without waiting again; Redis answering again ends the degradation."""
    raw = redis_config(upstream, redis_server, requests_per_minute=3)
    server = await redis_gateway(raw)
    assert (await chat(server)).status == 200
    redis_server.pause()
    try:
        started = time.monotonic()
        during = [await chat(server) for _ in range(4)]
        elapsed = time.monotonic() - started
        assert statuses(during) == [200, 200, 200, 429], during
        assert_refused(during[3], "requests_per_minute")
        assert elapsed < 2.0, f"4 requests took {elapsed:.2f} s with Redis hung"
        view = await rate_limits(server)
        assert view["store"]["degraded"] is True
        assert view["store"]["errors"] > 0
    finally:
        redis_server.resume()
    await until_store(server, degraded=False, within=RECOVERY_WITHIN)
    # Redis decides again. It holds at most 2 of the 3: the request before the pause,
    # and perhaps the one whose answer timed out (its script ran once Redis resumed).
    assert (await chat(server)).status == 200


# ------------------------------------------------------------------------- the formula


async def test_the_redis_script_decides_as_the_gcra_formula(redis_server: RedisServer) -> None:
    """The same sequence through ``MemoryStore`` (``gcra``, a frozen clock) and through
    ``DECIDE`` on Redis's clock. The windows are a day (a request refills in 8640 s, a
    token in 864 s) and no step fits exactly, so the milliseconds the test takes cannot
    change an answer; each step waits 1 ms so that Redis's clock always moves."""
    requests = Rule.of("requests_per_day", 10, 86400.0)
    tokens = Rule.of(TOKENS_PER_MINUTE, 100, 86400.0)  # a token rule with a day's window
    limits = UserLimits("formula", (requests, tokens), tokens, None)
    config = RateLimitStoreConfig(
        backend="redis", redis_url=redis_server.url, key_prefix=f"formula-{secrets.token_hex(6)}:"
    )
    metrics = Metrics()
    redis = RedisStore(config, time.monotonic, metrics)
    memory = MemoryStore(FakeClock())
    costs = [10, 25, 70, 30, 40, 20, 0, 200, 3, 13, 2, 4, 1, 1, 1, 50]
    # Admitted (requests spent, tokens spent), or the limit that refused.
    expected = [
        "ok",
        "ok",
        TOKENS_PER_MINUTE,  # 35 + 70 > 100
        "ok",
        TOKENS_PER_MINUTE,  # 65 + 40 > 100
        "ok",
        "ok",  # no tokens: only the request limit pays
        TOKENS_PER_MINUTE,  # alone more than the limit
        "ok",
        TOKENS_PER_MINUTE,  # 88 + 13 = 101: one token short
        "ok",
        "ok",
        "ok",
        "ok",  # the 10th admitted request
        "requests_per_day",  # the 11th: refused by the first rule, before tokens
        "requests_per_day",
    ]
    await redis.start()
    try:
        answers: list[tuple[Decision, Decision]] = []
        for cost in costs:
            await asyncio.sleep(0.001)
            answers.append((memory.decide_now(limits, cost), await redis.decide(limits, cost)))
        peeked = await redis.peek(limits), await memory.peek(limits)
    finally:
        await redis.close()
    assert metrics.rate_limit_store_errors == 0
    assert not redis.degraded
    outcomes = []
    for (by_memory, by_redis), cost in zip(answers, costs, strict=True):
        step = f"cost {cost}"
        outcome = "ok" if by_memory.refused_by is None else by_memory.refused_by.name
        outcomes.append(outcome)
        assert by_redis.refused_by == by_memory.refused_by, step
        if by_memory.refused_by is None:
            # (rule, units remaining, seconds until full) per rule, in rule order.
            mine = [(rule, remaining) for rule, remaining, _ in by_redis.states]
            theirs = [(rule, remaining) for rule, remaining, _ in by_memory.states]
            assert mine == theirs, step
            assert [rule for rule, _ in mine] == [requests, tokens], step
            for (_, _, reset), (_, _, expected_reset) in zip(
                by_redis.states, by_memory.states, strict=True
            ):
                assert reset == pytest.approx(expected_reset, abs=1.0), step
        else:
            assert tuple(by_redis.states) == (), step
            assert by_redis.retry_after == pytest.approx(by_memory.retry_after, abs=1.0), step
    assert outcomes == expected
    by_redis_view, by_memory_view = peeked
    assert by_redis_view["requests_per_day"]["remaining"] == 0
    assert by_redis_view["tokens_per_minute"]["remaining"] == 100 - 96
    assert {name: v["remaining"] for name, v in by_redis_view.items()} == {
        name: v["remaining"] for name, v in by_memory_view.items()
    }


# --------------------------------------------------------------- concurrency and tokens


async def test_max_concurrent_is_shared_by_two_gateways(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    raw = redis_config(upstream, redis_server, max_concurrent=2)
    a = await redis_gateway(raw)
    b = await redis_gateway(raw)
    upstream.mode = "gated"  # streams hold after their first content event
    auth = {"Authorization": f"Bearer {LIMITED_TOKEN}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        held = [
            await session.post(
                base_url(a) + "/v1/chat/completions", data=chat_body(stream=True), headers=auth
            )
            for _ in range(2)
        ]
        try:
            assert statuses_of(held) == [200, 200]
            for server in (a, b):
                view = await rate_limits(server)
                assert view["users"]["limited"]["max_concurrent"]["in_use"] == 2
            for server in (b, a):
                refused = await chat(server)
                assert_refused(refused, "max_concurrent")
                assert refused.details["retry_after"] == 1
            upstream.gate.set()
            for response in held:
                assert b"[DONE]" in await response.read()
        finally:
            for response in held:
                response.close()
    # The leases go back to Redis as each request ends (just after its last byte).
    deadline = time.monotonic() + 5.0
    while (await rate_limits(b))["users"]["limited"]["max_concurrent"]["in_use"] != 0:
        assert time.monotonic() < deadline, "the leases were not returned within 5 s"
        await asyncio.sleep(0.02)
    assert (await chat(b)).status == 200
    assert (await chat(b, stream=True)).status == 200
    view = await rate_limits(b)
    assert view["users"]["limited"]["max_concurrent"] == {"limit": 2, "in_use": 0, "refused": 1}
    assert view["store"]["errors"] == 0


def statuses_of(responses: list[aiohttp.ClientResponse]) -> list[int]:
    return [response.status for response in responses]


async def test_tokens_are_reserved_then_settled_with_the_upstreams_usage_in_redis(
    redis_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """The fake upstream reports 15 tokens (11 + 4). The first request reserves its
    estimate (prompt bytes / 4 + max_tokens) through A; once A has settled it in Redis
    (the settlement leaves after the answer), B sees only the 15 charged. 10 000 per
    minute refill one token every 6 ms: the bounds allow for what refilled meanwhile."""
    limit = 10_000
    raw = redis_config(upstream, redis_server, tokens_per_minute=limit)
    a = await redis_gateway(raw)
    b = await redis_gateway(raw)
    first_estimate = estimate_tokens(len(chat_body(max_tokens=5000)), 5000)
    second_estimate = estimate_tokens(len(chat_body(max_tokens=1)), 1)
    assert first_estimate > 5000
    first = await chat(a, max_tokens=5000)
    assert first.status == 200, first
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit)
    # The estimate was reserved (a fresh bucket: nothing refilled yet).
    assert limit - int(first.headers["x-ratelimit-remaining-tokens"]) == first_estimate
    deadline = time.monotonic() + 5.0
    while True:
        view = await rate_limits(b)
        charged = limit - view["users"]["limited"]["tokens_per_minute"]["remaining"]
        if charged <= 15 + 1:
            break  # settled: the real usage, not the estimate
        assert time.monotonic() < deadline, f"still {charged} tokens charged after 5 s"
        await asyncio.sleep(0.01)  # A settles in the background, just after answering
    second = await chat(b, max_tokens=1)
    assert second.status == 200, second
    charged = limit - int(second.headers["x-ratelimit-remaining-tokens"])
    # The first now costs its 15 tokens (less what refilled since), not its estimate.
    assert second_estimate <= charged <= second_estimate + 15 + 1, (charged, first_estimate)
    for server in (a, b):
        assert (await rate_limits(server))["store"]["errors"] == 0


# ------------------------------------------------------------------------------ shutdown


async def redis_clients(redis: RedisServer) -> int:
    """The connections Redis has open, besides the one asking."""
    client = aioredis.from_url(redis.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    async with client:  # from_url: closing the client closes its pool
        info = await client.info("clients")
    return int(info["connected_clients"]) - 1


async def test_a_gateway_shutting_down_closes_its_redis_connections(
    start_gateway: GatewayFactory, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    """``RedisStore.close`` must close the pool it made: a ``redis.asyncio.Redis`` given
    its pool as ``connection_pool=`` does not own it (``aclose()`` leaves it open), so
    every connection of a gateway that shut down would stay open on Redis until the
    garbage collector dropped it with a ``ResourceWarning`` (an error in some later
    test). The client must take the pool with ``Redis.from_pool``."""
    raw = redis_config(upstream, redis_server, requests_per_minute=50)
    server = await start_gateway(raw)
    store = redis_store(server)
    try:
        answers = await asyncio.gather(*(chat(server) for _ in range(4)))
        assert statuses(answers) == [200] * 4
        assert await redis_clients(redis_server) >= 1
        await server.close()  # the app's cleanup: RedisStore.close()
        deadline = time.monotonic() + 2.0
        while True:
            left = await redis_clients(redis_server)
            if left == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)  # Redis notices closed connections on its own loop
        assert left == 0, f"{left} connection(s) of a gateway that shut down are still open"
    finally:
        # Should the store leave its pool open again, fail here, not in a later test.
        await store.client.connection_pool.disconnect()
