"""A failed attempt's buffers are freed when it ends, not at the next full GC.

An attempt that fails before the commit point holds the upstream response, the event
splitter with what it had buffered (up to ``max_event_bytes``) and the events held back.
If anything kept a reference cycle through them (an exception held in a local of the
frame that raised it, as ``reraise_as_failure`` once did), they would stay in memory until
the cyclic garbage collector ran: under load, hundreds of megabytes. These tests turn the
collector off, fail attempts over, and check that nothing of the failed attempts is left.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestServer

from berry_proxy.exchange import Attempt, Exchange
from berry_proxy.relay import StreamRelay
from berry_proxy.sse import EventSplitter
from berry_proxy.upstream import HttpUpstreamResponse

from .conftest import (
    ADMIN_TOKEN,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    chat_chunk,
    gateway_config,
)

PENDING = 512 * 1024  # bytes the splitter holds when the failing upstream hangs up


async def half_an_event_then_hang_up(request: web.Request) -> web.StreamResponse:
    """A stream that sends a role chunk and half a megabyte of an event, then drops."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(chat_chunk({"role": "assistant", "content": ""}))
    await response.write(b"data: " + b"x" * PENDING)
    assert request.transport is not None
    request.transport.close()
    return response


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def failed_over(server: TestServer, stream: bool, requests: int = 5) -> list[bytes]:
    """Send ``requests`` chats; each must fail over from up1 to up2. Their bodies."""
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    answers = []
    async with aiohttp.ClientSession() as session:
        for _ in range(requests):
            async with session.post(
                base_url(server) + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response:
                assert response.status == 200
                assert response.headers["X-Berry-Provider"] == "up2"
                assert response.headers["X-Berry-Attempts"] == "2"
                answers.append(await response.read())
    return answers


def survivors() -> list[Any]:
    kinds = (StreamRelay, EventSplitter, Exchange, Attempt, HttpUpstreamResponse, ClientResponse)
    return [obj for obj in gc.get_objects() if isinstance(obj, kinds)]


async def test_failed_stream_attempts_leave_nothing_for_the_collector(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    upstream2: FakeUpstream,
    collector_off: None,
) -> None:
    broken = web.Application()
    broken.router.add_post("/v1/chat/completions", half_an_event_then_hang_up)
    broken_server = await aiohttp_server(broken)
    first = FakeUpstream(server=broken_server)
    raw = gateway_config(first, upstream2)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1  # the broken one goes first
    raw["settings"]["circuit_breaker_failure_threshold"] = 1000
    server = await start_gateway(raw)
    for answer in await failed_over(server, stream=True):
        assert answer.endswith(b"data: [DONE]\n\n")
    assert survivors() == []


async def test_failed_non_stream_attempts_leave_nothing_for_the_collector(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    collector_off: None,
) -> None:
    upstream.mode = "not_json"  # a 200 that is not JSON: a protocol failure
    raw = gateway_config(upstream, upstream2)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1
    raw["settings"]["circuit_breaker_failure_threshold"] = 1000
    server = await start_gateway(raw)
    await failed_over(server, stream=False)
    assert survivors() == []


async def test_timed_out_and_oversize_attempts_leave_nothing_for_the_collector(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    collector_off: None,
) -> None:
    """The watchdog's timeout, and an event over ``max_event_bytes``, end attempts too."""
    upstream.mode = "stall"  # never answers: the first-byte timeout ends the attempt
    raw = gateway_config(upstream, upstream2)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 0.2
    raw["settings"]["circuit_breaker_failure_threshold"] = 1000
    server = await start_gateway(raw)
    await failed_over(server, stream=True, requests=3)
    assert survivors() == []

    broken = web.Application()
    broken.router.add_post("/v1/chat/completions", half_an_event_then_hang_up)
    first = FakeUpstream(server=await aiohttp_server(broken))
    raw = gateway_config(first, upstream2)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1
    raw["providers"]["up1"]["max_event_bytes"] = 64 * 1024  # under what it sends
    raw["settings"]["circuit_breaker_failure_threshold"] = 1000
    server = await start_gateway(raw)
    await failed_over(server, stream=True, requests=3)
    assert survivors() == []
