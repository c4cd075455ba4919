"""The drain as requests see it, in process: refused once draining, ended when it runs out.

``Drain.begin`` and ``Drain.expire`` are what ``lifecycle.py`` calls on SIGTERM and at the
drain timeout; here the test calls them at the moment it chooses. The signals themselves,
in a real process, are in ``test_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.runtime import Gateway
from tests.conftest import (
    ADMIN_TOKEN,
    FakeUpstream,
    GatewayFactory,
    chat_body,
    gateway_config,
)

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def gateway_of(server: TestServer) -> Gateway:
    return server.app[keys.GATEWAY]


def url(server: TestServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def slow_config(*upstreams: FakeUpstream) -> dict[str, Any]:
    raw = gateway_config(*upstreams)
    for provider in raw["providers"].values():
        provider["first_byte_timeout_seconds"] = 30
        provider["idle_timeout_seconds"] = 30
    return raw


async def test_a_stream_still_open_when_the_drain_runs_out_gets_the_draining_event(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(slow_config(upstream))
    upstream.mode = "gated"  # one content event, then nothing until the gate opens
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url(server, "/v1/chat/completions"), data=chat_body(stream=True), headers=HEADERS
        ) as response,
    ):
        assert response.status == 200
        await upstream.first_chunk_sent.wait()
        gateway_of(server).drain.expire()
        body = await response.read()
        await upstream.disconnected.wait()  # the upstream stops generating
    events = [e for e in body.split(b"\n\n") if e]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "draining"
    assert b"[DONE]" not in body
    assert b'"content"' in events[0]  # what came before it was delivered
    pool = gateway_of(server).runtime.pool
    (backend,) = pool.backends["gpt-test"]
    assert backend.stats.failed_requests == 0  # the upstream did nothing wrong
    assert pool.metrics.upstream_requests == {("up1", "gpt-test", "drained"): 1}


async def test_a_request_waiting_upstream_gets_503_draining_and_no_other_backend(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    server = await start_gateway(slow_config(upstream, upstream2))
    upstream.mode = upstream2.mode = "stall"
    for stream in (False, True):
        upstream.received.clear()
        upstream2.received.clear()
        async with aiohttp.ClientSession() as session:
            answer = asyncio.ensure_future(
                session.post(
                    url(server, "/v1/chat/completions"),
                    data=chat_body(stream=stream),
                    headers=HEADERS,
                )
            )
            waits = {
                asyncio.ensure_future(upstream.received.wait()),
                asyncio.ensure_future(upstream2.received.wait()),
            }
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            sent = len(upstream.requests) + len(upstream2.requests)
            gateway_of(server).drain.expire()
            async with await answer as response:
                assert response.status == 503
                error = (await response.json())["error"]
                assert error["code"] == "draining"
                assert response.headers["Connection"] == "close"
        assert len(upstream.requests) + len(upstream2.requests) == sent  # no failover
        gateway_of(server).drain.expired = False  # the next round starts fresh
        gateway_of(server).drain.draining = False


async def test_once_draining_new_requests_and_health_answer_503(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(slow_config(upstream))
    gateway_of(server).drain.begin()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url(server, "/v1/chat/completions"), data=chat_body(), headers=HEADERS
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "draining"
        async with session.get(url(server, "/health")) as response:
            assert response.status == 503
            assert (await response.json())["status"] == "draining"
        async with session.get(url(server, "/admin/system-stats"), headers=HEADERS) as response:
            assert (await response.json())["draining"] is True
        async with session.post(url(server, "/admin/reload"), headers=HEADERS) as response:
            assert response.status == 503
    assert upstream.requests == []


async def test_a_request_that_waited_for_a_slot_past_the_drain_is_ended_too(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """One connection slot: A holds it (stalled upstream), B waits for it. When the drain
    runs out A is ended, and B, taking the freed slot, must not start a new attempt."""
    raw = slow_config(upstream)
    raw["providers"]["up1"]["max_connections"] = 1
    raw["providers"]["up1"]["pool_timeout_seconds"] = 10
    raw["providers"]["up1"]["connect_timeout_seconds"] = 10
    server = await start_gateway(raw)
    upstream.mode = "stall"
    provider = gateway_of(server).runtime.pool.providers["up1"]
    async with aiohttp.ClientSession() as session:

        async def post() -> tuple[int, str]:
            async with session.post(
                url(server, "/v1/chat/completions"), data=chat_body(), headers=HEADERS
            ) as response:
                return response.status, (await response.json())["error"]["code"]

        first = asyncio.ensure_future(post())
        await upstream.received.wait()
        second = asyncio.ensure_future(post())
        async with asyncio.timeout(5):
            while provider.waiting == 0:  # noqa: ASYNC110  # B queued for the slot
                await asyncio.sleep(0.01)
        gateway_of(server).drain.expire()
        async with asyncio.timeout(10):  # without the fix B would wait on its upstream
            results = await asyncio.gather(first, second)
    assert list(results) == [(503, "draining"), (503, "draining")]
    assert len(upstream.requests) == 1  # B never reached the upstream
