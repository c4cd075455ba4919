"""Byte-level pass-through checks with raw aiohttp: exactly what goes over the wire."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from berry_proxy.app import create_app
from berry_proxy.config import build_config

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    AppServer,
    FakeUpstream,
    GatewayFactory,
    base_url,
    gateway_config,
    stream_events,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "Say hello"}]}


async def post(
    server: TestServer,
    body: object,
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url(server) + path, json=body, headers=headers or AUTH) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def test_stream_bytes_are_copied_exactly(gateway: TestServer) -> None:
    status, headers, body = await post(
        gateway, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert body == b"".join(stream_events(include_usage=True))


async def test_stream_drops_only_the_usage_chunk_the_gateway_asked_for(
    gateway: TestServer,
) -> None:
    _, _, body = await post(gateway, {**CHAT, "stream": True})
    assert body == b"".join(stream_events(include_usage=False))
    assert body.endswith(b"data: [DONE]\n\n")


async def test_first_chunk_reaches_client_before_upstream_sends_the_second(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "gated"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(gateway) + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=AUTH,
        ) as resp,
    ):
        role = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        assert b'"role":"assistant"' in role
        assert b'"content":"Hello"' in first
        assert not upstream.gate.is_set(), "the upstream has not sent its second chunk yet"
        upstream.gate.set()
        rest = await asyncio.wait_for(resp.read(), 5)
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_client_disconnect_closes_the_upstream_at_once(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "gated"
    session = aiohttp.ClientSession()
    try:
        resp = await session.post(
            base_url(gateway) + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=AUTH,
        )
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
        resp.close()  # the client goes away mid-stream
        await asyncio.wait_for(upstream.disconnected.wait(), 5)
    finally:
        await session.close()
    assert not upstream.gate.is_set()


async def test_stream_broken_after_commit_ends_with_one_error_event(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "break_after"
    upstream.break_after = 2
    status, _, body = await post(gateway, {**CHAT, "stream": True})
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert events[:3] == [e.rstrip(b"\n") for e in stream_events(include_usage=False)[:3]]
    assert b"[DONE]" not in body
    error = orjson.loads(events[-1].removeprefix(b"data: "))
    assert error["error"]["code"] == "upstream_error"
    assert sum(1 for e in events if b'"error"' in e) == 1


async def test_stream_fails_over_invisibly_before_the_first_content(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    raw = gateway_config(upstream, upstream2)
    raw["models"]["gpt-test"]["backends"][0]["weight"] = 1e6  # up1 is tried first
    raw["models"]["gpt-test"]["backends"][1]["weight"] = 1e-6
    server = await start_gateway(raw)
    for mode in ("reset", "status", "not_json"):
        upstream.mode = mode
        status, headers, body = await post(server, {**CHAT, "stream": True})
        assert status == 200, mode
        assert headers["X-Berry-Provider"] == "up2"
        assert headers["X-Berry-Attempts"] == "2"
        assert body == b"".join(stream_events(include_usage=False))


async def test_stream_first_byte_timeout_fails_over(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    raw = gateway_config(upstream, upstream2)
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 0.2
    raw["models"]["gpt-test"]["backends"][0]["weight"] = 1e6
    raw["models"]["gpt-test"]["backends"][1]["weight"] = 1e-6
    server = await start_gateway(raw)
    upstream.mode = "stall"
    status, headers, _ = await post(server, {**CHAT, "stream": True})
    assert status == 200
    assert headers["X-Berry-Provider"] == "up2"


@pytest.mark.parametrize("status_code", [400, 404, 413, 422])
async def test_upstream_client_errors_return_unchanged(
    gateway: TestServer, upstream: FakeUpstream, status_code: int
) -> None:
    upstream.mode = "status"
    upstream.status_code = status_code
    upstream.error_body = b'{"error": {"message": "nope", "type": "invalid_request_error"}}'
    for stream in (False, True):
        upstream.requests.clear()
        status, headers, body = await post(gateway, {**CHAT, "stream": stream})
        assert (status, body) == (status_code, upstream.error_body)
        assert headers["Content-Type"].startswith("application/json")
        assert len(upstream.requests) == 1


async def test_non_json_200_is_a_bad_gateway(gateway: TestServer, upstream: FakeUpstream) -> None:
    upstream.mode = "not_json"
    status, _, body = await post(gateway, CHAT)
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_error"


async def test_fields_survive_and_only_model_is_rewritten(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    body = {
        **CHAT,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "vendor_extension": {"nested": [1, 2.5, None, "x"]},
        "seed": 42,
        "user": "end-user-7",
    }
    status, _, _ = await post(gateway, body)
    assert status == 200
    assert upstream.requests[-1].body == {**body, "model": "up-model"}


async def test_client_credentials_and_hop_by_hop_headers_stay_behind(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    headers = {
        **AUTH,
        "Proxy-Authorization": "Basic c2VjcmV0",
        "Cookie": "session=abc",
        "OpenAI-Organization": "org-client",
        "X-Custom-Trace": "keep-me",
        "Upgrade": "websocket",
        "api-key": "client-azure-key",
        # Where the client is, as a load balancer in front of the gateway says it:
        "X-Forwarded-For": "10.1.2.3",
        "X-Forwarded-Host": "intranet.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=10.1.2.3;proto=https",
        "X-Real-IP": "10.1.2.3",
    }
    await post(gateway, CHAT, headers=headers)
    sent = {k.lower(): v for k, v in upstream.requests[-1].headers.items()}
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent["x-custom-trace"] == "keep-me"
    for dropped in (
        "proxy-authorization",
        "cookie",
        "openai-organization",
        "upgrade",
        "api-key",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "forwarded",
        "x-real-ip",
    ):
        assert dropped not in sent
    assert "10.1.2.3" not in str(upstream.requests[-1].headers)


async def test_request_id_kept_when_sane_and_replaced_otherwise(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    _, headers, _ = await post(gateway, CHAT, headers={**AUTH, "X-Request-ID": "trace-42:a.b"})
    assert headers["X-Request-ID"] == "trace-42:a.b"
    assert upstream.requests[-1].headers["X-Request-ID"] == "trace-42:a.b"
    _, headers, _ = await post(gateway, CHAT, headers={**AUTH, "X-Request-ID": "bad id <script>"})
    assert headers["X-Request-ID"].startswith("req_")


async def test_gateway_errors_use_the_envelope(gateway: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        url = base_url(gateway)
        cases = [
            (session.get(url + "/nowhere"), 404, "not_found"),
            (session.get(url + "/v1/chat/completions", headers=AUTH), 405, "method_not_allowed"),
            (session.post(url + "/v1/chat/completions", headers=AUTH, data=b"{nope"), 400,
             "invalid_json"),
            (session.post(url + "/v1/chat/completions", headers=AUTH, data=b"[]"), 400,
             "invalid_json"),
            (session.post(url + "/v1/chat/completions", headers=AUTH, json={"messages": []}),
             400, "missing_parameter"),
            (session.post(url + "/v1/chat/completions", json=CHAT), 401, "missing_token"),
            (session.post(url + "/v1/chat/completions", headers=AUTH, data=b"x" * 70000), 413,
             "request_too_large"),
        ]  # fmt: skip
        for request, status, code in cases:
            async with request as resp:
                body = await resp.json()
                assert (resp.status, body["error"]["code"]) == (status, code)
                assert resp.headers["X-Request-ID"]
                assert set(body["error"]) >= {"type", "code", "message", "param"}


async def test_internal_error_hides_the_traceback(
    serve_app: AppServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(build_config(gateway_config(upstream), env={}), rng=random.Random(1))

    def explode(*_: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("berry_proxy.proxy.parse_request", explode)
    server = await serve_app(app)
    status, _, body = await post(server, CHAT)
    assert status == 500
    assert orjson.loads(body)["error"]["code"] == "internal_error"
    assert b"secret internal detail" not in body
    assert b"Traceback" not in body
