"""Per-user rate limits with the memory store: windows, tokens, concurrency, answers.

The formula is driven by an injected clock (window edges, refills); the answers through
the gateway and the ``openai`` SDK (429 ``RateLimitError``, the ``x-ratelimit-*`` headers
on streamed and plain answers). The Redis store has its own file
(``test_ratelimit_redis.py``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.config_model import RateLimitConfig, UserConfig
from berry_proxy.errors import RateLimited
from berry_proxy.ratelimit import (
    MemoryStore,
    RateLimiter,
    UserLimits,
    duration_text,
    estimate_tokens,
    limits_for,
    response_headers,
)

from .conftest import (
    ADMIN_TOKEN,
    AccessLines,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    chat_body,
    gateway_config,
)

LIMITED_TOKEN = "limited-user-token-0123456789"


def limited(**limit: int) -> UserLimits:
    user = UserConfig(id="u", name="u", token_sha256=b"", rate_limit=RateLimitConfig(**limit))
    limits = limits_for(user)
    assert limits is not None
    return limits


def limiter(clock: FakeClock, **limit: int) -> tuple[RateLimiter, UserLimits, list[Any]]:
    refused: list[Any] = []
    store = MemoryStore(clock)
    user = UserConfig(id="u", name="u", token_sha256=b"", rate_limit=RateLimitConfig(**limit))
    rl = RateLimiter({"u": user}, store, lambda u, name: refused.append((u, name)))
    limits = rl.limits_of("u")
    assert limits is not None
    return rl, limits, refused


async def admitted(rl: RateLimiter, limits: UserLimits, estimate: int = 0) -> bool:
    try:
        await rl.admit(limits, estimate)
    except RateLimited:
        return False
    return True


# ------------------------------------------------------------------------------ formula


async def test_a_full_burst_then_one_request_per_refill_interval() -> None:
    clock = FakeClock()
    rl, limits, refused = limiter(clock, requests_per_minute=60)
    assert [await admitted(rl, limits) for _ in range(61)] == [True] * 60 + [False]
    assert refused == [("u", "requests_per_minute")]
    clock.now += 0.99
    assert not await admitted(rl, limits)
    clock.now += 0.01
    assert await admitted(rl, limits)  # one refilled after 1 s (60 per minute)
    assert not await admitted(rl, limits)


async def test_a_window_edge_admits_no_second_burst() -> None:
    """Fixed windows would admit the limit at 59.9 s and again at 60.1 s; here, across
    any 60 s, at most the limit plus what refilled meanwhile."""
    clock = FakeClock(now=60.0 * 200 - 0.1)  # just before a minute boundary
    rl, limits, _ = limiter(clock, requests_per_minute=10)
    assert sum([await admitted(rl, limits) for _ in range(20)]) == 10
    clock.now += 0.2  # across the edge of a fixed minute
    assert sum([await admitted(rl, limits) for _ in range(20)]) == 0
    clock.now += 6.0  # one refill interval
    assert sum([await admitted(rl, limits) for _ in range(20)]) == 1


async def test_every_limit_must_admit_and_a_refusal_spends_on_none() -> None:
    clock = FakeClock()
    rl, limits, refused = limiter(clock, requests_per_minute=100, requests_per_hour=3)
    assert [await admitted(rl, limits) for _ in range(4)] == [True, True, True, False]
    assert refused == [("u", "requests_per_hour")]
    view = await rl.store.peek(limits)
    # The refused request spent nothing on the minute limit either.
    assert view["requests_per_minute"]["remaining"] == 97
    assert view["requests_per_hour"]["remaining"] == 0


async def test_tokens_reserve_the_estimate_and_settle_with_the_usage() -> None:
    clock = FakeClock()
    rl, limits, _ = limiter(clock, tokens_per_minute=1000)
    admission = await rl.admit(limits, 600)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "400"
    assert not await admitted(rl, limits, 600)  # 600 more do not fit in 400
    rl.finish(admission, 100)  # the upstream used 100: 500 refunded
    assert (await rl.store.peek(limits))["tokens_per_minute"]["remaining"] == 900
    assert await admitted(rl, limits, 600)


async def test_a_request_larger_than_the_token_limit_says_so() -> None:
    clock = FakeClock()
    rl, limits, _ = limiter(clock, tokens_per_minute=1000)
    with pytest.raises(RateLimited, match="more than the limit") as caught:
        await rl.admit(limits, 5000)
    # Waiting never makes it fit: no promise sooner than the window.
    assert caught.value.details == {"limit": "tokens_per_minute", "retry_after": 60}


async def test_concurrency_leases_are_returned_when_requests_end() -> None:
    clock = FakeClock()
    rl, limits, refused = limiter(clock, max_concurrent=2)
    first, second = await rl.admit(limits, 0), await rl.admit(limits, 0)
    assert not await admitted(rl, limits)
    assert refused == [("u", "max_concurrent")]
    rl.finish(first, None)
    third = await rl.admit(limits, 0)
    for admission in (second, third):
        rl.finish(admission, None)
    assert (await rl.store.peek(limits))["max_concurrent"] == {"limit": 2, "in_use": 0}


def test_durations_are_written_as_openai_writes_them() -> None:
    assert [duration_text(s) for s in (0.02, 1, 1.5, 59.9999, 360, 3600, 86399)] == [
        "20ms",
        "1s",
        "1.5s",
        "1m0s",
        "6m0s",
        "1h0m0s",
        "23h59m59s",
    ]


def test_the_headers_report_the_tightest_request_limit() -> None:
    clock = FakeClock()
    store = MemoryStore(clock)
    limits = limited(requests_per_minute=100, requests_per_day=5, tokens_per_minute=50)
    decision = store.decide_now(limits, 20)
    assert response_headers(decision.states) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "4h48m0s",  # one day / 5
        "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "30",
        "x-ratelimit-reset-tokens": "24s",
    }


def test_the_estimate_is_prompt_bytes_over_four_plus_max_tokens() -> None:
    assert estimate_tokens(400, 50) == 150
    assert estimate_tokens(400, None) == 100 + 1024


def test_users_without_limits_have_none() -> None:
    user = UserConfig(id="u", name="u", token_sha256=b"", rate_limit=RateLimitConfig())
    assert limits_for(user) is None


# ------------------------------------------------------------------------ through the gateway


def limited_config(upstream: FakeUpstream, **limit: int) -> dict[str, Any]:
    raw = gateway_config(upstream)
    raw["users"]["limited"] = {"token": LIMITED_TOKEN, "rate_limit": limit}
    return raw


async def chat(
    server: TestServer, *, stream: bool = False, token: str = LIMITED_TOKEN, **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(server) + "/v1/chat/completions",
            data=chat_body(stream, **extra),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_the_sdk_raises_rate_limit_error_and_sees_the_headers(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(limited_config(upstream, requests_per_minute=2))
    client = openai.AsyncOpenAI(
        base_url=base_url(server) + "/v1", api_key=LIMITED_TOKEN, max_retries=0
    )
    async with client:
        messages: Any = [{"role": "user", "content": "hi"}]
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=messages
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert raw.headers["x-ratelimit-reset-requests"] == "30s"
        assert "x-ratelimit-limit-tokens" not in raw.headers
        async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=messages, stream=True
        ) as streamed:
            assert streamed.headers["x-ratelimit-remaining-requests"] == "0"
            assert "[DONE]" in (await streamed.read()).decode()
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=messages)
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    body: Any = error.body
    assert body["details"]["limit"] == "requests_per_minute"
    assert int(error.response.headers["Retry-After"]) == body["details"]["retry_after"] >= 1
    assert len(upstream.requests) == 2  # the refused request never reached an upstream
    metrics = server.app[keys.GATEWAY].runtime.pool.metrics
    assert metrics.rate_limited == {("limited", "requests_per_minute"): 1}
    # Nor did it count against the backend.
    (backend,) = server.app[keys.GATEWAY].runtime.pool.backends["gpt-test"]
    assert backend.stats.failed_requests == 0


async def test_a_user_without_limits_gets_no_rate_limit_headers(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(limited_config(upstream, requests_per_minute=2))
    for _ in range(5):
        status, headers, _ = await chat(server, token=ADMIN_TOKEN)
        assert status == 200
        assert not any(h.lower().startswith("x-ratelimit") for h in headers)


@pytest.mark.parametrize("stream", [False, True])
async def test_tokens_are_settled_with_the_upstreams_usage(
    start_gateway: GatewayFactory, upstream: FakeUpstream, stream: bool
) -> None:
    """The fake upstream reports 15 tokens (11 + 4) for both; the stream's usage comes from
    the chunk the gateway asked for and the client did not. The clock stands still, so
    nothing refills: every number is exact."""
    clock = FakeClock()
    server = await start_gateway(limited_config(upstream, tokens_per_minute=10_000), clock=clock)
    status, headers, body = await chat(server, stream=stream, max_tokens=2000)
    assert status == 200, body
    first_estimate = len(chat_body(stream, max_tokens=2000)) // 4 + 2000
    assert int(headers["x-ratelimit-remaining-tokens"]) == 10_000 - first_estimate
    status, headers, body = await chat(server, stream=stream, max_tokens=1)
    assert status == 200, body
    second_estimate = len(chat_body(stream, max_tokens=1)) // 4 + 1
    # Settled: the first request now costs its 15 tokens, not its estimate.
    assert int(headers["x-ratelimit-remaining-tokens"]) == 10_000 - 15 - second_estimate
    if stream:
        assert b'"usage"' not in body  # the client did not ask for it


@dataclass
class UsageFreeUpstream(FakeUpstream):
    """Answers without ``usage``, as some local servers do."""

    async def respond(self, request: web.Request) -> web.StreamResponse:
        response = await super().respond(request)
        if isinstance(response, web.Response) and response.body is not None:
            answer = orjson.loads(bytes(response.body))  # type: ignore[arg-type]
            answer.pop("usage", None)
            return web.json_response(answer)
        return response


async def test_an_answer_without_usage_keeps_its_estimate(
    start_gateway: GatewayFactory, aiohttp_server: ServerFactory
) -> None:
    fake = UsageFreeUpstream()
    fake.server = await aiohttp_server(fake.app())
    clock = FakeClock()
    server = await start_gateway(limited_config(fake, tokens_per_minute=10_000), clock=clock)
    assert (await chat(server, max_tokens=5000))[0] == 200
    status, headers, _ = await chat(server, max_tokens=1)
    assert status == 200
    estimates = len(chat_body(False, max_tokens=5000)) // 4 + 5000
    estimates += len(chat_body(False, max_tokens=1)) // 4 + 1
    assert int(headers["x-ratelimit-remaining-tokens"]) == 10_000 - estimates


async def test_embeddings_reserve_no_completion_tokens(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """An embedding generates nothing: it reserves its input only, and settles with the
    usage (2 tokens from the fake upstream)."""
    server = await start_gateway(
        limited_config(upstream, tokens_per_minute=1000), clock=FakeClock()
    )
    body = orjson.dumps({"model": "gpt-test", "input": "hello"})
    auth = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        for expected in (1000 - len(body) // 4, 1000 - 2 - len(body) // 4):
            async with session.post(
                base_url(server) + "/v1/embeddings", data=body, headers=auth
            ) as response:
                assert response.status == 200, await response.text()
                assert int(response.headers["x-ratelimit-remaining-tokens"]) == expected


async def test_a_stream_the_client_abandons_keeps_its_reservation(
    start_gateway: GatewayFactory, upstream: FakeUpstream, access_lines: AccessLines
) -> None:
    """No usage came: the estimate stays charged (the upstream may have generated up to
    max_tokens), not refunded as for a request nothing answered."""
    server = await start_gateway(limited_config(upstream, tokens_per_minute=10_000))
    upstream.mode = "gated"
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            base_url(server) + "/v1/chat/completions",
            data=orjson.dumps({**body, "stream": True, "max_tokens": 3000}),
            headers={"Authorization": f"Bearer {LIMITED_TOKEN}"},
        )
        assert response.status == 200
        await response.content.readany()
        response.close()  # the client leaves before the usage chunk
        async with asyncio.timeout(5):
            await upstream.disconnected.wait()
    upstream.mode = "ok"
    limiter = server.app[keys.GATEWAY].runtime.limiter
    limits = limiter.limits_of("limited")
    assert limits is not None
    async with asyncio.timeout(5):
        # The access line is written after the handler settled its tokens.
        while not any(line.get("abort_reason") for line in access_lines):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    view = await limiter.store.peek(limits)
    assert view["tokens_per_minute"]["remaining"] <= 10_000 - 3000


async def test_a_failed_request_refunds_its_tokens(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(limited_config(upstream, tokens_per_minute=10_000))
    upstream.mode = "status"
    status, _, _ = await chat(server, max_tokens=5000)
    assert status == 502
    upstream.mode = "ok"
    status, headers, _ = await chat(server, max_tokens=1)
    assert status == 200
    assert 10_000 - int(headers["x-ratelimit-remaining-tokens"]) < 100


async def test_max_concurrent_counts_streams_held_open(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(limited_config(upstream, max_concurrent=2))
    upstream.mode = "gated"
    body = orjson.dumps(
        {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    auth = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        held = [
            await session.post(base_url(server) + "/v1/chat/completions", data=body, headers=auth)
            for _ in range(2)
        ]
        assert [r.status for r in held] == [200, 200]
        status, headers, answer = await chat(server)
        assert status == 429
        assert orjson.loads(answer)["error"]["details"] == {
            "limit": "max_concurrent",
            "retry_after": 1,
        }
        assert headers["Retry-After"] == "1"
        upstream.gate.set()
        for response in held:
            assert b"[DONE]" in await response.read()
    status, _, _ = await chat(server)
    assert status == 200
    view = await admin_get(server, "/admin/rate-limits")
    assert view["users"]["limited"]["max_concurrent"] == {"limit": 2, "in_use": 0, "refused": 1}
    assert view["store"]["backend"] == "memory"


async def admin_get(server: TestServer, path: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            base_url(server) + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as response,
    ):
        assert response.status == 200
        return await response.json()


async def test_a_refill_in_real_time_admits_one_request_not_a_burst(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """Real clock, bounded: 120 per minute is one every 0.5 s after the first burst."""
    server = await start_gateway(limited_config(upstream, requests_per_minute=120))
    statuses = await asyncio.gather(*(chat(server) for _ in range(125)))
    assert sorted(s for s, _, _ in statuses).count(200) == 120
    started = time.monotonic()
    while (await chat(server))[0] != 200:
        assert time.monotonic() - started < 2.0, "no refill within 2 s"
        await asyncio.sleep(0.05)
    later = [await chat(server) for _ in range(5)]
    assert [s for s, _, _ in later].count(200) <= 1
