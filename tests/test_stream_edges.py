"""Stream and request edge cases a real deployment meets (each one a bug found in review)."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import logging
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp.test_utils import TestServer

from berry_proxy.log import ACCESS_LOG, configure_logging, get_logger

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_ERROR_EVENT,
    FakeUpstream,
    GatewayFactory,
    base_url,
    gateway_config,
    stream_events,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}


async def _post(server: TestServer, data: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url(server) + "/v1/chat/completions", data=data, headers=headers) as r,
    ):
        return r.status, await r.read()


async def test_gzip_and_form_typed_json_bodies_reach_the_upstream_as_json(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    raw = orjson.dumps(CHAT)
    compressed = {**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    assert (await _post(gateway, gzip.compress(raw), compressed))[0] == 200
    # curl -d sends application/x-www-form-urlencoded; the body is still JSON.
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    assert (await _post(gateway, raw, form))[0] == 200
    for sent in upstream.requests:
        assert sent.headers["Content-Type"] == "application/json"
        assert "Content-Encoding" not in sent.headers
        assert sent.body == {**CHAT, "model": "up-model"}


async def test_deeply_nested_fields_survive_the_model_rewrite(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    nested: Any = "leaf"
    for _ in range(300):  # deeper than orjson can write, well within what it reads
        nested = [nested]
    body = {**CHAT, "vendor_extension": nested}
    status, _ = await _post(gateway, json.dumps(body).encode(), AUTH)
    assert status == 200
    assert upstream.requests[-1].body == {**body, "model": "up-model"}


async def test_done_ends_the_response_even_if_the_upstream_keeps_the_connection(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "done_no_eof"  # the gateway's idle timeout here is 2 s
    status, body = await asyncio.wait_for(
        _post(gateway, orjson.dumps({**CHAT, "stream": True}), AUTH), 1.5
    )
    assert status == 200
    assert body == b"".join(stream_events(include_usage=False))


async def test_upstream_error_event_mid_stream_is_the_one_error_and_no_done_follows(
    gateway: TestServer, upstream: FakeUpstream
) -> None:
    upstream.mode = "error_mid_stream"
    status, body = await _post(gateway, orjson.dumps({**CHAT, "stream": True}), AUTH)
    assert status == 200
    assert body == b"".join(stream_events(include_usage=False)[:2]) + UPSTREAM_ERROR_EVENT
    assert b"[DONE]" not in body


async def test_busy_connection_slots_answer_503_without_blaming_the_provider(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["max_connections"] = 1
    raw["providers"]["up1"]["connect_timeout_seconds"] = 0.2
    server = await start_gateway(raw)
    upstream.mode = "gated"  # the first stream holds the only slot until the gate opens
    async with aiohttp.ClientSession() as session:
        url = base_url(server) + "/v1/chat/completions"
        async with session.post(url, json={**CHAT, "stream": True}, headers=AUTH) as first:
            await asyncio.wait_for(first.content.readuntil(b"\n\n"), 5)
            async with session.post(url, json=CHAT, headers=AUTH) as second:
                error = await second.json()
                assert second.status == 503
                assert second.headers["Retry-After"] == "1"
            upstream.gate.set()
            assert (await first.read()).endswith(b"data: [DONE]\n\n")
        async with session.get(base_url(server) + "/health") as health:
            providers = (await health.json())["providers"]
    assert error["error"]["code"] == "upstream_saturated"
    assert providers["up1"]["healthy"] is True


async def test_model_ids_with_a_slash_can_be_retrieved(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["models"]["gpt-test"]["name"] = "meta-llama/Llama-3.1-8B"
    server = await start_gateway(raw)
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + "/v1/models/meta-llama/Llama-3.1-8B", headers=AUTH) as r,
    ):
        assert r.status == 200
        assert (await r.json())["id"] == "meta-llama/Llama-3.1-8B"


def test_the_access_line_is_written_as_structlog_writes_every_other_line() -> None:
    """One JSON object per flushed line, the request's fields first and then ``event``,
    ``level`` and ``timestamp``; a level above INFO leaves access lines out."""
    buffer = io.BytesIO()
    try:
        configure_logging(stream=buffer)
        get_logger("test").info("request", request_id="r1", status=200)
        ACCESS_LOG.write({"request_id": "r1", "status": 200})
        by_structlog, by_access_log = buffer.getvalue().splitlines()
        first, second = orjson.loads(by_structlog), orjson.loads(by_access_log)
        assert (
            list(first) == list(second) == ["request_id", "status", "event", "level", "timestamp"]
        )
        assert {**first, "timestamp": None} == {**second, "timestamp": None}
        configure_logging(level=logging.WARNING, stream=buffer)
        ACCESS_LOG.write({"request_id": "r2", "status": 200})
        assert b"r2" not in buffer.getvalue()
    finally:
        structlog.reset_defaults()
        ACCESS_LOG.stream, ACCESS_LOG.enabled = None, True


def test_an_access_line_that_cannot_be_written_is_dropped_not_raised() -> None:
    """A broken stdout (a closed pipe, journald restarting) must not turn the answer whose
    line it is into a 500."""

    class BrokenPipe(io.BytesIO):
        def write(self, _data: Any) -> int:
            raise BrokenPipeError

    try:
        configure_logging(stream=BrokenPipe())
        before = ACCESS_LOG.dropped
        ACCESS_LOG.write({"request_id": "r1", "status": 200})
        assert ACCESS_LOG.dropped == before + 1
    finally:
        structlog.reset_defaults()
        ACCESS_LOG.stream, ACCESS_LOG.enabled = None, True


def test_logged_exceptions_never_carry_frame_locals() -> None:
    buffer = io.BytesIO()
    configure_logging(stream=buffer)
    try:
        prompt = "SECRET-PROMPT-TEXT"  # a local of the failing frame
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            get_logger("test").exception("internal_error", request_id="r1")
        line = orjson.loads(buffer.getvalue())
    finally:
        structlog.reset_defaults()
        ACCESS_LOG.stream, ACCESS_LOG.enabled = None, True
    assert line["exception"][0]["exc_type"] == "RuntimeError"
    assert prompt not in buffer.getvalue().decode()


async def test_a_gateway_bug_after_the_commit_still_ends_the_stream_with_an_error_event(
    gateway: TestServer, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("bug in the copy loop")

    monkeypatch.setattr("berry_proxy.relay.forwardable", broken)
    status, body = await _post(gateway, orjson.dumps({**CHAT, "stream": True}), AUTH)
    assert status == 200
    error = orjson.loads(body.removeprefix(b"data: "))
    assert error["error"]["code"] == "internal_error"
    assert b"bug in the copy loop" not in body


async def test_idle_gap_after_the_commit_ends_the_stream_with_a_timeout_event(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["idle_timeout_seconds"] = 0.3
    server = await start_gateway(raw)
    upstream.mode = "gated"  # first content, then silence: the gate never opens
    status, body = await asyncio.wait_for(
        _post(server, orjson.dumps({**CHAT, "stream": True}), AUTH), 5
    )
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert b'"content":"Hello"' in events[1]
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in body
    await asyncio.wait_for(upstream.disconnected.wait(), 5)  # and the upstream was closed


async def test_explicit_total_timeout_bounds_a_stream_that_keeps_trickling(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["idle_timeout_seconds"] = 30
    raw["providers"]["up1"]["total_timeout_seconds"] = 0.3
    server = await start_gateway(raw)
    upstream.mode = "gated"
    status, body = await asyncio.wait_for(
        _post(server, orjson.dumps({**CHAT, "stream": True}), AUTH), 5
    )
    assert status == 200
    last = orjson.loads([e for e in body.split(b"\n\n") if e][-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_timeout"
