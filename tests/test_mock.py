"""The built-in ``mock`` provider (``mock.py``) and the default config that serves it.

The mock is what a newcomer talks to after ``make run`` and what demos rely on, so its
answers must be deterministic, have OpenAI's exact shapes, and honour its knobs (latency,
chunks, failure rate). The last tests start the gateway with ``config/berry.yaml`` and call
it with the official SDK, as the README tells a newcomer to do.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from berry_proxy.app import create_app
from berry_proxy.config import MockConfig, ProviderConfig, load_config
from berry_proxy.mock import MAX_REPLY_WORDS, MockAdapter
from berry_proxy.upstream import UpstreamResponse

from .conftest import AppServer, base_url

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "berry.yaml"
DEFAULT_ADMIN_TOKEN = "berry-admin-token-change-me"
LIMIT = 1 << 20  # bytes a test reads of a mock answer
MESSAGES = [{"role": "user", "content": "Tell me about berries"}]
CREATED = 1_700_000_000


class Sleeps:
    """An injected ``sleep`` that records what it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def make_adapter(sleep: Sleeps | None = None, **settings: Any) -> MockAdapter:
    provider = ProviderConfig(
        id="mock", name="Mock", type="mock", base_url="", mock=MockConfig(**settings)
    )
    return MockAdapter(provider, sleep=sleep or Sleeps(), clock=lambda: CREATED + 0.75)


async def send(
    adapter: MockAdapter, body: dict[str, Any], endpoint: str = "chat/completions"
) -> UpstreamResponse:
    return await adapter.send(endpoint, "mock-model", orjson.dumps(body), {})


async def read_parts(response: UpstreamResponse) -> list[bytes]:
    parts: list[bytes] = []
    for _ in range(10_000):
        part = await response.read_chunk()
        if not part:
            return parts
        parts.append(part)
    raise AssertionError("the stream never ended")


