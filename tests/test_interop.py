"""The clients people really use: browsers (CORS), SDKs configured without ``/v1``, Azure
OpenAI SDKs (``api-key``, deployment paths), HTTP/1.0 clients, and a LiteLLM-style upstream
whose usage rides on a chunk that still has a choice."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy.config import ConfigError, build_config
from berry_proxy.cors import EXPOSED, PREFLIGHT_MAX_AGE

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    UPSTREAM_KEY,
    USER_TOKEN,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    chat_chunk,
    gateway_config,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
ORIGIN = "http://127.0.0.1:5173"


async def call(
    server: TestServer,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: Any = None,
) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            base_url(server) + path,
            headers=headers or {},
            data=None if body is None else orjson.dumps(body),
        ) as response,
    ):
        return response.status, response.headers, await response.read()


# --------------------------------------------------------------------------------------
# 1. CORS
# --------------------------------------------------------------------------------------


PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/v1/models"]
)
async def test_a_preflight_is_answered_without_a_token_and_never_sent_upstream(
    gateway: TestServer, upstream: FakeUpstream, path: str
) -> None:
    status, headers, body = await call(gateway, "OPTIONS", path, PREFLIGHT)
    assert (status, body) == (204, b"")
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"] or path == "/v1/models"
    allowed = [h.strip().lower() for h in headers["Access-Control-Allow-Headers"].split(",")]
    for name in ("authorization", "content-type", "x-request-id", "api-key", "x-stainless-os"):
        assert name in allowed
    assert headers["Access-Control-Max-Age"] == str(PREFLIGHT_MAX_AGE)
    assert headers["X-Request-ID"]
    assert upstream.requests == []


async def test_a_preflight_to_a_path_the_gateway_does_not_serve_is_a_404(
    gateway: TestServer,
) -> None:
    status, headers, body = await call(gateway, "OPTIONS", "/v2/nothing", PREFLIGHT)
    assert status == 404
    assert orjson.loads(body)["error"]["code"] == "not_found"
    assert headers["Access-Control-Allow-Origin"] == "*"


async def test_a_preflight_lists_only_sane_requested_headers(gateway: TestServer) -> None:
    odd = {**PREFLIGHT, "Access-Control-Request-Headers": "x-ok, bad;header"}
    _, headers, _ = await call(gateway, "OPTIONS", "/v1/chat/completions", odd)
    assert "x-ok" not in headers["Access-Control-Allow-Headers"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]


@pytest.mark.parametrize(
    ("method", "path", "token", "body", "status"),
    [
        ("POST", "/v1/chat/completions", ADMIN_TOKEN, CHAT, 200),
        ("POST", "/v1/chat/completions", None, CHAT, 401),
        ("POST", "/v1/chat/completions", ADMIN_TOKEN, {"model": "nope", "messages": [1]}, 400),
        ("POST", "/v1/chat/completions", USER_TOKEN, {**CHAT, "model": "other-model"}, 403),
        ("GET", "/v1/models", ADMIN_TOKEN, None, 200),
        ("GET", "/nowhere", None, None, 404),
        ("DELETE", "/v1/models", ADMIN_TOKEN, None, 405),
    ],
)
async def test_every_answer_carries_the_cors_headers_errors_included(
    gateway: TestServer,
    method: str,
    path: str,
    token: str | None,
    body: Any,
    status: int,
) -> None:
    headers = {"Origin": ORIGIN}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    got, answer, _ = await call(gateway, method, path, headers, body)
    assert got == status
    assert answer["Access-Control-Allow-Origin"] == "*"
    assert answer["Access-Control-Expose-Headers"] == EXPOSED


@pytest.mark.parametrize("path", ["/health", "/v1/health", "/smart-ai/weights"])
async def test_views_without_a_token_are_readable_by_listed_origins_only(
    start_gateway: GatewayFactory, upstream: FakeUpstream, path: str
) -> None:
    """With ``"*"`` any page a colleague opens could read an intranet gateway's public
    health and weights; only origins the operator listed may."""
    anyone = await start_gateway(gateway_config(upstream))
    status, answer, _ = await call(anyone, "GET", path, {"Origin": ORIGIN})
    assert status == 200
    assert "Access-Control-Allow-Origin" not in answer
    raw = gateway_config(upstream)
    raw["server"]["cors_allow_origins"] = [ORIGIN]
    listed = await start_gateway(raw)
    status, answer, _ = await call(listed, "GET", path, {"Origin": ORIGIN})
    assert (status, answer["Access-Control-Allow-Origin"]) == (200, ORIGIN)


async def test_a_request_without_origin_pays_nothing_for_cors(gateway: TestServer) -> None:
    """No browser script sends a request without ``Origin``: an SDK's answer stays lean."""
    _, answer, _ = await call(gateway, "POST", "/v1/chat/completions", AUTH, CHAT)
    assert not [name for name in answer if name.lower().startswith("access-control-")]


