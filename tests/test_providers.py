"""Provider adapters against real HTTP servers: URL layout, credentials, connection use."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    chat_completion,
    gateway_config,
    sdk_for,
)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]


async def test_azure_deployment_url_api_version_and_key(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    seen: list[dict[str, Any]] = []

    async def deployment(request: web.Request) -> web.Response:
        seen.append(
            {
                "deployment": request.match_info["deployment"],
                "query": dict(request.query),
                "api_key": request.headers.get("api-key"),
                "authorization": request.headers.get("Authorization"),
                "body": await request.json(),
            }
        )
        return web.json_response(chat_completion("gpt-4o-2024"))

    app = web.Application()
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", deployment)
    azure = await aiohttp_server(app)
    server = await start_gateway(
        {
            "providers": {
                "azure-eu": {
                    "type": "azure",
                    "base_url": f"http://127.0.0.1:{azure.port}",
                    "api_key": "azure-secret-key",
                    "api_version": "2024-10-21",
                }
            },
            "models": {"gpt-4o": {"backends": [{"provider": "azure-eu", "model": "prod-4o"}]}},
            "users": {"admin": {"token": ADMIN_TOKEN}},
        }
    )
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    finally:
        await client.close()
    assert completion.choices[0].message.content == "".join(CHAT_CONTENT)
    assert seen == [
        {
            "deployment": "prod-4o",
            "query": {"api-version": "2024-10-21"},
            "api_key": "azure-secret-key",
            "authorization": None,
            "body": {"model": "prod-4o", "messages": MESSAGES},
        }
    ]


async def test_base_url_with_or_without_v1(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    for url in (upstream.url, upstream.url + "/v1", upstream.url + "/v1/"):
        raw = gateway_config(upstream)
        raw["providers"]["up1"]["base_url"] = url
        server = await start_gateway(raw)
        client = sdk_for(server, ADMIN_TOKEN)
        try:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        finally:
            await client.close()
        assert upstream.requests[-1].path == "/v1/chat/completions", url


async def test_client_disconnect_cancels_a_non_streaming_upstream_request(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "stall"
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(
            session.post(
                base_url(gateway) + "/v1/chat/completions",
                json={"model": "gpt-test", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
        )
        await asyncio.wait_for(upstream.received.wait(), 5)
        request.cancel()  # the client gives up and closes its connection
        await asyncio.wait_for(upstream.disconnected.wait(), 5)


async def test_upstream_connections_are_reused(gateway: TestServer, upstream: FakeUpstream) -> None:
    client = sdk_for(gateway, ADMIN_TOKEN)
    try:
        for _ in range(5):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    finally:
        await client.close()
    peers = {r.peer for r in upstream.requests}
    assert len(upstream.requests) == 5
    assert len(peers) == 1
