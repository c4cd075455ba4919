"""The failover loop's rules (``proxy.py`` with ``routing.py`` and ``breaker.py``).

Driven over HTTP against fake upstreams, with the gateway's clock injected so breaker
windows and Retry-After cool-downs pass at the test's command:

- never the same backend twice while another remains; the only backend is retried
  (``max_internal_retries``) for transient failures, never for 429/401/timeouts;
- at most ``max_retries`` attempts, and ``providers.<id>.max_retries`` per provider;
- a 429's ``Retry-After`` sends later requests elsewhere until it has passed;
- the breaker opens after the threshold, then answers 503 at once (no upstream call),
  lets one trial through after its window and closes when the trial succeeds;
- caller errors and client disconnects never count against a backend.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.breaker import BreakerState
from berry_proxy.pool import BackendPool

from .conftest import (
    ADMIN_TOKEN,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    gateway_config,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def chat(stream: bool = False) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": stream,
    }


async def post(
    server: TestServer, stream: bool = False
) -> tuple[int, dict[str, str], dict[str, Any] | bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(server) + "/v1/chat/completions", json=chat(stream), headers=AUTH
        ) as response,
    ):
        body = await response.read()
        headers = dict(response.headers)
        if response.content_type == "application/json":
            return response.status, headers, await response.json()
        return response.status, headers, body


async def fakes(aiohttp_server: ServerFactory, count: int) -> list[FakeUpstream]:
    made = []
    for _ in range(count):
        fake = FakeUpstream()
        fake.server = await aiohttp_server(fake.app())
        made.append(fake)
    return made


def pool_of(server: TestServer) -> BackendPool:
    return server.app[keys.GATEWAY].runtime.pool


def breaker_state(server: TestServer) -> BreakerState:
    """The state of the breakers guarding gpt-test's only backend, taken together."""
    return pool_of(server).backends["gpt-test"][0].breaker_state