async def test_what_a_browser_says_about_the_page_never_reaches_the_provider(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    """A provider that checks ``Origin`` (Ollama answers 403 to unknown ones) must see a
    server-side client, or a browser app's traffic would count against its breaker."""
    browser = {
        **AUTH,
        "Origin": ORIGIN,
        "Referer": ORIGIN + "/chat?draft=secret",
        "Sec-Fetch-Mode": "cors",
        "Sec-Fetch-Site": "same-site",
        "Sec-Ch-Ua": '"Chromium";v="156"',
        "Sec-Ch-Ua-Platform": '"Linux"',
        "Access-Control-Request-Method": "POST",
    }
    status, _, _ = await call(gateway, "POST", "/v1/chat/completions", browser, CHAT)
    assert status == 200
    (recorded,) = upstream.requests
    sent = {name.lower() for name in recorded.headers}
    for name in browser:
        if name != "Authorization":
            assert name.lower() not in sent, name
    assert "draft=secret" not in str(recorded.headers)


async def test_a_stream_carries_the_cors_headers(gateway: TestServer) -> None:
    headers = {"Origin": ORIGIN, **AUTH}
    status, answer, body = await call(
        gateway, "POST", "/v1/chat/completions", headers, {**CHAT, "stream": True}
    )
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")
    assert answer["Access-Control-Allow-Origin"] == "*"
    exposed = answer["Access-Control-Expose-Headers"]
    for name in (
        "X-Request-ID",
        "X-Berry-Provider",
        "X-Berry-Attempts",
        "x-ratelimit-reset-requests",
    ):
        assert name in exposed


async def test_listed_origins_are_echoed_with_vary_and_others_get_nothing(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["cors_allow_origins"] = [ORIGIN, "https://app.example.com"]
    server = await start_gateway(raw)
    _, allowed, _ = await call(server, "GET", "/v1/models", {"Origin": ORIGIN, **AUTH})
    assert allowed["Access-Control-Allow-Origin"] == ORIGIN
    assert allowed["Vary"] == "Origin"
    _, other, _ = await call(server, "GET", "/v1/models", {"Origin": "http://evil.test", **AUTH})
    assert "Access-Control-Allow-Origin" not in other
    assert other["Vary"] == "Origin"
    status, preflight, _ = await call(
        server, "OPTIONS", "/v1/chat/completions", {**PREFLIGHT, "Origin": "http://evil.test"}
    )
    assert status == 204
    assert "Access-Control-Allow-Origin" not in preflight
    assert "Access-Control-Allow-Methods" not in preflight


async def test_an_empty_origin_list_turns_cors_off(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["cors_allow_origins"] = []
    server = await start_gateway(raw)
    status, headers, body = await call(server, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
    assert status == 405
    assert orjson.loads(body)["error"]["code"] == "method_not_allowed"
    _, answer, _ = await call(server, "GET", "/v1/models", {"Origin": ORIGIN, **AUTH})
    assert "Access-Control-Allow-Origin" not in answer
    assert "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize(
    ("listed", "sent"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("HTTP://localhost:80", "http://localhost"),
        ("http://[::1]:5173", "http://[::1]:5173"),
    ],
)
async def test_listed_origins_match_as_browsers_spell_them(
    start_gateway: GatewayFactory, upstream: FakeUpstream, listed: str, sent: str
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["cors_allow_origins"] = [listed]
    server = await start_gateway(raw)
    _, answer, _ = await call(server, "GET", "/v1/models", {"Origin": sent, **AUTH})
    assert answer["Access-Control-Allow-Origin"] == sent
    status, preflight, _ = await call(
        server, "OPTIONS", "/v1/chat/completions", {**PREFLIGHT, "Origin": sent}
    )
    assert (status, preflight["Access-Control-Allow-Origin"]) == (204, sent)
    assert preflight["Vary"] == "Origin, Access-Control-Request-Headers"
    assert "x-stainless-os" in preflight["Access-Control-Allow-Headers"]


@pytest.mark.parametrize(
    "origin",
    ["http://x.test/", "http://x.test/app", "x.test", "ftp://x.test", "*.x.test", "", "http://u@x"],
)
def test_an_origin_that_is_not_one_is_a_config_error(origin: str) -> None:
    raw = {
        "server": {"cors_allow_origins": [origin]},
        "providers": {"mock": {"type": "mock"}},
        "models": {"m": {"backends": [{"provider": "mock", "model": "m"}]}},
    }
    with pytest.raises(ConfigError) as caught:
        build_config(raw, env={})
    assert "server.cors_allow_origins" in str(caught.value)


# --------------------------------------------------------------------------------------
# 2. Path aliases: SDKs configured without /v1
# --------------------------------------------------------------------------------------


async def chat_stream_and_embed(client: openai.AsyncOpenAI) -> None:
    """A chat, a streamed chat and an embedding through ``client``, each answered right."""
    chat = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].message.content == "".join(CHAT_CONTENT)
    stream = await client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p for p in pieces if p) == "".join(CHAT_CONTENT)
    vectors = await client.embeddings.create(model="gpt-test", input="hi")
    assert len(vectors.data) == 1


async def test_the_sdk_with_a_base_url_without_v1_works_for_chat_and_embeddings(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(gateway), api_key=ADMIN_TOKEN, max_retries=0)
    try:
        await chat_stream_and_embed(client)
        completion = await client.completions.create(model="gpt-test", prompt="hi")
        assert completion.choices
    finally:
        await client.close()
    assert [r.path for r in upstream.requests] == [
        "/v1/chat/completions",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
    ]


async def test_models_without_v1_keeps_the_original_overview(gateway: TestServer) -> None:
    """``GET /models`` is the original's overview (strategy, backends), not OpenAI's list:
    an SDK without /v1 lists models at /v1/models instead (README, "Clients")."""
    status, _, body = await call(gateway, "GET", "/models", AUTH)
    assert status == 200
    assert "gpt-test" in [model["name"] for model in orjson.loads(body)["models"]]


# --------------------------------------------------------------------------------------
# 3. Azure OpenAI SDKs: api-key, deployment paths
# --------------------------------------------------------------------------------------


async def test_the_azure_sdk_pointed_at_the_gateway_works_and_its_key_stays_here(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=base_url(gateway),
        api_key=ADMIN_TOKEN,
        api_version="2024-10-21",
        max_retries=0,
    )
    try:
        await chat_stream_and_embed(client)
        models = await client.models.list()
        assert "gpt-test" in [m.id async for m in models]
    finally:
        await client.close()
    assert len(upstream.requests) == 3
    for recorded in upstream.requests:
        names = {name.lower() for name in recorded.headers}
        assert "api-key" not in names
        assert recorded.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert ADMIN_TOKEN not in str(recorded.headers)
        assert "api-version" not in recorded.path


async def test_the_deployment_in_the_path_names_the_model(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    """As on Azure: the body need not name a model, and the path's wins if it does."""
    path = "/openai/deployments/gpt-test/chat/completions?api-version=2024-10-21"
    headers = {"api-key": USER_TOKEN}
    status, _, _ = await call(gateway, "POST", path, headers, {"messages": CHAT["messages"]})
    assert status == 200
    status, _, _ = await call(gateway, "POST", path, headers, {**CHAT, "model": "other-model"})
    assert status == 200  # the restricted user may use gpt-test, not other-model
    assert [r.body["model"] for r in upstream.requests] == ["up-model", "up-model"]
    forbidden = "/openai/deployments/other-model/chat/completions"
    status, _, body = await call(gateway, "POST", forbidden, headers, CHAT)
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == "model_not_allowed"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"api-key": "not-a-real-token-at-all"}, "invalid_token"),
        ({"api-key": " "}, "missing_token"),
        # Authorization wins over api-key when both are sent.
        (
            {"Authorization": "Bearer not-a-real-token-at-all", "api-key": ADMIN_TOKEN},
            "invalid_token",
        ),
    ],
)
async def test_a_bad_api_key_is_a_401(
    gateway: TestServer, headers: dict[str, str], code: str
) -> None:
    status, _, body = await call(gateway, "POST", "/v1/chat/completions", headers, CHAT)
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == code