def payloads(parts: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        assert part.startswith(b"data: ")
        assert part.endswith(b"\n\n")
        data = part.removeprefix(b"data: ").removesuffix(b"\n\n")
        out.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return out


async def chat(adapter: MockAdapter, **fields: Any) -> dict[str, Any]:
    response = await send(adapter, {"model": "x", "messages": MESSAGES, **fields})
    assert response.status == 200
    reply: dict[str, Any] = orjson.loads(await response.read(LIMIT))
    return reply


# --------------------------------------------------------------------------------------
# Non-streaming replies
# --------------------------------------------------------------------------------------


async def test_same_request_gets_identical_bytes() -> None:
    body = {"model": "x", "messages": MESSAGES, "temperature": 0.3}
    first = await (await send(make_adapter(), body)).read(LIMIT)
    # Another adapter, another seed: the reply depends on the request only.
    second = await (await send(make_adapter(seed=99), body)).read(LIMIT)
    assert first == second


async def test_different_prompt_gets_different_text() -> None:
    adapter = make_adapter()
    texts = set()
    for prompt in ("one", "two", "three"):
        reply = await chat(adapter, messages=[{"role": "user", "content": prompt}])
        texts.add(reply["choices"][0]["message"]["content"])
    assert len(texts) == 3


async def test_chat_completion_shape() -> None:
    reply = await chat(make_adapter())
    assert reply["object"] == "chat.completion"
    assert reply["id"].startswith("chatcmpl-")
    assert reply["created"] == CREATED
    assert reply["model"] == "mock-model"  # the backend model it was sent to
    (choice,) = reply["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    words = choice["message"]["content"].split(" ")
    assert len(words) == MAX_REPLY_WORDS
    usage = reply["usage"]
    assert usage["completion_tokens"] == MAX_REPLY_WORDS
    assert usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_the_reply_with_finish_reason_length(field: str) -> None:
    reply = await chat(make_adapter(), **{field: 5})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split(" ")) == 5
    assert reply["usage"]["completion_tokens"] == 5


async def test_generous_max_tokens_finishes_with_stop() -> None:
    reply = await chat(make_adapter(), max_tokens=4096)
    assert reply["choices"][0]["finish_reason"] == "stop"


async def test_legacy_completions_shape() -> None:
    adapter = make_adapter()
    response = await send(adapter, {"model": "x", "prompt": "Once upon a time"}, "completions")
    assert response.status == 200
    reply = orjson.loads(await response.read(LIMIT))
    assert reply["object"] == "text_completion"
    assert reply["id"].startswith("cmpl-")
    (choice,) = reply["choices"]
    assert isinstance(choice["text"], str)
    assert choice["text"]
    assert choice["finish_reason"] == "stop"
    assert "message" not in choice
    assert reply["usage"]["completion_tokens"] == len(choice["text"].split(" "))


async def test_unknown_endpoint_and_bad_body_are_client_errors() -> None:
    adapter = make_adapter()
    assert (await send(adapter, {"model": "x"}, "images/generations")).status == 404
    response = await adapter.send("chat/completions", "m", b"{not json", {})
    assert response.status == 400
    assert orjson.loads(await response.read(LIMIT))["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_count", [1, 3, 8])
async def test_stream_shape_without_usage(chunk_count: int) -> None:
    adapter = make_adapter(chunk_count=chunk_count)
    response = await send(adapter, {"model": "x", "messages": MESSAGES, "stream": True})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    events = payloads(await read_parts(response))
    assert len(events) == 1 + chunk_count + 1 + 1
    role, *contents, finish, done = events
    assert done == "[DONE]"
    for item in (role, *contents, finish):
        assert item["object"] == "chat.completion.chunk"
        assert item["model"] == "mock-model"
        assert "usage" not in item
        assert len(item["choices"]) == 1
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["choices"][0]["finish_reason"] is None
    assert all(c["choices"][0]["finish_reason"] is None for c in contents)
    assert all(c["choices"][0]["delta"]["content"] for c in contents)
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    # Same words as the non-stream answer to the same request.
    text = "".join(c["choices"][0]["delta"]["content"] for c in contents)
    assert text == (await chat(make_adapter()))["choices"][0]["message"]["content"]
    # Every chunk of one stream shares its id.
    assert len({e["id"] for e in (role, *contents, finish)}) == 1


async def test_stream_usage_chunk_only_when_asked() -> None:
    adapter = make_adapter(chunk_count=4)
    body = {
        "model": "x",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = payloads(await read_parts(await send(adapter, body)))
    assert len(events) == 1 + 4 + 1 + 1 + 1
    *chunks, usage, done = events
    assert done == "[DONE]"
    # As OpenAI does: every other chunk says "usage": null, the last one has choices [].
    assert all(c["usage"] is None for c in chunks)
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == MAX_REPLY_WORDS
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )


async def test_stream_with_max_tokens_finishes_with_length() -> None:
    adapter = make_adapter(chunk_count=8)
    body = {"model": "x", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    _, *contents, finish, done = payloads(await read_parts(await send(adapter, body)))
    assert len(contents) == 3  # no more chunks than words
    assert finish["choices"][0]["finish_reason"] == "length"
    assert done == "[DONE]"


async def test_legacy_completions_stream() -> None:
    adapter = make_adapter(chunk_count=2)
    body = {"model": "x", "prompt": "Once", "stream": True}
    events = payloads(await read_parts(await send(adapter, body, "completions")))
    *chunks, done = events
    assert done == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert all("text" in c["choices"][0] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------------------
# Knobs: failures, latency, embeddings
# --------------------------------------------------------------------------------------


async def test_failure_rate_one_always_fails_with_500() -> None:
    adapter = make_adapter(failure_rate=1.0)
    for stream in (False, True):
        response = await send(adapter, {"model": "x", "messages": MESSAGES, "stream": stream})
        assert response.status == 500
        error = orjson.loads(await response.read(LIMIT))["error"]
        assert error["type"] == "server_error"


async def test_failure_rate_zero_never_fails() -> None:
    adapter = make_adapter(failure_rate=0.0)
    for _ in range(200):
        assert (await send(adapter, {"model": "x", "messages": MESSAGES})).status == 200


async def failure_pattern(seed: int, count: int = 64) -> list[int]:
    adapter = make_adapter(failure_rate=0.5, seed=seed)
    return [
        (await send(adapter, {"model": "x", "messages": MESSAGES})).status for _ in range(count)
    ]


async def test_seeded_failures_are_reproducible() -> None:
    first = await failure_pattern(seed=7)
    assert first == await failure_pattern(seed=7)
    assert set(first) == {200, 500}  # a rate of 0.5 over 64 draws shows both
    assert first != await failure_pattern(seed=8)


async def test_latency_and_chunk_delay_use_the_injected_sleep() -> None:
    sleeps = Sleeps()
    adapter = make_adapter(sleeps, latency_seconds=0.25, chunk_delay_seconds=0.125, chunk_count=3)
    body = {"model": "x", "messages": MESSAGES, "stream": True}
    response = await send(adapter, body)
    assert sleeps.calls == [0.25]  # before the answer's headers
    parts = await read_parts(response)
    assert len(parts) == 1 + 3 + 1 + 1
    # Between parts, not before the first one.
    assert sleeps.calls == [0.25] + [0.125] * (len(parts) - 1)


async def test_no_latency_configured_means_no_sleep() -> None:
    sleeps = Sleeps()
    adapter = make_adapter(sleeps, chunk_count=3)
    await read_parts(await send(adapter, {"model": "x", "messages": MESSAGES, "stream": True}))
    await send(adapter, {"model": "x", "messages": MESSAGES})
    assert sleeps.calls == []


async def embed(adapter: MockAdapter, value: Any) -> dict[str, Any]:
    response = await send(adapter, {"model": "x", "input": value}, "embeddings")
    assert response.status == 200
    reply: dict[str, Any] = orjson.loads(await response.read(LIMIT))
    return reply


@pytest.mark.parametrize("dimensions", [1, 8, 33, 256])
async def test_embeddings_are_deterministic_unit_vectors(dimensions: int) -> None:
    adapter = make_adapter(embedding_dimensions=dimensions)
    reply = await embed(adapter, ["alpha", "beta"])
    assert reply["object"] == "list"
    assert reply["model"] == "mock-model"
    assert [d["index"] for d in reply["data"]] == [0, 1]
    vectors = [d["embedding"] for d in reply["data"]]
    for item, vector in zip(reply["data"], vectors, strict=True):
        assert item["object"] == "embedding"
        assert len(vector) == dimensions
        assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)
    assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] >= 2
    again = await embed(make_adapter(embedding_dimensions=dimensions, seed=5), ["alpha", "beta"])
    assert [d["embedding"] for d in again["data"]] == vectors
    if dimensions > 1:
        assert vectors[0] != vectors[1]


async def test_single_string_embedding_input() -> None:
    reply = await embed(make_adapter(), "alpha")
    assert len(reply["data"]) == 1
    listed = await embed(make_adapter(), ["alpha"])
    assert reply["data"] == listed["data"]


async def test_base64_embeddings_are_the_float_vector_as_little_endian_float32() -> None:
    """OpenAI's ``encoding_format: "base64"`` (the Node SDK's default)."""
    adapter = make_adapter(embedding_dimensions=16)
    floats = await embed(adapter, ["alpha", "beta"])
    response = await send(
        adapter,
        {"model": "x", "input": ["alpha", "beta"], "encoding_format": "base64"},
        "embeddings",
    )
    encoded = orjson.loads(await response.read(LIMIT))
    for plain, packed in zip(floats["data"], encoded["data"], strict=True):
        raw = base64.b64decode(packed["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(plain["embedding"], abs=1e-6)


async def test_dimensions_sets_the_length_of_a_unit_vector() -> None:
    response = await send(
        make_adapter(), {"model": "x", "input": "a", "dimensions": 3}, "embeddings"
    )
    vector = orjson.loads(await response.read(LIMIT))["data"][0]["embedding"]
    assert len(vector) == 3
    assert sum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)


async def test_an_embeddings_request_that_would_hold_the_loop_is_a_400() -> None:
    """512 inputs of 8192 dimensions took ~5 s of the event loop: refused at once."""
    body = {"model": "x", "input": ["a"] * 512, "dimensions": 8192}
    response = await send(make_adapter(), body, "embeddings")
    assert response.status == 400
    assert "inputs x dimensions" in orjson.loads(await response.read(LIMIT))["error"]["message"]


@pytest.mark.parametrize(
    "fields",
    [b'"encoding_format":"hex"', b'"dimensions":0', b'"dimensions":"3"', b'"input":[1e400]'],
)
async def test_bad_embedding_fields_are_400s(fields: bytes) -> None:
    body = b'{"model":"x","input":"a",' + fields + b"}"
    response = await make_adapter().send("embeddings", "mock-model", body, {})
    assert response.status == 400
    assert orjson.loads(await response.read(LIMIT))["error"]["type"] == "invalid_request_error"


async def test_n_gives_that_many_distinct_choices_and_counts_their_tokens() -> None:
    reply = await chat(make_adapter(), n=3)
    choices = reply["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["message"]["content"] for c in choices]
    assert len(set(texts)) == 3
    assert texts[0] == (await chat(make_adapter()))["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] == 3 * MAX_REPLY_WORDS


async def test_n_streams_every_choice_with_its_index() -> None:
    adapter = make_adapter(chunk_count=4)
    body = {"model": "x", "messages": MESSAGES, "stream": True, "n": 2, "max_tokens": 6}
    events = payloads(await read_parts(await send(adapter, body)))
    assert events[-1] == "[DONE]"
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for event in events[:-1]:
        (choice,) = event["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    replies = (await chat(make_adapter(), n=2, max_tokens=6))["choices"]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in replies]
    assert texts[2] == ""
    assert finishes == {0: "length", 1: "length"}


async def test_n_over_openais_limit_is_a_400() -> None:
    response = await send(make_adapter(), {"model": "x", "messages": MESSAGES, "n": 129})
    assert response.status == 400


async def test_the_mock_reports_the_public_model_name_it_is_given() -> None:
    adapter = make_adapter()
    body = orjson.dumps({"model": "backend-name", "messages": MESSAGES})
    answer = await adapter.send("chat/completions", "backend-name", body, {}, "gpt-4o")
    assert orjson.loads(await answer.read(LIMIT))["model"] == "gpt-4o"


# --------------------------------------------------------------------------------------
# End to end: the default config, served by the gateway, called by the SDK
# --------------------------------------------------------------------------------------


@pytest.fixture
async def default_sdk(serve_app: AppServer) -> AsyncIterator[openai.AsyncOpenAI]:
    server = await serve_app(create_app(load_config(DEFAULT_CONFIG, env={})))
    client = openai.AsyncOpenAI(
        base_url=base_url(server) + "/v1", api_key=DEFAULT_ADMIN_TOKEN, max_retries=0
    )
    yield client
    await client.close()


async def test_default_config_serves_chat_completion(default_sdk: openai.AsyncOpenAI) -> None:
    raw = await default_sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )
    completion = raw.parse()
    assert raw.headers["x-berry-provider"] == "mock-fast"
    assert raw.headers["x-berry-backend-model"] == "mock-gpt-4o-mini"
    assert completion.model == "gpt-4o-mini"  # the name the client asked for
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == MAX_REPLY_WORDS


async def test_default_config_serves_chat_stream(default_sdk: openai.AsyncOpenAI) -> None:
    stream = await default_sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: list[str] = []
    finish = None
    usage_chunks = 0
    async for item in stream:
        if item.usage is not None:
            usage_chunks += 1
            assert item.usage.completion_tokens == MAX_REPLY_WORDS
        for choice in item.choices:
            texts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len("".join(texts).split(" ")) == MAX_REPLY_WORDS
    assert finish == "stop"
    assert usage_chunks == 1
