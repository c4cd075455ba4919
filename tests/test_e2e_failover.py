"""Failover end to end: a misbehaving upstream is invisible to an ``openai`` SDK client.

SPEC §2 "Failover": a request fails over to another backend of its model on connect errors,
timeouts, upstream 5xx, 429, 401/403 and a stream that fails before its first content
chunk, for streaming and non-streaming requests alike; caller errors (400/404/413/422) come
back as the upstream sent them, without retry. §5 "Attempts": ``X-Berry-Attempts`` counts
the attempts made, never the same backend twice while untried ones remain.

Each test puts one or two faulty upstreams next to a healthy one and drives the gateway
with ``openai.AsyncOpenAI(max_retries=0)``, so the SDK never retries by itself: every
success it sees is the gateway's doing. Assertions hold whichever backend a strategy picks
first: every request carries its own ``X-Request-ID``, which the gateway forwards upstream,
so each fake upstream tells how often THAT request reached it, and the attempts header must
equal one (the healthy backend) plus the faulty backends' share.

The faulty backends get the best priority (so ``failover`` tries them first) and 50 ms
timeouts (so a stall is cheap). A test sends requests one after another until every faulty
backend has been tried and either ``HANDFUL`` requests went through or one faulty backend
has failed ``cap`` times (4, below the circuit breaker's threshold of 5): these tests show
failover itself, whatever the breaker does. ``test_backend_failing_every_request`` goes
past the threshold.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import (
    CHAT_CONTENT,
    UPSTREAM_ERROR_EVENT,
    UPSTREAM_KEY,
    USER_TOKEN,
    FakeUpstream,
    GatewayFactory,
    Recorded,
    ServerFactory,
    base_url,
    chat_chunk,
    gateway_config,
)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]
CONTENT = "".join(CHAT_CONTENT)

# Every strategy must keep the failover guarantee; these five cover the kinds of choice
# (weighted draw, rotation, uniform, priority tiers, adaptive) and keep the file fast.
STRATEGIES = ("weighted_random", "round_robin", "random", "failover", "smart_ai")

# The faulty provider's first-byte and total timeouts: a stall costs this much per attempt.
BAD_TIMEOUT_SECONDS = 0.2  # roomy enough that a busy CI machine answers a 500 in time
# Requests a test sends at least (once every faulty backend has been tried) ...
HANDFUL = 6
# ... and it stops early once a faulty backend failed this often (breaker threshold is 5).
BAD_ATTEMPTS_CAP = 4
# Hard bound on requests per test: a faulty backend not yet tried after this many uniform
# draws is a routing bug, not bad luck (2**-40).
MAX_REQUESTS = 40
# The SDK's own timeout: a hung gateway fails the test instead of hanging it.
SDK_TIMEOUT_SECONDS = 10.0
# Loopback HTTP only; one TLS context for every SDK client instead of loading the CA
# bundle for each (20 ms a client, most of this file's run time otherwise).
TLS_CONTEXT = ssl.create_default_context()


class FaultyUpstream(FakeUpstream):
    """``FakeUpstream`` plus two stream faults before the first content chunk.

    ``eof_before_content``: the role-only chunk, then a clean end of the body (no content,
    no ``[DONE]``). ``error_before_content``: the role-only chunk, an error event, then
    ``[DONE]``. (The conftest's ``error_mid_stream`` sends content first, which is a
    failure after the commit point, not a failover case.)
    """

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if self.mode not in ("eof_before_content", "error_before_content"):
            return await super()._stream(request, body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(chat_chunk({"role": "assistant", "content": ""}))
        if self.mode == "error_before_content":
            await response.write(UPSTREAM_ERROR_EVENT)
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass(frozen=True)
class Fault:
    """How a faulty upstream misbehaves (a ``FakeUpstream`` mode and its parameters)."""

    mode: str
    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b'{"error": {"message": "boom", "type": "server_error"}}'
    break_after: int = 2
    # Failures of the faulty backend after which a test may stop sending.
    cap: int = BAD_ATTEMPTS_CAP

    def apply(self, fake: FakeUpstream) -> None:
        fake.mode = self.mode
        fake.status_code = self.status
        fake.extra_headers = dict(self.headers)
        fake.error_body = self.body
        fake.break_after = self.break_after


BAD_KEY_BODY = (
    b'{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",'
    b' "param": null, "code": "invalid_api_key"}}'
)

# Faults for streaming and non-streaming requests alike. For a stream, ``not_json`` is a
# 200 that is not an event stream.
FAULTS: dict[str, Fault] = {
    "http_500": Fault("status", 500),
    "reset": Fault("reset"),
    "stall": Fault("stall", cap=2),  # each stalled attempt costs BAD_TIMEOUT_SECONDS
    "http_429_retry_after": Fault(
        "status",
        429,
        headers={"Retry-After": "5"},
        body=b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
    ),
    "http_401": Fault("status", 401, body=BAD_KEY_BODY),
    "http_403": Fault("status", 403, body=BAD_KEY_BODY),
    "not_json": Fault("not_json"),
}
# Faults only a stream has: it fails before its first content chunk.
STREAM_FAULTS: dict[str, Fault] = {
    # The role-only chunk, then the connection drops.
    "drop_before_content": Fault("break_after", break_after=0),
    "eof_before_content": Fault("eof_before_content"),
    "error_before_content": Fault("error_before_content"),
}
FAULT_CASES = [
    *(pytest.param(fault, False, id=f"{name}-unary") for name, fault in FAULTS.items()),
    *(pytest.param(fault, True, id=f"{name}-stream") for name, fault in FAULTS.items()),
    *(pytest.param(fault, True, id=f"{name}-stream") for name, fault in STREAM_FAULTS.items()),
]
STREAM_MODES = [pytest.param(False, id="unary"), pytest.param(True, id="stream")]

UpstreamFactory = Callable[[int], Awaitable[list[FaultyUpstream]]]


@pytest.fixture
def make_upstreams(aiohttp_server: ServerFactory) -> UpstreamFactory:
    """Start ``count`` fake upstreams; gateway_config names them up1, up2, ..."""

    async def make(count: int) -> list[FaultyUpstream]:
        fakes = [FaultyUpstream() for _ in range(count)]
        for fake in fakes:
            fake.server = await aiohttp_server(fake.app())
        return fakes

    return make


def failover_config(
    fakes: Sequence[FakeUpstream], strategy: str, bad: Sequence[int], **settings: Any
) -> dict[str, Any]:
    """``gateway_config`` for ``fakes`` routed by ``strategy``; indexes in ``bad`` misbehave.

    Faulty backends get the preferred priority (0, the healthy ones 1) and small timeouts.
    """
    raw = gateway_config(*fakes, **settings)
    model = raw["models"]["gpt-test"]
    model["strategy"] = strategy
    for index, backend in enumerate(model["backends"]):
        backend["priority"] = 0 if index in bad else 1
    for index in bad:
        provider = raw["providers"][f"up{index + 1}"]
        provider["first_byte_timeout_seconds"] = BAD_TIMEOUT_SECONDS
        provider["total_timeout_seconds"] = BAD_TIMEOUT_SECONDS
    return raw


def client_for(server: TestServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url(server) + "/v1",
        api_key=USER_TOKEN,
        max_retries=0,
        timeout=SDK_TIMEOUT_SECONDS,
        http_client=openai.DefaultAsyncHttpxClient(verify=TLS_CONTEXT),
    )


def request_id_of(recorded: Recorded) -> str | None:
    for name, value in recorded.headers.items():
        if name.lower() == "x-request-id":
            return value
    return None


def tries(fake: FakeUpstream, request_id: str) -> int:
    """How many times the request ``request_id`` reached ``fake``."""
    return sum(1 for recorded in fake.requests if request_id_of(recorded) == request_id)


@dataclass
class Served:
    request_id: str
    provider: str
    attempts: int
    text: str
    finish: str | None


async def chat(client: openai.AsyncOpenAI, *, stream: bool) -> Served:
    """One chat completion that must succeed; the answer as the SDK assembled it."""
    request_id = uuid.uuid4().hex
    extra = {"X-Request-ID": request_id}
    finish: str | None = None
    if stream:
        raw_stream = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, stream=True, extra_headers=extra
        )
        headers = raw_stream.headers
        texts: list[str] = []
        async for chunk in raw_stream.parse():
            assert chunk.choices, "the usage-only chunk the gateway asked for must not leak"
            texts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        text = "".join(texts)
    else:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, extra_headers=extra
        )
        headers = raw.headers
        completion = raw.parse()
        text = completion.choices[0].message.content or ""
        finish = completion.choices[0].finish_reason
    assert headers["x-request-id"] == request_id
    return Served(
        request_id=request_id,
        provider=headers["x-berry-provider"],
        attempts=int(headers["x-berry-attempts"]),
        text=text,
        finish=finish,
    )


async def assert_failover_is_invisible(
    server: TestServer,
    fakes: Sequence[FakeUpstream],
    bad: Sequence[int],
    *,
    stream: bool,
    cap: int = BAD_ATTEMPTS_CAP,
) -> None:
    """Every request succeeds on a healthy upstream, whichever backend was tried first.

    Sends requests until each faulty upstream has been tried and ``HANDFUL`` requests went
    through (or one faulty upstream failed ``cap`` times), at most ``MAX_REQUESTS``.
    """
    bad_fakes = [fakes[i] for i in bad]
    healthy = {f"up{i + 1}": fake for i, fake in enumerate(fakes) if i not in bad}
    client = client_for(server)
    try:
        for sent in range(1, MAX_REQUESTS + 1):
            served = await chat(client, stream=stream)
            assert served.provider in healthy, f"request {sent} served by {served.provider}"
            assert served.text == CONTENT
            assert served.finish == "stop"
            for pid, fake in healthy.items():
                assert tries(fake, served.request_id) == (1 if pid == served.provider else 0)
            bad_tries = [tries(fake, served.request_id) for fake in bad_fakes]
            # Never the same backend twice while another (the healthy one) remains.
            assert all(n <= 1 for n in bad_tries), bad_tries
            assert served.attempts == 1 + sum(bad_tries), (served.attempts, bad_tries)

            all_tried = all(fake.requests for fake in bad_fakes)
            most_failures = max(len(fake.requests) for fake in bad_fakes)
            if all_tried and (sent >= HANDFUL or most_failures >= cap):
                break
    finally:
        await client.close()
    # Otherwise the test showed nothing: no request ever met the fault.
    assert all(fake.requests for fake in bad_fakes), "a faulty upstream was never tried"


# --------------------------------------------------------------------------------------
# One faulty upstream among two
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("fault", "stream"), FAULT_CASES)
async def test_one_faulty_upstream_is_invisible(
    start_gateway: GatewayFactory,
    make_upstreams: UpstreamFactory,
    strategy: str,
    fault: Fault,
    stream: bool,
) -> None:
    fakes = await make_upstreams(2)
    server = await start_gateway(failover_config(fakes, strategy, bad=[0]))
    fault.apply(fakes[0])
    await assert_failover_is_invisible(server, fakes, bad=[0], stream=stream, cap=fault.cap)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_two_faulty_upstreams_of_three(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, strategy: str, stream: bool
) -> None:
    fakes = await make_upstreams(3)
    # Two attempts fail, the third (within the default max_retries of 3) succeeds.
    server = await start_gateway(failover_config(fakes, strategy, bad=[0, 1]))
    FAULTS["http_500"].apply(fakes[0])
    (STREAM_FAULTS["drop_before_content"] if stream else FAULTS["reset"]).apply(fakes[1])
    await assert_failover_is_invisible(server, fakes, bad=[0, 1], stream=stream)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_backend_failing_every_request(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, strategy: str, stream: bool
) -> None:
    """Past the breaker's threshold the client still never sees the faulty backend.

    SPEC §3: the breaker opens after ``circuit_breaker_failure_threshold`` consecutive
    failures; no probe or half-open trial can close it within this test, so the faulty
    backend gets at most that many requests.
    """
    fakes = await make_upstreams(2)
    raw = failover_config(
        fakes,
        strategy,
        bad=[0],
        circuit_breaker_failure_threshold=5,
        circuit_breaker_timeout_seconds=3600,
        health_check_interval_seconds=3600,
        recovery_check_interval_seconds=3600,
    )
    server = await start_gateway(raw)
    FAULTS["http_500"].apply(fakes[0])
    client = client_for(server)
    try:
        for _ in range(12):
            served = await chat(client, stream=stream)
            assert (served.provider, served.text) == ("up2", CONTENT)
            assert served.attempts == 1 + tries(fakes[0], served.request_id)
    finally:
        await client.close()
    assert len(fakes[0].requests) <= 5
    assert len(fakes[1].requests) == 12


# --------------------------------------------------------------------------------------
# Caller errors: passed through, never retried
# --------------------------------------------------------------------------------------

CALLER_ERRORS: dict[int, tuple[type[openai.APIStatusError], dict[str, Any]]] = {
    400: (
        openai.BadRequestError,
        {
            "message": "This model's maximum context length is 8192 tokens",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
    ),
    404: (
        openai.NotFoundError,
        {
            "message": "The model `up-model` does not exist",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        },
    ),
    413: (
        openai.APIStatusError,
        {
            "message": "Request too large",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        },
    ),
    422: (
        openai.UnprocessableEntityError,
        {
            "message": "Unprocessable entity",
            "type": "invalid_request_error",
            "param": "tools",
            "code": None,
        },
    ),
}


async def caller_error(
    client: openai.AsyncOpenAI, error: type[openai.APIStatusError], *, stream: bool
) -> tuple[str, openai.APIStatusError]:
    """The request id and the exception the SDK raised for it."""
    request_id = uuid.uuid4().hex
    extra = {"X-Request-ID": request_id}
    with pytest.raises(error) as caught:
        await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=stream, extra_headers=extra
        )
    assert type(caught.value) is error
    return request_id, caught.value


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_caller_errors_pass_through_without_retry(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, strategy: str, stream: bool
) -> None:
    fakes = await make_upstreams(2)
    server = await start_gateway(failover_config(fakes, strategy, bad=[]))
    client = client_for(server)
    try:
        for status, (error, inner) in CALLER_ERRORS.items():
            for fake in fakes:  # both answer it: whichever is chosen first, no retry
                Fault("status", status, body=orjson.dumps({"error": inner})).apply(fake)
            request_id, exc = await caller_error(client, error, stream=stream)
            assert exc.status_code == status
            assert exc.body == inner, "the upstream's body, as it sent it"
            assert exc.code == inner["code"]
            reached = [tries(fake, request_id) for fake in fakes]
            assert sorted(reached) == [0, 1], f"HTTP {status} was retried: {reached}"
            assert exc.response.headers["x-berry-attempts"] == "1"
            assert exc.response.headers["x-berry-provider"] == f"up{reached.index(1) + 1}"
    finally:
        await client.close()


@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_caller_errors_never_penalise_the_only_backend(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, stream: bool
) -> None:
    """More caller errors than the breaker threshold, and the backend still serves."""
    (fake,) = await make_upstreams(1)
    raw = failover_config([fake], "smart_ai", bad=[], circuit_breaker_failure_threshold=5)
    server = await start_gateway(raw)
    error, inner = CALLER_ERRORS[400]
    Fault("status", 400, body=orjson.dumps({"error": inner})).apply(fake)
    client = client_for(server)
    try:
        for _ in range(6):
            request_id, exc = await caller_error(client, error, stream=stream)
            assert exc.body == inner
            assert tries(fake, request_id) == 1
        fake.mode = "ok"
        served = await chat(client, stream=stream)
        assert (served.provider, served.attempts, served.text) == ("up1", 1, CONTENT)
    finally:
        await client.close()


# --------------------------------------------------------------------------------------
# Every backend fails: the gateway's own error
# --------------------------------------------------------------------------------------


async def gateway_error(
    server: TestServer, error: type[openai.APIStatusError], *, stream: bool
) -> tuple[str, openai.APIStatusError]:
    client = client_for(server)
    try:
        return await caller_error(client, error, stream=stream)
    finally:
        await client.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_all_backends_failing_gives_502(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, strategy: str, stream: bool
) -> None:
    fakes = await make_upstreams(2)
    server = await start_gateway(failover_config(fakes, strategy, bad=[0, 1]))
    FAULTS["http_500"].apply(fakes[0])
    FAULTS["reset"].apply(fakes[1])
    request_id, exc = await gateway_error(server, openai.InternalServerError, stream=stream)
    assert exc.status_code == 502
    assert exc.code == "upstream_error"
    assert isinstance(exc.body, dict)
    assert exc.body["type"] == "service_error"
    details = exc.body["details"]
    reached = [tries(fake, request_id) for fake in fakes]
    # Both backends tried; a third attempt (default max_retries 3) may retry one of them.
    assert min(reached) >= 1
    assert details["attempts"] == sum(reached) <= 3
    assert isinstance(details["last_error"], str)
    text = exc.response.text
    assert UPSTREAM_KEY not in text
    assert all(fake.url not in text for fake in fakes)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_all_backends_rate_limited_gives_429_with_retry_after(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, strategy: str, stream: bool
) -> None:
    fakes = await make_upstreams(2)
    # Two attempts: each backend once (no same-backend retry waiting on Retry-After).
    server = await start_gateway(failover_config(fakes, strategy, bad=[0, 1], max_retries=2))
    for fake, wait in zip(fakes, ("7", "3"), strict=True):
        Fault("status", 429, headers={"Retry-After": wait}).apply(fake)
    request_id, exc = await gateway_error(server, openai.RateLimitError, stream=stream)
    assert exc.status_code == 429
    assert exc.code == "upstream_rate_limited"
    assert exc.response.headers["retry-after"] == "3", "the smallest upstream Retry-After"
    assert [tries(fake, request_id) for fake in fakes] == [1, 1]


@pytest.mark.parametrize("stream", STREAM_MODES)
async def test_all_backends_stalling_gives_504(
    start_gateway: GatewayFactory, make_upstreams: UpstreamFactory, stream: bool
) -> None:
    fakes = await make_upstreams(2)
    server = await start_gateway(failover_config(fakes, "smart_ai", bad=[0, 1], max_retries=2))
    for fake in fakes:
        FAULTS["stall"].apply(fake)
    request_id, exc = await gateway_error(server, openai.InternalServerError, stream=stream)
    assert exc.status_code == 504
    assert exc.code == "upstream_timeout"
    assert [tries(fake, request_id) for fake in fakes] == [1, 1]
