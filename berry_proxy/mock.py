"""The built-in ``mock`` provider: a deterministic fake LLM served in-process.

It lets ``make run`` work offline and gives demos and tests a provider with knobs:
latency before the first byte, number of stream chunks, delay between chunks, and a
failure rate drawn from a seeded RNG. The same request always gets the same words back;
the reply never repeats the prompt. Responses have the exact shape of OpenAI's chat
completion, completion, embedding and stream chunk objects, and honour what OpenAI's do:
``n`` choices, ``max_tokens`` (a shorter reply ends with ``"length"``), embeddings'
``encoding_format`` (``"base64"`` is the Node SDK's default) and ``dimensions``; they
report the model under the gateway's public name, as the client asked for it.

Like the gateway, it decodes a request only to its top level (``openai_request``): a huge
prompt is hashed as bytes, never built into objects.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson

from .config import ProviderConfig
from .errors import InvalidRequest
from .openai_request import decode_top_level, member_value
from .upstream import Adapter, UpstreamResponse, response_too_large

Sleep = Callable[[float], Awaitable[None]]
Members = dict[str, msgspec.Raw]

_VOCABULARY = (
    "berry", "proxy", "routes", "every", "request", "to", "a", "healthy", "backend",
    "and", "streams", "tokens", "as", "they", "arrive", "from", "the", "mock", "model",
    "which", "answers", "offline", "without", "keys", "quickly", "today",
)  # fmt: skip
MAX_REPLY_WORDS = 24
SSE_DONE = b"data: [DONE]\n\n"
# OpenAI's own limits on inputs per embeddings request and choices per completion; the
# largest embedding the mock makes (as mock.embedding_dimensions allows).
MAX_EMBEDDING_INPUTS = 2048
MAX_CHOICES = 128
MAX_EMBEDDING_DIMENSIONS = 8192
# Values the mock computes for one embeddings request at most (inputs x dimensions): it
# computes them on the event loop, ~1 µs each, and one client must not hold it for long.
MAX_EMBEDDING_VALUES = 256 * 1024


def sse_event(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class MockResponse(UpstreamResponse):
    """A finished answer handed out part by part, pausing ``chunk_delay`` between parts."""

    def __init__(
        self,
        status: int,
        content_type: str,
        parts: list[bytes],
        chunk_delay: float = 0.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.status = status
        self.headers = {"Content-Type": content_type}
        self._parts = parts
        self._next = 0
        self._chunk_delay = chunk_delay
        self._sleep = sleep

    async def read(self, limit: int) -> bytes:
        rest = b"".join(self._parts[self._next :])
        self._next = len(self._parts)
        if len(rest) > limit:
            raise response_too_large(limit)
        return rest

    async def read_chunk(self) -> bytes:
        if self._next >= len(self._parts):
            return b""
        if self._next and self._chunk_delay:
            await self._sleep(self._chunk_delay)
        part = self._parts[self._next]
        self._next += 1
        return part

    def release(self) -> None:
        self._next = len(self._parts)

    def abort(self) -> None:
        self._next = len(self._parts)


def _error(status: int, message: str, error_type: str) -> MockResponse:
    body = orjson.dumps({"error": {"message": message, "type": error_type, "code": None}})
    return MockResponse(status, "application/json", [body])


def _json(payload: Any) -> MockResponse:
    return MockResponse(200, "application/json", [orjson.dumps(payload)])


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _split(words: list[str], parts: int) -> list[str]:
    """``words`` as ``parts`` text pieces (fewer if there are fewer words)."""
    parts = max(1, min(parts, len(words)))
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        pieces.append(("" if start == 0 else " ") + " ".join(words[start:end]))
        start = end
    return pieces


class MockAdapter(Adapter):
    def __init__(
        self,
        provider: ProviderConfig,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(provider)
        self.settings = provider.mock
        self._rng = random.Random(self.settings.seed)  # noqa: S311  # simulated failures
        self._sleep = sleep
        self._clock = clock

    async def probe(self) -> int:
        # The fake provider is always reachable; its failure_rate models failing requests.
        return 200

    async def send(
        self,
        endpoint: str,
        backend_model: str,
        body: bytes | bytearray,
        headers: dict[str, str],
        public_model: str | None = None,
    ) -> UpstreamResponse:
        model = public_model or backend_model  # as the client asked for it
        if self.settings.latency_seconds:
            await self._sleep(self.settings.latency_seconds)
        try:
            request = decode_top_level(body)
        except InvalidRequest as exc:
            return _error(400, exc.message, "invalid_request_error")
        if self._rng.random() < self.settings.failure_rate:
            return _error(500, "The mock provider failed this request on purpose.", "server_error")
        if endpoint == "chat/completions":
            return self._completion(request, model, chat=True)
        if endpoint == "completions":
            return self._completion(request, model, chat=False)
        if endpoint == "embeddings":
            return self._embeddings(request, model)
        return _error(404, f"Unknown endpoint /{endpoint}.", "invalid_request_error")

    def models(self) -> list[str]:
        return list(self.provider.models)

    def _completion(self, request: Members, model: str, *, chat: bool) -> MockResponse:
        prompt = request.get("messages" if chat else "prompt") or b"null"
        digest = hashlib.sha256(prompt).digest()
        try:
            max_tokens = member_value(request, "max_tokens") or member_value(
                request, "max_completion_tokens"
            )
            n = member_value(request, "n")
            stream = member_value(request, "stream")
            options = member_value(request, "stream_options")
        except InvalidRequest as exc:
            return _error(400, exc.message, "invalid_request_error")
        choices = n if isinstance(n, int) and not isinstance(n, bool) else 1
        if not 1 <= choices <= MAX_CHOICES:
            return _error(400, f"'n' must be between 1 and {MAX_CHOICES}.", "invalid_request_error")
        limit = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else MAX_REPLY_WORDS
        count = min(limit, MAX_REPLY_WORDS)
        # Same prompt, same replies; each choice its own.
        replies = [_reply(digest, index, count) for index in range(choices)]
        finish = "length" if count < MAX_REPLY_WORDS else "stop"
        usage = _usage(max(1, len(prompt) // 4), count * choices)
        ident = ("chatcmpl-" if chat else "cmpl-") + digest.hex()[:24]
        created = int(self._clock())
        if stream is True:
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return self._stream(include_usage, ident, created, model, replies, finish, usage, chat)
        if chat:
            choice_list: list[dict[str, Any]] = [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for index, words in enumerate(replies)
            ]
        else:
            choice_list = [
                {"index": index, "text": " ".join(words), "logprobs": None, "finish_reason": finish}
                for index, words in enumerate(replies)
            ]
        return _json(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": choice_list,
                "usage": usage,
                "system_fingerprint": "fp_berry_mock",
            }
        )

    def _stream(
        self,
        include_usage: bool,
        ident: str,
        created: int,
        model: str,
        replies: list[list[str]],
        finish: str,
        usage: dict[str, int],
        chat: bool,
    ) -> MockResponse:
        """OpenAI's chunk sequence: for each step, one chunk per choice (role, pieces,
        finish), then the usage-only chunk if asked for, then ``[DONE]``."""
        base = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_berry_mock",
        }
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict[str, Any] | str, finish_reason: str | None) -> bytes:
            if chat:
                choice = {"index": index, "delta": delta, "logprobs": None}
            else:
                choice = {"index": index, "text": delta, "logprobs": None}
            choice["finish_reason"] = finish_reason
            return sse_event({**base, "choices": [choice], **extra})

        pieces = [_split(words, self.settings.chunk_count) for words in replies]
        events = [
            chunk(index, {"role": "assistant", "content": ""} if chat else "", None)
            for index in range(len(replies))
        ]
        for step in range(max(len(p) for p in pieces)):
            for index, parts in enumerate(pieces):
                if step < len(parts):
                    piece = parts[step]
                    events.append(chunk(index, {"content": piece} if chat else piece, None))
        events.extend(chunk(index, {} if chat else "", finish) for index in range(len(replies)))
        if include_usage:
            events.append(sse_event({**base, "choices": [], "usage": usage}))
        events.append(SSE_DONE)
        return MockResponse(
            200, "text/event-stream", events, self.settings.chunk_delay_seconds, self._sleep
        )

    def _embeddings(self, request: Members, model: str) -> MockResponse:
        try:
            raw = _input_value(request)
        except InvalidRequest as exc:
            return _error(400, exc.message, "invalid_request_error")
        inputs = raw if isinstance(raw, list) else [raw]
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            return _error(
                400,
                f"'input' must have at most {MAX_EMBEDDING_INPUTS} items.",
                "invalid_request_error",
            )
        try:
            encoding = member_value(request, "encoding_format") or "float"
            dimensions = member_value(request, "dimensions")
            if dimensions is None:
                dimensions = self.settings.embedding_dimensions
        except InvalidRequest as exc:
            return _error(400, exc.message, "invalid_request_error")
        if encoding not in ("float", "base64"):
            return _error(
                400, "'encoding_format' must be 'float' or 'base64'.", "invalid_request_error"
            )
        if (
            isinstance(dimensions, bool)
            or not isinstance(dimensions, int)
            or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS
        ):
            return _error(
                400,
                f"'dimensions' must be an integer from 1 to {MAX_EMBEDDING_DIMENSIONS}.",
                "invalid_request_error",
            )
        if len(inputs) * dimensions > MAX_EMBEDDING_VALUES:
            return _error(
                400,
                f"The mock embeds at most {MAX_EMBEDDING_VALUES} values per request "
                "(inputs x dimensions); send fewer inputs or dimensions.",
                "invalid_request_error",
            )
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            encoded = orjson.dumps(item)
            tokens += max(1, len(encoded) // 4)
            vector = _vector(encoded, dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": _base64(vector) if encoding == "base64" else vector,
                }
            )
        return _json(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


# The mock embeds inputs of at most this many bytes of JSON (a real model's context is
# far smaller); it decodes the input to count and embed its items.
MAX_EMBEDDING_INPUT_BYTES = 8 * 1024 * 1024


def _input_value(request: Members) -> Any:
    raw = request.get("input")
    if raw is not None and len(raw) > MAX_EMBEDDING_INPUT_BYTES:
        raise InvalidRequest(
            "invalid_parameter", f"'input' is larger than {MAX_EMBEDDING_INPUT_BYTES} bytes"
        )
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:  # valid JSON it cannot hold, such as 1e400
        raise InvalidRequest("invalid_parameter", "'input' holds a value out of range") from None


def _reply(digest: bytes, index: int, count: int) -> list[str]:
    """The words of choice ``index`` of the reply to a prompt with this digest."""
    seed = digest if index == 0 else digest + index.to_bytes(4, "big")
    words_rng = random.Random(seed)  # noqa: S311  # same prompt, same reply
    return [words_rng.choice(_VOCABULARY) for _ in range(count)]


def _base64(vector: list[float]) -> str:
    """``vector`` as OpenAI's ``encoding_format: "base64"`` sends it: little-endian
    float32 values, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _vector(seed: bytes, dimensions: int) -> list[float]:
    """A deterministic unit-length vector derived from ``seed``."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values.extend(v / 2**31 - 1.0 for v in struct.unpack(">8I", block))
        counter += 1
    values = values[:dimensions]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]