# --------------------------------------------------------------------------------------
# 4. HTTP/1.0 streams
# --------------------------------------------------------------------------------------


async def _exchange(port: int | None, request: bytes, within: float = 5.0) -> bytes:
    """Send ``request`` and read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(within):
            return await reader.read(-1)
    finally:
        writer.close()


def _post(version: bytes, body: bytes, *extra: bytes) -> bytes:
    head = [
        b"POST /v1/chat/completions HTTP/" + version,
        b"Host: 127.0.0.1",
        b"Authorization: Bearer " + ADMIN_TOKEN.encode(),
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def test_an_http_1_0_keep_alive_client_sees_its_stream_end_with_the_close(
    gateway: TestServer,
) -> None:
    body = orjson.dumps({**CHAT, "stream": True})
    answer = await _exchange(gateway.port, _post(b"1.0", body, b"Connection: keep-alive"))
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
    lowered = head.lower()
    assert b"transfer-encoding" not in lowered
    assert b"connection: keep-alive" not in lowered
    assert rest.endswith(b"data: [DONE]\n\n")  # and then the connection closed


async def test_an_http_1_1_client_keeps_its_connection_after_a_stream(
    gateway: TestServer,
) -> None:
    body = orjson.dumps({**CHAT, "stream": True})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        for _ in range(2):  # the same connection, twice
            writer.write(_post(b"1.1", body))
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert b"transfer-encoding: chunked" in head.lower()
                data = await reader.readuntil(b"0\r\n\r\n")
            assert b"data: [DONE]" in data
    finally:
        writer.close()


# --------------------------------------------------------------------------------------
# 6. Usage the client did not ask for, from a LiteLLM-style upstream
# --------------------------------------------------------------------------------------


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, "cost": 0.00042}


def final_chunk(finish: str | None) -> bytes:
    """A chunk with one empty choice and ``usage`` (LiteLLM's own cost in it)."""
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up-model",
        "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
        "usage": USAGE,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def litellm_events() -> list[bytes]:
    """LiteLLM's stream: content, the finish, then usage on a chunk with an empty choice
    (and its ``cost``). Here the finish chunk carries usage as well, as some servers do."""
    return [
        chat_chunk({"role": "assistant", "content": ""}),
        *(chat_chunk({"content": piece}) for piece in CHAT_CONTENT),
        final_chunk("stop"),
        final_chunk(None),
        b"data: [DONE]\n\n",
    ]


async def litellm_upstream(aiohttp_server: ServerFactory) -> TestServer:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream_options"]["include_usage"] is True  # the gateway asked
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in litellm_events():
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return await aiohttp_server(app)


async def test_usage_the_client_did_not_ask_for_never_reaches_it_through_the_sdk(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    upstream = await litellm_upstream(aiohttp_server)
    server = await start_gateway(gateway_config(FakeUpstream(server=upstream)))
    client = openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key=ADMIN_TOKEN)
    try:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    # The role chunk, one per piece, the finish: no extra chunk, and no usage anywhere.
    assert len(chunks) == 1 + len(CHAT_CONTENT) + 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


async def test_usage_is_removed_from_the_chunk_with_choices_and_the_rest_is_byte_for_byte(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    upstream = await litellm_upstream(aiohttp_server)
    server = await start_gateway(gateway_config(FakeUpstream(server=upstream)))
    status, _, body = await call(
        server, "POST", "/v1/chat/completions", AUTH, {**CHAT, "stream": True}
    )
    assert status == 200
    sent = litellm_events()
    finish = orjson.loads(sent[-3][6:])
    del finish["usage"]
    expected = [*sent[:-3], b"data: " + orjson.dumps(finish) + b"\n\n", sent[-1]]
    assert body == b"".join(expected)


async def test_usage_the_client_asked_for_reaches_it_as_the_upstream_sent_it(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    upstream = await litellm_upstream(aiohttp_server)
    server = await start_gateway(gateway_config(FakeUpstream(server=upstream)))
    asked = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, _, body = await call(server, "POST", "/v1/chat/completions", AUTH, asked)
    assert status == 200
    assert body == b"".join(litellm_events())
