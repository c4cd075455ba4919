"""One client, or one busy provider, cannot take the gateway down for others.

SPEC §5 "Breaker evidence": a request counts at most once against a breaker however many
attempts it made; 5xx answers count for the backend (provider + upstream model), never for
the provider's other models; a fast 5xx is retried on the same backend at most once.
§5 "Limits": ``max_connections`` defaults high enough that ordinary load never queues; at
a configured limit a request waits a short bounded time, then fails over or gets 503
``upstream_saturated`` with an honest ``Retry-After``, and the saturation shows in the log
and ``/admin/system-stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.breaker import BreakerState
from berry_proxy.config_model import DEFAULT_MAX_CONNECTIONS
from berry_proxy.pool import BackendPool

from .conftest import (
    ADMIN_TOKEN,
    FakeUpstream,
    GatewayFactory,
    Recorded,
    ServerFactory,
    base_url,
    gateway_config,
)

OTHER_TOKEN = "test-other-user-token-0123456789"
MALFORMED = "this request makes the upstream crash"


@dataclass
class CrashingUpstream(FakeUpstream):
    """A provider that answers HTTP 500 to one kind of (malformed) request, 200 to others."""

    async def respond(self, request: web.Request) -> web.StreamResponse:
        if MALFORMED.encode() in await request.read():
            self.requests.append(Recorded(request.path, dict(request.headers), None))
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        return await super().respond(request)


def two_models_one_provider(upstream: FakeUpstream, **settings: Any) -> dict[str, Any]:
    """gpt-test and other-model, both on provider up1; a second user for other-model."""
    raw = gateway_config(upstream, **settings)
    raw["users"]["other"] = {"token": OTHER_TOKEN, "allowed_models": ["other-model"]}
    return raw


async def chat(
    session: aiohttp.ClientSession,
    server: TestServer,
    model: str,
    token: str = ADMIN_TOKEN,
    content: str = "Hi",
    stream: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    async with session.post(
        base_url(server) + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        return response.status, dict(response.headers), await response.read()


@pytest.fixture
async def crashing(aiohttp_server: ServerFactory) -> CrashingUpstream:
    fake = CrashingUpstream()
    fake.server = await aiohttp_server(fake.app())
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def pool_of(server: TestServer) -> BackendPool:
    return server.app[keys.GATEWAY].runtime.pool


# --------------------------------------------------------------------------------------
# Breaker evidence
# --------------------------------------------------------------------------------------


async def test_one_users_malformed_requests_never_take_the_providers_other_model_down(
    start_gateway: GatewayFactory, crashing: CrashingUpstream, session: aiohttp.ClientSession
) -> None:
    # A threshold of 2: two failing requests are enough to open a breaker.
    server = await start_gateway(
        two_models_one_provider(crashing, circuit_breaker_failure_threshold=2)
    )
    status, headers, _ = await chat(session, server, "gpt-test", content=MALFORMED)
    assert (status, headers["X-Berry-Attempts"]) == (502, "2")  # one retry of the 5xx
    status, _, _ = await chat(session, server, "gpt-test", content=MALFORMED)
    assert status == 502  # its first attempt opens the model's breaker: no retry then

    pool = pool_of(server)
    assert pool.providers["up1"].breaker.state is BreakerState.CLOSED
    assert pool.backends["gpt-test"][0].breaker.state is BreakerState.OPEN
    for _ in range(10):
        status, headers, _ = await chat(session, server, "other-model", token=OTHER_TOKEN)
        assert (status, headers["X-Berry-Provider"]) == (200, "up1")


async def test_a_request_counts_once_against_a_breaker_however_many_attempts(
    start_gateway: GatewayFactory, crashing: CrashingUpstream, session: aiohttp.ClientSession
) -> None:
    server = await start_gateway(
        two_models_one_provider(crashing, circuit_breaker_failure_threshold=2)
    )
    status, headers, _ = await chat(session, server, "gpt-test", content=MALFORMED)
    assert (status, headers["X-Berry-Attempts"]) == (502, "2")
    backend = pool_of(server).backends["gpt-test"][0]
    assert backend.breaker.consecutive_failures == 1
    assert backend.breaker.state is BreakerState.CLOSED
    # The same user's well-formed request is served: nothing was tripped.
    status, _, _ = await chat(session, server, "gpt-test")
    assert status == 200


async def test_connection_failures_count_once_per_request_for_the_provider(
    start_gateway: GatewayFactory, upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    upstream.mode = "reset"  # every attempt's connection drops
    server = await start_gateway(
        gateway_config(upstream, circuit_breaker_failure_threshold=2, max_internal_retries=2)
    )
    status, headers, _ = await chat(session, server, "gpt-test")
    assert (status, headers["X-Berry-Attempts"]) == (502, "3")
    breaker = pool_of(server).providers["up1"].breaker
    assert breaker.consecutive_failures == 1
    assert breaker.state.value == "closed"
    status, _, _ = await chat(session, server, "gpt-test")
    assert status == 502
    assert breaker.state.value == "open"  # the second request opens it


# --------------------------------------------------------------------------------------
# Connection slots
# --------------------------------------------------------------------------------------


def saturating_config(*upstreams: FakeUpstream, pool_timeout: float) -> dict[str, Any]:
    raw = gateway_config(*upstreams)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    for priority, provider in enumerate(raw["providers"].values()):
        provider["max_connections"] = 1
        provider["pool_timeout_seconds"] = pool_timeout
        raw["models"]["gpt-test"]["backends"][priority]["priority"] = priority
    return raw


@contextlib.asynccontextmanager
async def held_stream(
    session: aiohttp.ClientSession, server: TestServer, upstream: FakeUpstream
) -> Any:
    """A stream to ``upstream`` that holds its connection slot until the block ends."""
    upstream.mode = "gated"
    upstream.first_chunk_sent.clear()
    async with session.post(
        base_url(server) + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        assert response.status == 200
        await upstream.first_chunk_sent.wait()
        upstream.mode = "ok"  # later requests to it are answered at once
        try:
            yield response
        finally:
            upstream.gate.set()
            await response.read()


async def test_a_saturated_provider_fails_over_after_the_pool_timeout(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    server = await start_gateway(saturating_config(upstream, upstream2, pool_timeout=0.2))
    async with held_stream(session, server, upstream):
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, headers, _ = await chat(session, server, "gpt-test")
        waited = loop.time() - started
    assert (status, headers["X-Berry-Provider"]) == (200, "up2")
    assert headers["X-Berry-Attempts"] == "1"  # the attempt that never left is not counted
    assert 0.2 <= waited < 2.0
    assert pool_of(server).providers["up1"].saturations == 1
    assert pool_of(server).providers["up2"].saturations == 0


async def test_saturation_everywhere_is_a_503_with_an_honest_retry_after(
    start_gateway: GatewayFactory, upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    server = await start_gateway(saturating_config(upstream, pool_timeout=1.5))
    with structlog.testing.capture_logs() as logs:
        async with held_stream(session, server, upstream):
            status, headers, body = await chat(session, server, "gpt-test")
            async with session.get(
                base_url(server) + "/admin/system-stats",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response:
                stats = await response.json()
    error = orjson.loads(body)["error"]
    assert (status, error["code"]) == (503, "upstream_saturated")
    # It waited 1.5 s in vain: a slot is not expected sooner than that.
    assert int(headers["Retry-After"]) >= 2
    assert error["details"]["retry_after"] == int(headers["Retry-After"])
    assert error["details"]["attempts"] == 0
    assert "X-Berry-Attempts" not in headers
    assert stats["providers"]["up1"] == {
        "in_flight": 1,
        "max_connections": 1,
        "waiting": 0,
        "saturations": 1,
    }
    (saturated,) = [line for line in logs if line["event"] == "provider_saturated"]
    assert (saturated["provider"], saturated["max_connections"]) == ("up1", 1)
    # Saturation is the gateway's own limit: the provider is not blamed.
    backend = pool_of(server).backends["gpt-test"][0]
    assert backend.stats.failed_requests == 0
    assert backend.breaker_state is BreakerState.CLOSED


def test_the_default_slot_limit_is_far_above_ordinary_load() -> None:
    assert DEFAULT_MAX_CONNECTIONS >= 1024


CONCURRENT_STREAMS = 1000


async def test_a_thousand_concurrent_streams_to_one_provider_never_wait_for_a_slot(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * CONCURRENT_STREAMS + 256  # client, gateway in and out, fake upstream
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    raw = gateway_config(upstream)
    # One process runs the clients, the gateway and the fake upstream: give it time.
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 60
    raw["providers"]["up1"]["idle_timeout_seconds"] = 60
    server = await start_gateway(raw)
    provider = pool_of(server).providers["up1"]
    upstream.mode = "gated"  # each stream sends its first content, then waits
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    first_chunks = 0
    all_first = asyncio.Event()

    async def one(session: aiohttp.ClientSession) -> bytes:
        nonlocal first_chunks
        async with session.post(
            base_url(server) + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            assert response.status == 200, await response.text()
            await response.content.readuntil(b"\n\n")  # the held role chunk
            await response.content.readuntil(b"\n\n")  # the first content
            first_chunks += 1
            if first_chunks == CONCURRENT_STREAMS:
                all_first.set()
            return await response.read()

    try:
        async with (
            asyncio.timeout(60),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            streams = [asyncio.create_task(one(session)) for _ in range(CONCURRENT_STREAMS)]
            await all_first.wait()  # every stream has its first content before any ends
            assert provider.in_flight == CONCURRENT_STREAMS
            assert (provider.waiting, provider.saturations) == (0, 0)
            upstream.gate.set()
            rests = await asyncio.gather(*streams)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(rest.endswith(b"data: [DONE]\n\n") for rest in rests)
    assert provider.in_flight == 0
