"""The background health prober (SPEC §3 "Background health prober", §5 "Health").

Every test runs real HTTP probes against real fake upstreams on 127.0.0.1. Time is a
``FakeClock`` the test advances by hand: the breaker's windows and the prober's schedule
read it, so nothing here sleeps for real except a probe timeout of a fifth of a second.
``HealthProber.run`` is driven with an injected ``sleep`` that advances the fake clock and
records the delays asked for, and ends the loop by raising ``StopProbing``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.breaker import BreakerState
from berry_proxy.config import build_config
from berry_proxy.errors import FailureKind, UpstreamFailure
from berry_proxy.health import (
    JITTER,
    MIN_SLEEP_SECONDS,
    RECOVERY_PROBE_DELAY,
    RESTART_DELAY_SECONDS,
    HealthProber,
)
from berry_proxy.pool import BackendPool
from berry_proxy.routing import Router
from berry_proxy.runtime import build_adapters

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    failed,
    gateway_config,
)

# The wall clock the gateway reads for ``last_check`` and timestamps, and how it prints.
WALL_START = 1_700_000_000.0
WALL_START_ISO = "2023-11-14T22:13:20Z"
MONOTONIC_START = 5_000.0
MESSAGES = [{"role": "user", "content": "Say hello"}]


class StopProbing(Exception):
    """Raised by the injected sleep to end ``HealthProber.run``."""


@dataclass
class Probe:
    at: float | None  # the test clock when the probe arrived
    path: str
    headers: dict[str, str]
    status: int | None  # what the fake answered; None for a stall


@dataclass
class ProbeUpstream(FakeUpstream):
    """``FakeUpstream`` whose ``GET /v1/models`` (the probe) the test controls and counts.

    ``probe_status`` is what it answers; ``probe_stall`` makes it never answer (until
    ``unstall`` is set at the end of the test).
    """

    probe_status: int = 200
    probe_stall: bool = False
    clock: FakeClock | None = None
    probes: list[Probe] = field(default_factory=list)
    unstall: asyncio.Event = field(default_factory=asyncio.Event)
    probed: asyncio.Event = field(default_factory=asyncio.Event)

    async def models(self, request: web.Request) -> web.Response:
        at = self.clock() if self.clock is not None else None
        status = None if self.probe_stall else self.probe_status
        self.probes.append(Probe(at, request.path, dict(request.headers), status))
        self.probed.set()
        if self.probe_stall:
            await self.unstall.wait()
        if self.probe_status == 200:
            return await super().models(request)
        return web.json_response(
            {"error": {"message": f"probe refused at {self.url}", "type": "server_error"}},
            status=self.probe_status,
        )


async def start_upstream(aiohttp_server: ServerFactory, port: int | None = None) -> ProbeUpstream:
    fake = ProbeUpstream()
    fake.server = await aiohttp_server(fake.app(), port=port)
    return fake


async def restart(aiohttp_server: ServerFactory, fake: ProbeUpstream, port: int) -> None:
    """Bring a stopped fake back on the port the gateway knows."""
    fake.server = await aiohttp_server(fake.app(), port=port)


async def stop(fake: ProbeUpstream) -> int:
    """Stop ``fake``'s server (connections are then refused); returns its port."""
    assert fake.server is not None
    port = fake.server.port
    assert port is not None
    await fake.server.close()
    return port


@pytest.fixture
async def up1(aiohttp_server: ServerFactory) -> ProbeUpstream:
    return await start_upstream(aiohttp_server)


@pytest.fixture
async def up2(aiohttp_server: ServerFactory) -> ProbeUpstream:
    return await start_upstream(aiohttp_server)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Gateway:
    server: TestServer
    clock: FakeClock
    wall: FakeClock

    @property
    def prober(self) -> HealthProber:
        return self.server.app[keys.GATEWAY].runtime.prober

    @property
    def pool(self) -> BackendPool:
        return self.server.app[keys.GATEWAY].runtime.pool

    def state(self, provider: str) -> BreakerState:
        return self.pool.providers[provider].breaker.state


async def start(start_gateway: GatewayFactory, raw: dict[str, Any]) -> Gateway:
    clock = FakeClock(MONOTONIC_START)
    wall = FakeClock(WALL_START)
    server = await start_gateway(raw, clock=clock, wall_clock=wall, rng=random.Random(7))
    return Gateway(server, clock, wall)