async def tripped_gateway(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> tuple[TestServer, FakeClock]:
    """A gateway whose only backend's breaker has just opened (threshold 3)."""
    clock = FakeClock()
    upstream.mode = "status"
    raw = gateway_config(upstream, circuit_breaker_failure_threshold=3)
    server = await start_gateway(raw, clock=clock)
    for _ in range(3):  # a request counts once, however many attempts: three requests
        status, _, _ = await post(server)
        assert status == 502
    assert breaker_state(server) is BreakerState.OPEN
    return server, clock


# --------------------------------------------------------------------------------------
# Attempt order
# --------------------------------------------------------------------------------------


async def test_never_the_same_backend_twice_while_others_remain(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    ups = await fakes(aiohttp_server, 3)
    for fake in ups:
        fake.mode = "status"
    raw = gateway_config(*ups, circuit_breaker_failure_threshold=100)
    server = await start_gateway(raw)
    for _ in range(10):
        before = [len(f.requests) for f in ups]
        status, headers, _ = await post(server)
        assert status == 502
        assert headers["X-Berry-Attempts"] == "3"
        assert [len(f.requests) - b for f, b in zip(ups, before, strict=True)] == [1, 1, 1]


async def test_the_only_backend_is_retried_for_transient_failures(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "reset"  # the connection drops before an answer
    server = await start_gateway(gateway_config(upstream, max_retries=4, max_internal_retries=2))
    status, _, body = await post(server)
    assert status == 502
    assert isinstance(body, dict)
    # One try plus max_internal_retries more (within max_retries).
    assert body["error"]["details"]["attempts"] == 3
    assert len(upstream.requests) == 3


async def test_a_5xx_is_retried_on_the_same_backend_at_most_once(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    upstream.status_code = 502
    server = await start_gateway(gateway_config(upstream, max_retries=4, max_internal_retries=2))
    status, headers, body = await post(server)
    assert status == 502
    assert isinstance(body, dict)
    assert body["error"]["details"]["attempts"] == 2
    assert headers["X-Berry-Attempts"] == "2"
    assert len(upstream.requests) == 2


async def test_a_retried_backend_that_recovers_serves_the_request(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "reset"
    server = await start_gateway(gateway_config(upstream))
    pool = pool_of(server)
    task = asyncio.create_task(post(server, stream=True))
    await upstream.received.wait()
    upstream.mode = "ok"
    status, headers, body = await task
    assert status == 200
    assert headers["X-Berry-Attempts"] == "2"
    assert isinstance(body, bytes)
    assert body.endswith(b"data: [DONE]\n\n")
    assert pool.backends["gpt-test"][0].stats.failed_requests == 1


async def test_no_same_backend_retry_for_rate_limits_or_rejected_keys(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(gateway_config(upstream, circuit_breaker_failure_threshold=100))
    upstream.mode = "status"
    for code in (429, 401, 403):
        upstream.status_code = code
        upstream.requests.clear()
        status, _, _ = await post(server)
        assert status in (429, 502)
        assert len(upstream.requests) == 1, code


async def test_max_retries_bounds_the_attempts(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    ups = await fakes(aiohttp_server, 3)
    for fake in ups:
        fake.mode = "status"
    server = await start_gateway(gateway_config(*ups, max_retries=2))
    status, headers, _ = await post(server)
    assert status == 502
    assert headers["X-Berry-Attempts"] == "2"
    assert sum(len(f.requests) for f in ups) == 2


async def test_per_provider_max_retries_caps_attempts_on_it(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    raw = gateway_config(upstream, max_retries=5, max_internal_retries=4)
    raw["providers"]["up1"]["max_retries"] = 2
    server = await start_gateway(raw)
    status, headers, _ = await post(server)
    assert status == 502
    assert headers["X-Berry-Attempts"] == "2"


# --------------------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------------------


async def test_retry_after_sends_later_requests_elsewhere_until_it_passes(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    limited, spare = await fakes(aiohttp_server, 2)
    limited.mode = "status"
    limited.status_code = 429
    limited.extra_headers = {"Retry-After": "30"}
    clock = FakeClock()
    raw = gateway_config(limited, spare)
    raw["models"]["gpt-test"]["backends"][0]["weight"] = 1000  # normally always first
    server = await start_gateway(raw, clock=clock)
    status, headers, _ = await post(server)
    assert status == 200
    assert headers["X-Berry-Provider"] == "up2"
    assert len(limited.requests) == 1

    for _ in range(5):
        status, headers, _ = await post(server)
        assert (status, headers["X-Berry-Attempts"]) == (200, "1")
    assert len(limited.requests) == 1, "left alone while Retry-After runs"

    limited.mode = "ok"
    clock.now += 30
    status, headers, _ = await post(server)
    assert headers["X-Berry-Provider"] == "up1"


# --------------------------------------------------------------------------------------
# Circuit breaker
# --------------------------------------------------------------------------------------


async def test_breaker_opens_fails_fast_and_closes_after_a_good_trial(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server, clock = await tripped_gateway(start_gateway, upstream)
    sent = len(upstream.requests)

    status, headers, body = await post(server)
    assert status == 503
    assert isinstance(body, dict)
    assert body["error"]["code"] == "no_healthy_backends"
    assert headers["Retry-After"] == "60"
    assert len(upstream.requests) == sent, "fails fast: no upstream call"

    clock.now += 60
    upstream.mode = "ok"
    status, headers, _ = await post(server, stream=True)
    assert (status, headers["X-Berry-Attempts"]) == (200, "1")
    assert breaker_state(server) is BreakerState.CLOSED


async def test_a_failed_trial_reopens_for_longer(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server, clock = await tripped_gateway(start_gateway, upstream)
    clock.now += 60
    sent = len(upstream.requests)
    status, _, _ = await post(server)
    assert status == 502
    assert len(upstream.requests) == sent + 1, "exactly one trial request"
    status, headers, _ = await post(server)
    assert (status, headers["Retry-After"]) == (503, "120")


async def test_caller_errors_never_count_against_a_backend(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    raw = gateway_config(upstream, circuit_breaker_failure_threshold=2)
    server = await start_gateway(raw)
    pool = pool_of(server)
    backend = pool.backends["gpt-test"][0]
    confidence = backend.confidence.value(pool.clock())
    for code in (400, 404, 413, 422) * 3:
        upstream.status_code = code
        status, _, _ = await post(server)
        assert status == code
    assert backend.provider.breaker.state is BreakerState.CLOSED
    assert backend.stats.failed_requests == 0
    assert backend.confidence.value(pool.clock()) == confidence


async def test_a_departing_client_never_counts_against_a_backend(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "gated"
    raw = gateway_config(upstream, circuit_breaker_failure_threshold=1)
    server = await start_gateway(raw)
    pool = pool_of(server)
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            base_url(server) + "/v1/chat/completions", json=chat(stream=True), headers=AUTH
        )
        await response.content.readline()
        response.close()  # the client leaves mid-stream
    await upstream.disconnected.wait()
    backend = pool.backends["gpt-test"][0]
    assert backend.provider.breaker.state is BreakerState.CLOSED
    assert backend.stats.failed_requests == 0
    upstream.mode = "ok"
    status, _, _ = await post(server)
    assert status == 200


async def test_a_client_that_leaves_during_a_trial_frees_it(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server, clock = await tripped_gateway(start_gateway, upstream)
    clock.now += 60
    upstream.mode = "stall"
    upstream.received.clear()
    task = asyncio.create_task(post(server, stream=True))
    await upstream.received.wait()
    task.cancel()  # the trial's client leaves before any answer
    await upstream.disconnected.wait()
    upstream.mode = "ok"
    for _ in range(20):  # the handler's cleanup runs as the server notices the disconnect
        if pool_of(server).backends["gpt-test"][0].available():
            break
        await asyncio.sleep(0.01)
    status, _, _ = await post(server)
    assert status == 200, "the next request got the trial"


async def test_a_trial_stream_closes_the_breaker_at_its_first_content(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """A long trial stream does not keep the model at 503 until it ends."""
    server, clock = await tripped_gateway(start_gateway, upstream)
    clock.now += 60
    upstream.mode = "gated"  # first content, then wait for the gate
    async with aiohttp.ClientSession() as session:
        trial = await session.post(
            base_url(server) + "/v1/chat/completions", json=chat(stream=True), headers=AUTH
        )
        assert trial.status == 200
        await upstream.first_chunk_sent.wait()
        assert breaker_state(server) is BreakerState.CLOSED
        upstream.mode = "ok"
        status, _, _ = await post(server)
        assert status == 200, "served while the trial stream is still running"
        upstream.gate.set()
        assert (await trial.read()).endswith(b"data: [DONE]\n\n")
