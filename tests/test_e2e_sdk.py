"""End to end with the official ``openai`` SDK as the client: what an app developer sees."""

from __future__ import annotations

from typing import TypeVar

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    DISABLED_TOKEN,
    UPSTREAM_KEY,
    USER_TOKEN,
    FakeUpstream,
    GatewayFactory,
    gateway_config,
    sdk_for,
)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


ErrorT = TypeVar("ErrorT", bound=openai.APIStatusError)


async def chat_error(
    server: TestServer, token: str, error: type[ErrorT], model: str = "gpt-test"
) -> ErrorT:
    """The exception the SDK raises for a chat completion that the gateway refuses."""
    client = sdk_for(server, token)
    try:
        with pytest.raises(error) as caught:
            await client.chat.completions.create(model=model, messages=MESSAGES)
    finally:
        await client.close()
    return caught.value


async def test_chat_completion_non_stream(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-test", messages=MESSAGES, temperature=0.5, max_tokens=20
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(CHAT_CONTENT)
    assert completion.usage is not None
    assert completion.usage.total_tokens == 15
    assert raw.headers["x-berry-provider"] == "up1"
    assert raw.headers["x-berry-backend-model"] == "up-model"
    assert raw.headers["x-berry-attempts"] == "1"
    assert float(raw.headers["x-berry-overhead-ms"]) >= 0
    assert raw.headers["x-request-id"]

    sent = upstream.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.body == {
        "model": "up-model",
        "messages": MESSAGES,
        "temperature": 0.5,
        "max_tokens": 20,
    }
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.headers["X-Provider-Extra"] == "up1"
    assert sent.headers["X-Request-ID"] == raw.headers["x-request-id"]


async def test_chat_completion_stream(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    stream = await sdk.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    texts = []
    finish = None
    async for chunk in stream:
        assert chunk.choices, "the usage-only chunk the gateway asked for must not leak"
        texts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(texts) == "".join(CHAT_CONTENT)
    assert finish == "stop"
    # The gateway always asks the upstream for usage, for its own accounting.
    assert upstream.requests[-1].body["stream_options"] == {"include_usage": True}


async def test_stream_usage_reaches_client_that_asked(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage is not None]
    assert len(usages) == 1
    assert usages[0].total_tokens == 15


async def test_models_list_and_retrieve(gateway: TestServer, sdk: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in sdk.models.list()]
    assert models == ["gpt-test", "other-model"]
    model = await sdk.models.retrieve("gpt-test")
    assert model.id == "gpt-test"
    assert model.owned_by == "berry-api"

    restricted = sdk_for(gateway, USER_TOKEN)
    try:
        assert [m.id async for m in restricted.models.list()] == ["gpt-test"]
        with pytest.raises(openai.NotFoundError):
            await restricted.models.retrieve("other-model")
    finally:
        await restricted.close()


async def test_embeddings(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    result = await sdk.embeddings.create(model="gpt-test", input="hello")
    assert result.data[0].embedding == [0.1, 0.2]
    assert upstream.requests[-1].path == "/v1/embeddings"


async def test_legacy_completions(sdk: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    await sdk.completions.create(model="gpt-test", prompt="Say hello", max_tokens=5)
    assert upstream.requests[-1].path == "/v1/completions"
    assert upstream.requests[-1].body["prompt"] == "Say hello"


async def test_missing_and_invalid_tokens_raise_authentication_error(
    gateway: TestServer,
) -> None:
    for token in ("not-a-known-token-at-all", DISABLED_TOKEN):
        error = await chat_error(gateway, token, openai.AuthenticationError)
        assert error.body == {
            "type": "authentication_error",
            "code": "invalid_token",
            "message": "The provided token is invalid",
            "param": None,
        }


async def test_model_not_allowed_raises_permission_denied(gateway: TestServer) -> None:
    error = await chat_error(gateway, USER_TOKEN, openai.PermissionDeniedError, "other-model")
    assert error.code == "model_not_allowed"
    assert isinstance(error.body, dict)
    assert error.body["details"] == {"model": "other-model", "allowed_models": ["gpt-test"]}


async def test_bad_requests_raise_bad_request(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "invalid_model"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=MESSAGES, temperature=3)
    assert caught.value.code == "invalid_parameter"
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=[])
    assert caught.value.param == "messages"


async def test_upstream_client_error_passes_through(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    upstream.status_code = 400
    upstream.error_body = (
        b'{"error": {"message": "This model\'s maximum context length is 8192 tokens",'
        b' "type": "invalid_request_error", "param": "messages",'
        b' "code": "context_length_exceeded"}}'
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.code == "context_length_exceeded"
    assert len(upstream.requests) == 1, "a caller error is never retried"


async def test_upstream_server_error_raises_internal_server_error(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    upstream.status_code = 503
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert isinstance(caught.value.body, dict)
    # The only backend is retried once: a 5xx is never retried on one backend twice.
    assert caught.value.body["details"] == {
        "attempts": 2,
        "last_error": "upstream returned HTTP 503",
    }
    assert len(upstream.requests) == 2


async def test_upstream_rate_limit_raises_rate_limit_error(
    sdk: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.mode = "status"
    upstream.status_code = 429
    upstream.extra_headers = {"Retry-After": "7"}
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert caught.value.code == "upstream_rate_limited"
    assert caught.value.response.headers["retry-after"] == "7"


async def test_upstream_timeout_raises_504(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["total_timeout_seconds"] = 0.2
    server = await start_gateway(raw)
    upstream.mode = "stall"
    error = await chat_error(server, USER_TOKEN, openai.APIStatusError)
    assert error.status_code == 504
    assert error.code == "upstream_timeout"


async def test_failover_to_second_backend(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    server = await start_gateway(gateway_config(upstream, upstream2))
    upstream.mode = "reset"
    upstream2.mode = "reset"
    client = sdk_for(server, USER_TOKEN)
    try:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        # With one backend healthy again, every request succeeds, whichever is drawn first.
        upstream2.mode = "ok"
        for _ in range(6):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=MESSAGES
            )
            assert raw.headers["x-berry-provider"] == "up2"
    finally:
        await client.close()


async def test_missing_token_raises_authentication_error(gateway: TestServer) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.port}/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"Authorization": ""},
    )
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    finally:
        await client.close()
    assert caught.value.code == "missing_token"


async def test_oversized_request_raises_413(sdk: openai.AsyncOpenAI) -> None:
    huge: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "x" * 70_000}  # the test config allows 64 KiB
    ]
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=huge)
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


async def test_model_without_usable_backends_raises_503_at_once(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["models"]["gpt-test"]["backends"][0]["enabled"] = False
    server = await start_gateway(raw)
    error = await chat_error(server, USER_TOKEN, openai.InternalServerError)
    assert error.status_code == 503
    assert error.code == "no_healthy_backends"
    assert error.response.headers["retry-after"] == "1"
    assert isinstance(error.body, dict)
    assert error.body["details"] == {
        "model": "gpt-test",
        "total_backends": 1,
        "healthy_backends": 0,
    }
    assert upstream.requests == []


async def test_status_views_need_an_admin_token_when_not_public(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["public_status"] = False
    server = await start_gateway(raw)
    url = f"http://127.0.0.1:{server.port}"
    user = {"Authorization": f"Bearer {USER_TOKEN}"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as resp:
            assert resp.status == 401
        async with session.get(url + "/health", headers=user) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "admin_required"
        async with session.get(url + "/health", headers=admin) as resp:
            assert resp.status == 200
        async with session.get(url + "/v1/health") as resp:
            assert resp.status == 200  # always public