async def get_health(session: aiohttp.ClientSession, gw: Gateway) -> tuple[int, Any]:
    async with session.get(base_url(gw.server) + "/health") as response:
        return response.status, await response.json()


async def chat(
    session: aiohttp.ClientSession, gw: Gateway, model: str = "gpt-test"
) -> tuple[int, str | None, Any]:
    """One non-streaming chat completion: (status, X-Berry-Provider, body)."""
    async with session.post(
        base_url(gw.server) + "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        return response.status, response.headers.get("X-Berry-Provider"), await response.json()


def assert_no_secret(text: str | None, *fakes: ProbeUpstream) -> None:
    assert text is not None
    assert UPSTREAM_KEY not in text
    assert "127.0.0.1" not in text
    assert "http" not in text
    for fake in fakes:
        if fake.server is not None and fake.server.port is not None:
            assert str(fake.server.port) not in text


# --------------------------------------------------------------------------------------
# probe_once: one round, its result in /health
# --------------------------------------------------------------------------------------


async def test_probe_once_marks_provider_healthy_with_last_check(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await start(start_gateway, gateway_config(up1))

    status, body = await get_health(session, gw)
    assert status == 200
    assert body["providers"]["up1"] == {
        "healthy": True,
        "last_check": None,
        "error": None,
        "circuit_breaker_state": "closed",
    }

    assert await gw.prober.probe_once() == {"up1": None}
    # One probe per provider, though it serves two models: GET {base_url}/models, with
    # the provider's key (base_url had no /v1: the gateway added it).
    assert len(up1.probes) == 1
    probe = up1.probes[0]
    assert probe.path == "/v1/models"
    assert probe.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert not up1.requests  # no billed call

    status, body = await get_health(session, gw)
    assert status == 200
    assert body["status"] == "healthy"
    assert body["providers"]["up1"] == {
        "healthy": True,
        "last_check": WALL_START_ISO,
        "error": None,
        "circuit_breaker_state": "closed",
    }

    # last_check follows the wall clock of the latest probe.
    gw.wall.now += 90
    await gw.prober.probe_once()
    _, body = await get_health(session, gw)
    assert body["providers"]["up1"]["last_check"] == "2023-11-14T22:14:50Z"


async def test_background_prober_probes_at_start_up(
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    up2: ProbeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    """With ``health_checks=True`` the app runs the loop itself: a first round at once."""
    clock, wall = FakeClock(MONOTONIC_START), FakeClock(WALL_START)
    up2.probe_status = 503
    server = await start_gateway(
        gateway_config(up1, up2), clock=clock, wall_clock=wall, health_checks=True
    )
    gw = Gateway(server, clock, wall)
    async with asyncio.timeout(5):
        await up1.probed.wait()
        await up2.probed.wait()
    # The probes reached the fakes; their results land once the round is over, a few
    # loop turns later.
    for _ in range(50):
        status, body = await get_health(session, gw)
        if all(p["last_check"] for p in body["providers"].values()):
            break
    assert (status, body["status"]) == (200, "degraded")
    assert body["providers"]["up1"]["last_check"] == WALL_START_ISO
    assert body["providers"]["up1"]["healthy"] is True
    assert body["providers"]["up2"]["healthy"] is False
    assert "503" in body["providers"]["up2"]["error"]
    # The next round waits for the (fake) clock: 30 s ± 10% away.
    assert set(gw.prober.next_due) == {"up1", "up2"}
    for due in gw.prober.next_due.values():
        assert 30 * (1 - JITTER) <= due - MONOTONIC_START <= 30 * (1 + JITTER)
    assert len(up1.probes) == len(up2.probes) == 1


@pytest.mark.parametrize("answer", [200, 204, 404, 405])
async def test_probe_answers_that_count_as_up(
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    session: aiohttp.ClientSession,
    answer: int,
) -> None:
    """A server without a model list (404/405) is still up."""
    gw = await start(start_gateway, gateway_config(up1))
    up1.probe_status = answer
    assert await gw.prober.probe_once() == {"up1": None}
    status, body = await get_health(session, gw)
    assert status == 200
    assert body["status"] == "healthy"
    assert body["providers"]["up1"]["healthy"] is True
    assert body["providers"]["up1"]["error"] is None
    assert body["providers"]["up1"]["last_check"] == WALL_START_ISO


@pytest.mark.parametrize("answer", [401, 403, 429, 500, 502, 503])
async def test_probe_answers_that_count_as_down(
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    session: aiohttp.ClientSession,
    answer: int,
) -> None:
    gw = await start(start_gateway, gateway_config(up1))
    up1.probe_status = answer
    result = await gw.prober.probe_once()
    assert result["up1"] is not None
    assert str(answer) in result["up1"]

    status, body = await get_health(session, gw)
    provider = body["providers"]["up1"]
    assert provider["healthy"] is False
    assert provider["last_check"] == WALL_START_ISO
    assert str(answer) in provider["error"]
    assert_no_secret(provider["error"], up1)
    # One failure is below the threshold (5): the breaker stays closed, but a backend
    # whose last probe failed is not healthy, and up1 is every model's only backend.
    assert provider["circuit_breaker_state"] == "closed"
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["models"]["gpt-test"] == {
        "available": False,
        "healthy_backends": 0,
        "total_backends": 1,
    }
    assert gw.pool.providers["up1"].breaker.consecutive_failures == 1


async def test_probe_timeout_is_a_failure(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await start(start_gateway, gateway_config(up1, health_check_timeout_seconds=0.2))
    up1.probe_stall = True
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        result = await gw.prober.probe_once()
    finally:
        up1.unstall.set()
    assert loop.time() - began < 2  # bounded by health_check_timeout_seconds, not 10 s
    assert result["up1"] is not None
    assert "timed out" in result["up1"]
    status, body = await get_health(session, gw)
    assert status == 503
    assert body["providers"]["up1"]["healthy"] is False
    assert "timed out" in body["providers"]["up1"]["error"]
    assert_no_secret(body["providers"]["up1"]["error"], up1)


async def test_probe_connection_refused_is_a_failure(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await start(start_gateway, gateway_config(up1))
    assert await gw.prober.probe_once() == {"up1": None}
    port = await stop(up1)

    result = await gw.prober.probe_once()
    assert result["up1"] is not None
    status, body = await get_health(session, gw)
    assert status == 503
    provider = body["providers"]["up1"]
    assert provider["healthy"] is False
    assert provider["error"] == result["up1"]
    assert_no_secret(provider["error"])
    assert str(port) not in provider["error"]


# --------------------------------------------------------------------------------------
# Probes feed the breaker
# --------------------------------------------------------------------------------------


async def test_failed_probes_open_the_breaker(
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    up2: ProbeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    """N failed probes open the breaker; /health degrades, then turns unhealthy (503)."""
    threshold = 3
    raw = gateway_config(up1, up2, circuit_breaker_failure_threshold=threshold)
    gw = await start(start_gateway, raw)
    up2.probe_status = 500

    for done in range(1, threshold):
        await gw.prober.probe_once()
        assert gw.state("up2") is BreakerState.CLOSED, f"open after {done} failed probes"
    status, body = await get_health(session, gw)
    assert body["providers"]["up2"]["circuit_breaker_state"] == "closed"
    assert body["providers"]["up2"]["healthy"] is False

    await gw.prober.probe_once()
    assert gw.state("up2") is BreakerState.OPEN
    status, body = await get_health(session, gw)
    # gpt-test still has up1; other-model is served by up1 alone.
    assert status == 200
    assert body["status"] == "degraded"
    assert body["providers"]["up2"]["circuit_breaker_state"] == "open"
    assert body["providers"]["up2"]["healthy"] is False
    assert_no_secret(body["providers"]["up2"]["error"], up1, up2)
    assert body["providers"]["up1"]["healthy"] is True
    assert body["models"]["gpt-test"] == {
        "available": True,
        "healthy_backends": 1,
        "total_backends": 2,
    }

    # While open, requests never reach up2.
    posts = len(up2.requests)
    for _ in range(6):
        code, provider, _ = await chat(session, gw)
        assert (code, provider) == (200, "up1")
    assert len(up2.requests) == posts

    # up1 dies too: no model has a healthy backend any more.
    up1.probe_status = 503
    for _ in range(threshold):
        await gw.prober.probe_once()
    assert gw.state("up1") is BreakerState.OPEN
    status, body = await get_health(session, gw)
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["models"]["gpt-test"]["available"] is False
    assert body["models"]["other-model"]["available"] is False

    # A model whose every backend is open fails fast, without an upstream call.
    up1_posts = len(up1.requests)
    code, _, error = await chat(session, gw, "other-model")
    assert code == 503
    assert error["error"]["code"] == "no_healthy_backends"
    assert len(up1.requests) == up1_posts


async def test_successful_probe_breaks_a_failure_streak(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    """Only *consecutive* failures open the breaker (SPEC §3): a probe that answers in
    between ends the streak, as a successful request does. Otherwise an idle provider
    whose probe flakes once an hour is ejected after ``threshold`` hours."""
    threshold = 3
    gw = await start(
        start_gateway, gateway_config(up1, circuit_breaker_failure_threshold=threshold)
    )
    for flake in range(1, threshold + 1):
        up1.probe_status = 200
        await gw.prober.probe_once()
        gw.clock.now += 3600
        up1.probe_status = 500
        await gw.prober.probe_once()
        gw.clock.now += 3600
        _, body = await get_health(session, gw)
        assert body["providers"]["up1"]["circuit_breaker_state"] == "closed", (
            f"opened by {flake} failed probes, none consecutive"
        )
    assert len(up1.probes) == 2 * threshold


async def opened_by_probes(
    start_gateway: GatewayFactory, up1: ProbeUpstream, open_seconds: float
) -> Gateway:
    """A gateway whose up1 breaker two failed probes have just opened."""
    raw = gateway_config(
        up1, circuit_breaker_failure_threshold=2, circuit_breaker_timeout_seconds=open_seconds
    )
    gw = await start(start_gateway, raw)
    up1.probe_status = 500
    await gw.prober.probe_once()
    await gw.prober.probe_once()
    assert gw.state("up1") is BreakerState.OPEN
    return gw


async def test_recovery_probe_closes_open_breaker(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await opened_by_probes(start_gateway, up1, open_seconds=600)

    # Still failing: still open (the open window is far from over).
    gw.clock.now += 120
    await gw.prober.probe_once()
    assert gw.state("up1") is BreakerState.OPEN
    code, _, error = await chat(session, gw)
    assert code == 503
    assert error["error"]["code"] == "no_healthy_backends"

    # It answers again: the recovery probe closes the breaker without waiting for the
    # open window and its half-open trial.
    up1.probe_status = 200
    gw.clock.now += 120
    gw.wall.now += 240
    assert await gw.prober.probe_once() == {"up1": None}
    assert gw.state("up1") is BreakerState.CLOSED
    status, body = await get_health(session, gw)
    assert status == 200
    assert body["status"] == "healthy"
    assert body["providers"]["up1"] == {
        "healthy": True,
        "last_check": "2023-11-14T22:17:20Z",
        "error": None,
        "circuit_breaker_state": "closed",
    }
    code, provider, _ = await chat(session, gw)
    assert (code, provider) == (200, "up1")


async def test_half_open_trial_request_closes_breaker_before_the_probe(
    start_gateway: GatewayFactory, up1: ProbeUpstream, session: aiohttp.ClientSession
) -> None:
    """Whichever comes first: here the trial request, then the next probe agrees."""
    gw = await opened_by_probes(start_gateway, up1, open_seconds=60)

    gw.clock.now += 61  # the open window is over: the next request is the trial
    assert gw.state("up1") is BreakerState.HALF_OPEN
    code, provider, _ = await chat(session, gw)
    assert (code, provider) == (200, "up1")
    assert gw.state("up1") is BreakerState.CLOSED
    _, body = await get_health(session, gw)
    assert body["providers"]["up1"]["circuit_breaker_state"] == "closed"

    up1.probe_status = 200
    await gw.prober.probe_once()
    status, body = await get_health(session, gw)
    assert status == 200
    assert body["providers"]["up1"]["healthy"] is True
    assert body["providers"]["up1"]["circuit_breaker_state"] == "closed"


# --------------------------------------------------------------------------------------
# Which providers are probed
# --------------------------------------------------------------------------------------


async def test_per_request_only_provider_is_never_probed(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    up2: ProbeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    up3 = await start_upstream(aiohttp_server)
    raw = gateway_config(up1, up2, up3)
    # up2 serves per_request backends only; up3 one per_request and one per_token.
    for backend in raw["models"]["gpt-test"]["backends"]:
        if backend["provider"] in ("up2", "up3"):
            backend["billing_mode"] = "per_request"
    raw["models"]["billed"] = {
        "backends": [{"provider": "up2", "model": "up-billed", "billing_mode": "per_request"}]
    }
    raw["models"]["mixed"] = {
        "backends": [{"provider": "up3", "model": "up-mixed", "billing_mode": "per_token"}]
    }
    gw = await start(start_gateway, raw)

    result = await gw.prober.probe_once()
    assert set(result) == {"up1", "up3"}
    assert not up2.probes
    assert len(up1.probes) == len(up3.probes) == 1
    status, body = await get_health(session, gw)
    assert status == 200
    assert body["providers"]["up2"] == {
        "healthy": True,
        "last_check": None,
        "error": None,
        "circuit_breaker_state": "closed",
    }
    assert body["providers"]["up3"]["last_check"] == WALL_START_ISO

    # Nor by the background loop, round after round.
    prober = HealthProber(
        gw.pool,
        gw.server.app[keys.GATEWAY].runtime.proxy.adapters,
        gw.pool.config.settings,
        random.Random(1),
    )
    rounds = 0

    async def sleep(delay: float) -> None:
        nonlocal rounds
        rounds += 1
        if rounds > 5:
            raise StopProbing
        gw.clock.now += delay

    prober.sleep = sleep
    with pytest.raises(StopProbing):
        await prober.run()
    assert not up2.probes
    assert len(up1.probes) > 2
    _, body = await get_health(session, gw)
    assert body["providers"]["up2"]["last_check"] is None

    # It is judged by its traffic alone: real requests reach it.
    code, _, _ = await chat(session, gw, "billed")
    assert code == 200
    assert len(up2.requests) == 1
    assert not up2.probes


async def test_disabled_providers_and_backends_are_not_probed(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    up2: ProbeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    up3 = await start_upstream(aiohttp_server)
    up4 = await start_upstream(aiohttp_server)
    raw = gateway_config(up1, up2, up3, up4)
    raw["providers"]["up2"]["enabled"] = False
    backends = raw["models"]["gpt-test"]["backends"]
    backends[2]["enabled"] = False  # up3's only backend
    # up4's only backend belongs to a disabled model.
    backends.pop()
    raw["models"]["off"] = {
        "enabled": False,
        "backends": [{"provider": "up4", "model": "up-off"}],
    }
    gw = await start(start_gateway, raw)

    assert set(await gw.prober.probe_once()) == {"up1"}
    assert len(up1.probes) == 1
    assert not up2.probes
    assert not up3.probes
    assert not up4.probes
    _, body = await get_health(session, gw)
    assert body["providers"]["up2"]["healthy"] is False
    assert body["providers"]["up2"]["error"] == "provider disabled"
    assert body["providers"]["up2"]["last_check"] is None
    assert body["providers"]["up3"]["last_check"] is None
    assert body["providers"]["up4"]["last_check"] is None


# --------------------------------------------------------------------------------------
# The schedule: interval() and run()
# --------------------------------------------------------------------------------------


def offline_pool(**settings: Any) -> tuple[BackendPool, FakeClock]:
    """A pool over one provider that is never called (interval() needs no HTTP)."""
    raw = {
        "providers": {"up1": {"base_url": "http://127.0.0.1:9", "api_key": UPSTREAM_KEY}},
        "models": {"gpt-test": {"backends": [{"provider": "up1", "model": "up-model"}]}},
        "users": {"admin": {"token": ADMIN_TOKEN}},
        "settings": settings,
    }
    clock = FakeClock(MONOTONIC_START)
    return BackendPool(build_config(raw, env={}), clock, FakeClock(WALL_START)), clock


def state_of(pool: BackendPool, provider: str) -> BreakerState:
    return pool.providers[provider].breaker.state


def test_interval_is_jittered_around_the_configured_intervals() -> None:
    pool, clock = offline_pool(
        health_check_interval_seconds=30,
        recovery_check_interval_seconds=120,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_timeout_seconds=60,
    )
    prober = HealthProber(pool, {}, pool.config.settings, random.Random(20240601))
    provider = pool.providers["up1"]
    draws = 2000

    def spread(base: float) -> list[float]:
        values = [prober.interval(provider) for _ in range(draws)]
        low, high = base * (1 - JITTER), base * (1 + JITTER)
        assert all(low <= v <= high for v in values), (min(values), max(values))
        # The jitter is real: the whole band is used, not one value.
        assert min(values) < base * (1 - 0.9 * JITTER)
        assert max(values) > base * (1 + 0.9 * JITTER)
        assert len(set(values)) > draws * 0.9
        assert abs(sum(values) / draws - base) < base * JITTER / 5
        return values

    spread(30)  # closed

    pool.record_probe(provider, "health check answered HTTP 500")
    pool.record_probe(provider, "health check answered HTTP 500")
    assert state_of(pool, "up1") is BreakerState.OPEN
    spread(120)  # open: the recovery interval

    clock.now += 61
    assert state_of(pool, "up1") is BreakerState.HALF_OPEN
    spread(30)  # no longer open


def gaps(fake: ProbeUpstream) -> list[float]:
    """Clock time between successive probes of ``fake``."""
    times = [p.at for p in fake.probes if p.at is not None]
    assert len(times) == len(fake.probes)
    return [b - a for a, b in itertools.pairwise(times)]


def within(gap: float, base: float) -> bool:
    """``gap`` is ``base`` ± jitter (+ MIN_SLEEP_SECONDS: a wake-up a rounding error early
    sleeps that much more)."""
    return base * (1 - JITTER) - 1e-9 <= gap <= base * (1 + JITTER) + MIN_SLEEP_SECONDS


def open_after_each_probe(fake: ProbeUpstream, threshold: int) -> list[bool]:
    """Replay ``fake``'s probe answers through the breaker's rule: open after each?"""
    open_after: list[bool] = []
    failures, is_open = 0, False
    for probe in fake.probes:
        if probe.status == 200:
            failures, is_open = 0, False
        elif not is_open:
            failures += 1
            is_open = failures >= threshold
        open_after.append(is_open)
    return open_after


async def test_run_probes_at_once_then_at_each_providers_interval(
    aiohttp_server: ServerFactory, up1: ProbeUpstream, up2: ProbeUpstream
) -> None:
    """The loop as it runs in production, with a fake clock and a recording sleep.

    up2 fails its probes from t=25 to t=100: two failures open its breaker, after which
    it is probed every recovery interval (40 s) until it answers and closes, then every
    health-check interval (10 s) again. up1 is probed every 10 s throughout.
    """
    health, recovery, threshold = 10.0, 40.0, 2
    fail_from, fail_until, horizon = 25.0, 100.0, 200.0
    raw = gateway_config(
        up1,
        up2,
        health_check_interval_seconds=health,
        recovery_check_interval_seconds=recovery,
        circuit_breaker_failure_threshold=threshold,
        circuit_breaker_timeout_seconds=1000,  # stays open until a probe closes it
    )
    config = build_config(raw, env={})
    clock = FakeClock(MONOTONIC_START)
    up1.clock = up2.clock = clock
    pool = BackendPool(config, clock, FakeClock(WALL_START))
    delays: list[float] = []
    probed_before_first_sleep: list[tuple[int, int]] = []
    states: list[BreakerState] = []

    async def sleep(delay: float) -> None:
        if not delays:
            probed_before_first_sleep.append((len(up1.probes), len(up2.probes)))
        delays.append(delay)
        states.append(pool.providers["up2"].breaker.state)
        assert len(delays) < 200, "the loop spins"
        if clock.now + delay - MONOTONIC_START > horizon:
            raise StopProbing
        clock.now += delay
        elapsed = clock.now - MONOTONIC_START
        up2.probe_status = 500 if fail_from <= elapsed < fail_until else 200

    async with aiohttp.ClientSession() as session:
        prober = HealthProber(
            pool, build_adapters(config, session), config.settings, random.Random(99), sleep
        )
        with pytest.raises(StopProbing):
            async with asyncio.timeout(10):
                await prober.run()

    # The first round is immediate: both probed at start, before any sleep.
    assert probed_before_first_sleep == [(1, 1)]
    assert up1.probes[0].at == up2.probes[0].at == MONOTONIC_START
    assert health * (1 - JITTER) <= delays[0] <= health * (1 + JITTER)
    assert all(d >= MIN_SLEEP_SECONDS for d in delays)

    up1_gaps = gaps(up1)
    assert len(up1_gaps) >= int(horizon / health / (1 + JITTER)) - 1
    assert all(within(g, health) for g in up1_gaps), up1_gaps

    open_after = open_after_each_probe(up2, threshold)
    assert True in open_after, "up2's breaker never opened"
    reopened_at = open_after.index(True)
    assert False in open_after[reopened_at:], "up2's breaker never closed again"
    assert open_after[-1] is False

    up2_gaps = gaps(up2)
    for index, gap in enumerate(up2_gaps):
        base = recovery if open_after[index] else health
        assert within(gap, base), (index, gap, base, open_after)
    assert sum(open_after[:-1]) >= 2  # at least two recovery intervals were waited
    assert BreakerState.OPEN in states
    assert pool.providers["up2"].breaker.state is BreakerState.CLOSED
    assert pool.providers["up2"].healthy


# --------------------------------------------------------------------------------------
# A provider that dies and comes back, end to end
# --------------------------------------------------------------------------------------


async def test_provider_dies_and_comes_back(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    up1: ProbeUpstream,
    up2: ProbeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    raw = gateway_config(
        up1,
        up2,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_timeout_seconds=600,
        recovery_check_interval_seconds=30,
    )
    gw = await start(start_gateway, raw)

    async def served_by(count: int) -> list[str | None]:
        providers = []
        for _ in range(count):
            code, provider, _ = await chat(session, gw)
            assert code == 200
            providers.append(provider)
        return providers

    # Healthy: both serve traffic.
    assert await gw.prober.probe_once() == {"up1": None, "up2": None}
    assert set(await served_by(20)) == {"up1", "up2"}

    # up2 dies: failing probes, then its breaker opens.
    port = await stop(up2)
    assert (await gw.prober.probe_once())["up2"] is not None
    status, body = await get_health(session, gw)
    assert (status, body["status"]) == (200, "degraded")
    assert body["providers"]["up2"]["healthy"] is False
    assert body["providers"]["up2"]["circuit_breaker_state"] == "closed"
    gw.clock.now += 30
    await gw.prober.probe_once()
    assert gw.state("up2") is BreakerState.OPEN
    status, body = await get_health(session, gw)
    assert (status, body["status"]) == (200, "degraded")
    assert body["providers"]["up2"]["circuit_breaker_state"] == "open"
    assert gw.prober.interval(gw.pool.providers["up2"]) <= 30 * (1 + JITTER)

    # Everything goes to up1 meanwhile, first time.
    assert set(await served_by(10)) == {"up1"}

    # up2 comes back: the recovery probe closes its breaker, and it gets traffic again.
    await restart(aiohttp_server, up2, port)
    gw.clock.now += 30
    gw.wall.now += 60
    assert await gw.prober.probe_once() == {"up1": None, "up2": None}
    assert gw.state("up2") is BreakerState.CLOSED
    status, body = await get_health(session, gw)
    assert (status, body["status"]) == (200, "healthy")
    assert body["providers"]["up2"] == {
        "healthy": True,
        "last_check": "2023-11-14T22:14:20Z",
        "error": None,
        "circuit_breaker_state": "closed",
    }
    posts = len(up2.requests)
    assert "up2" in await served_by(20)
    assert len(up2.requests) > posts


# --------------------------------------------------------------------------------------
# A breaker opened by traffic is re-probed within seconds; crashes restart the prober
# --------------------------------------------------------------------------------------


def trip_by_traffic(pool: BackendPool, provider: str) -> None:
    """Connection failures of live requests open ``provider``'s breaker."""
    backend = next(b for b in pool.all_backends() if b.provider.id == provider)
    for _ in range(pool.config.settings.circuit_breaker_failure_threshold):
        failed(pool, backend, UpstreamFailure(FailureKind.NETWORK, "connection reset"))
    assert pool.providers[provider].breaker.state is BreakerState.OPEN


async def test_a_breaker_opened_by_traffic_is_probed_within_seconds_and_retry_after_says_so(
    up1: ProbeUpstream,
) -> None:
    raw = gateway_config(
        up1,
        circuit_breaker_timeout_seconds=60,
        recovery_check_interval_seconds=120,
        health_check_interval_seconds=30,
    )
    config = build_config(raw, env={})
    clock = FakeClock(MONOTONIC_START)
    pool = BackendPool(config, clock, FakeClock(WALL_START))
    async with aiohttp.ClientSession() as session:
        prober = HealthProber(pool, build_adapters(config, session), config.settings)
        await prober.probe_once()
        assert pool.providers["up1"].next_probe_at == pytest.approx(clock.now + 30, rel=JITTER)
        trip_by_traffic(pool, "up1")
    due = pool.providers["up1"].next_probe_at
    assert due is not None
    assert due - clock.now == pytest.approx(RECOVERY_PROBE_DELAY, rel=JITTER)
    # The 503 tells clients to come back at the probe, not when the 60 s window ends.
    router = Router(pool)
    error = router.no_healthy_backends(config.models["gpt-test"], pool.backends["gpt-test"])
    assert int(error.headers["Retry-After"]) <= math.ceil(RECOVERY_PROBE_DELAY * (1 + JITTER))


async def test_the_running_prober_wakes_up_for_a_breaker_that_opens_meanwhile(
    up1: ProbeUpstream, up2: ProbeUpstream
) -> None:
    raw = gateway_config(up1, up2, health_check_interval_seconds=30)
    config = build_config(raw, env={})
    clock = FakeClock(MONOTONIC_START)
    up1.clock = up2.clock = clock
    pool = BackendPool(config, clock, FakeClock(WALL_START))
    long_sleep = asyncio.Event()  # never set: a long sleep lasts until cut short
    sleeping = asyncio.Event()

    async def sleep(delay: float) -> None:
        if delay > 10:
            sleeping.set()
            await long_sleep.wait()
        clock.now += delay

    async with aiohttp.ClientSession() as session:
        prober = HealthProber(
            pool, build_adapters(config, session), config.settings, random.Random(5), sleep
        )
        task = asyncio.create_task(prober.run())
        try:
            async with asyncio.timeout(10):
                await sleeping.wait()  # the first round is done; 30 s to the next
                assert (len(up1.probes), len(up2.probes)) == (1, 1)
                up2.probed.clear()
                opened_at = clock.now
                trip_by_traffic(pool, "up2")
                await up2.probed.wait()
                # The probe's answer is on its way back; nothing to await but the loop.
                while pool.providers["up2"].breaker.state is not BreakerState.CLOSED:  # noqa: ASYNC110
                    await asyncio.sleep(0)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(up2.probes) == 2
    assert len(up1.probes) == 1  # only the provider that opened was probed early
    probe_at = up2.probes[-1].at
    assert probe_at is not None
    assert probe_at - opened_at == pytest.approx(RECOVERY_PROBE_DELAY, rel=JITTER)
    assert pool.providers["up2"].breaker.state is BreakerState.CLOSED  # it answered


async def test_a_crashed_prober_is_logged_and_restarts(up1: ProbeUpstream) -> None:
    config = build_config(gateway_config(up1), env={})
    pool = BackendPool(config, FakeClock(MONOTONIC_START), FakeClock(WALL_START))
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 3:
            raise StopProbing

    async with aiohttp.ClientSession() as session:
        prober = HealthProber(
            pool, build_adapters(config, session), config.settings, random.Random(5), sleep
        )
        rounds = 0
        real_round = prober.probe_once

        async def crashing_round(*args: Any) -> dict[str, str | None]:
            nonlocal rounds
            rounds += 1
            if rounds == 1:
                raise RuntimeError("a bug in the prober")
            return await real_round(*args)

        prober.probe_once = crashing_round  # type: ignore[method-assign,assignment]
        with structlog.testing.capture_logs() as logs, pytest.raises(StopProbing):
            async with asyncio.timeout(10):
                await prober.run_forever()
    # The first crash is the bug; StopProbing, which ends the test, counts as one too.
    crash = next(line for line in logs if line["event"] == "health_prober_crashed")
    assert crash["log_level"] == "error"
    assert crash["restart_in_seconds"] == RESTART_DELAY_SECONDS
    assert delays[0] == RESTART_DELAY_SECONDS  # waited, then ran again
    assert rounds >= 2
    assert len(up1.probes) >= 1  # the restarted prober probed
