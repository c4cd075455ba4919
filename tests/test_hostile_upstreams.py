"""The gateway against broken and hostile upstreams (issue 7, SPEC §2 "Streaming", §5).

Each test puts a fake upstream that misbehaves in one precise way behind the gateway and
checks what a user of the gateway would notice: the answer the client gets (through the
``openai`` SDK where the client's view is the point, raw aiohttp or a raw socket where
bytes matter), whether the request failed over, the gateway's memory (RSS and its peak,
VmHWM, from ``/proc/PID/status`` of a ``berry-proxy serve`` process) where memory is the
point, and whether the gateway closed the upstream connection where a slot is.

Covered:

1. an unterminated line (``data: `` then endless bytes without an event boundary), before
   and after the commit point, with one backend and with two, and its memory cost;
2. an endless firehose of valid events towards a client that stopped reading;
3. a 400 MB non-stream body;
4. a gzip bomb (a small body inflating to 320 MiB), as a chat answer, as an event stream
   and as the health probe's model list;
5. a reasoning model that sends only ``: keep-alive`` comments while it thinks, and the
   contrast of an upstream that sends nothing at all;
6. an upstream that echoes the provider's own API key in an error body or a stream;
7. ``Retry-After: 1000000000``;
8. a ``307`` (or ``301``) redirect to another server;
9. answers that are not HTTP, or not whole (a 1 MiB header, a body cut short).

The fake upstreams are small aiohttp apps served on 127.0.0.1 by ``aiohttp_server``; each
hostile one counts what it sent and whether the gateway cut it short. Every loop here is
bounded in iterations and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.errors import MAX_RETRY_AFTER_SECONDS

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    UPSTREAM_KEY,
    FakeClock,
    FakeUpstream,
    GatewayFactory,
    GatewayProcess,
    ProcessFactory,
    ServerFactory,
    base_url,
    chat_chunk,
    chat_completion,
    gateway_config,
    sdk_for,
    stream_events,
)

MIB = 1024 * 1024
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES}
STREAM_CHAT: dict[str, Any] = {**CHAT, "stream": True}
CONTENT = "".join(CHAT_CONTENT)
FULL_STREAM = b"".join(stream_events(include_usage=False))

# What a hostile upstream is prepared to send on ONE connection: a gateway that does not
# cap what it reads would take all of it (and hold it: the RSS tests would see it).
UNTERMINATED_BUDGET = 256 * MIB
HUGE_BODY_BYTES = 400 * 1000 * 1000
# A connection the gateway cut must have taken far less than the budget. The slack covers
# the loopback socket buffers (tcp_rmem may autotune up to 32 MiB) besides the 1 MiB limit.
CUT_EARLY_BYTES = 64 * MIB
# A gateway process may grow this much over its idle RSS while hostile upstreams push
# hundreds of megabytes at it.
RSS_HEADROOM_MIB = 60.0
# The gzip bomb inflates to this many bytes of JSON.
BOMB_INFLATED_BYTES = 320 * MIB

FILLER = b"x" * MIB  # endless bytes of one event: no "\n" anywhere

# An SDK client that hangs on a broken gateway fails the test instead of hanging it.
SDK_TIMEOUT = 20.0


# --------------------------------------------------------------------------------------
# Hostile upstreams
# --------------------------------------------------------------------------------------


@dataclass
class Hostile:
    """A misbehaving upstream server and what its answers went through.

    ``push`` writes an answer piece by piece and notes how far it got: written to its
    end (``finished``), or cut short because the gateway closed the connection (``cut``:
    a write failed or the handler was cancelled on disconnect).
    """

    server: TestServer | None = None
    answers: int = 0  # answers begun
    cut: int = 0  # answers the gateway cut short by closing the connection
    finished: int = 0  # answers written to their end
    sent: int = 0  # body bytes written, all answers together
    most: int = 0  # the most body bytes one answer got out
    first_write_at: float | None = None  # time.monotonic() of the latest answer's 1st byte
    cut_at: float | None = None  # time.monotonic() of the latest cut
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        raise NotImplementedError  # each kind of hostile upstream has its own

    def upstream(self) -> FakeUpstream:
        """As a ``FakeUpstream`` (its URL is all ``gateway_config`` needs)."""
        return FakeUpstream(server=self.server)

    def _note(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait (at most ``within`` s) until ``predicate()`` holds."""
        async with asyncio.timeout(within):
            while not predicate():
                await self._changed.wait()

    def settled(self) -> bool:
        return self.cut + self.finished == self.answers

    async def push(
        self,
        request: web.Request,
        response: web.StreamResponse,
        head: bytes,
        filler: bytes,
        budget: int,
        tail: bytes = b"",
    ) -> web.StreamResponse:
        """Send ``head``, then ``filler`` until ``budget`` body bytes went out, then ``tail``."""
        self.answers += 1
        self._note()
        sent = 0
        try:
            await response.prepare(request)
            await response.write(head)
            sent += len(head)
            self.first_write_at = time.monotonic()
            self._note()
            while sent < budget:
                await response.write(filler)
                sent += len(filler)
            await response.write(tail)
            sent += len(tail)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            self.cut += 1
            self.cut_at = time.monotonic()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return response
        finally:
            self.sent += sent
            self.most = max(self.most, sent)
            self._note()
        self.finished += 1
        return response


def event_stream() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream"})


async def chat_body(request: web.Request) -> dict[str, Any]:
    body: dict[str, Any] = await request.json()
    return body


@dataclass
class UnterminatedLine(Hostile):
    """Streams ``data: `` and then endless bytes with no event boundary; with
    ``commit_first``, a role chunk and a content chunk come first. Answers non-stream
    requests normally (the same backend serving ordinary traffic meanwhile)."""

    commit_first: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await chat_body(request)
        if not body.get("stream"):
            return web.json_response(chat_completion(body["model"]))
        head = b""
        if self.commit_first:
            head = chat_chunk({"role": "assistant", "content": ""}) + chat_chunk(
                {"content": "Hello"}
            )
        head += b"data: "
        return await self.push(request, event_stream(), head, FILLER, UNTERMINATED_BUDGET)


# One block of a firehose: 256 valid content events of ~4 KB each.
FIREHOSE_BLOCK = chat_chunk({"content": "z" * 4000}) * 256
FIREHOSE_BUDGET = 64 * 1024 * MIB  # "forever", but bounded


@dataclass
class Firehose(Hostile):
    """Streams valid content events as fast as the connection takes them, without end;
    answers non-stream requests normally."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await chat_body(request)
        if not body.get("stream"):
            return web.json_response(chat_completion(body["model"]))
        head = chat_chunk({"role": "assistant", "content": ""})
        return await self.push(request, event_stream(), head, FIREHOSE_BLOCK, FIREHOSE_BUDGET)


HUGE_HEAD = (
    b'{"id":"chatcmpl-huge","object":"chat.completion","created":1700000000,'
    b'"model":"up-model","choices":[{"index":0,"message":{"role":"assistant","content":"'
)
HUGE_TAIL = b'"},"finish_reason":"stop"}]}'


@dataclass
class HugeBody(Hostile):
    """Answers a non-stream chat with a 200 JSON of 400 MB (with its Content-Length)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = HUGE_BODY_BYTES
        # The head, whole MiB of filler, a last partial MiB and the tail: valid JSON.
        budget = HUGE_BODY_BYTES - len(HUGE_TAIL)
        whole = budget - (budget - len(HUGE_HEAD)) % len(FILLER)
        tail = FILLER[: budget - whole] + HUGE_TAIL
        return await self.push(request, response, HUGE_HEAD, FILLER, whole, tail=tail)


@functools.cache
def gzip_bomb() -> bytes:
    """A chat completion whose content is 320 MiB of "0", gzip-compressed (~330 KB).

    Built once, 4 MiB at a time, so the test process never holds the inflated bytes.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"0" * (4 * MIB)
    parts = [compressor.compress(HUGE_HEAD)]
    parts += [compressor.compress(zeros) for _ in range(BOMB_INFLATED_BYTES // len(zeros))]
    parts += [compressor.compress(HUGE_TAIL), compressor.flush()]
    return b"".join(parts)


def inflated_size(data: bytes) -> int:
    """What ``data`` inflates to, decompressed in bounded steps."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    inflated = 0
    for start in range(0, len(data), 64 * 1024):
        piece = data[start : start + 64 * 1024]
        while piece:
            inflated += len(inflater.decompress(piece, 16 * MIB))
            piece = inflater.unconsumed_tail
    return inflated


@dataclass
class GzipBomb(Hostile):
    """Answers chats, and (once ``armed``) the model list, with the gzip bomb. To a
    stream request it is an event stream: one event that never ends (no blank line)."""

    armed: bool = False
    bombs: int = 0  # bombs served
    probes: int = 0  # GET /v1/models requests

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    def _bomb(self, content_type: str = "application/json") -> web.Response:
        self.bombs += 1
        self._note()
        return web.Response(
            body=gzip_bomb(), headers={"Content-Type": content_type, "Content-Encoding": "gzip"}
        )

    async def chat(self, request: web.Request) -> web.Response:
        body = await chat_body(request)
        return self._bomb("text/event-stream" if body.get("stream") else "application/json")

    async def models(self, request: web.Request) -> web.Response:
        self.probes += 1
        if not self.armed:
            self._note()
            return web.json_response({"object": "list", "data": [{"id": "up-model"}]})
        return self._bomb()


HostileT = TypeVar("HostileT", bound=Hostile)


async def serve(aiohttp_server: ServerFactory, hostile: HostileT) -> HostileT:
    """Serve ``hostile``'s app on 127.0.0.1; returns it."""
    hostile.server = await aiohttp_server(hostile.app())
    return hostile


# --------------------------------------------------------------------------------------
# Configurations and clients
# --------------------------------------------------------------------------------------


def failover_config(first: FakeUpstream, second: FakeUpstream, **settings: Any) -> dict[str, Any]:
    """``gpt-test`` tries up1 (``first``) and then up2 (``second``), in that order."""
    raw = gateway_config(first, second, **settings)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1
    return raw


def with_lone_model(raw: dict[str, Any], provider: str = "up1") -> dict[str, Any]:
    """Add model ``lone``, served by ``provider`` alone."""
    raw["models"]["lone"] = {"backends": [{"provider": provider, "model": "up-model"}]}
    return raw


async def post(
    url: str, body: dict[str, Any], within: float = SDK_TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """POST a chat to the gateway at ``url``: status, headers, whole body."""
    async with (
        asyncio.timeout(within),
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json=body, headers=AUTH) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def events_of(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


def error_events(body: bytes) -> list[dict[str, Any]]:
    """The ``data: {"error": ...}`` events of a stream body, parsed."""
    found = []
    for event in events_of(body):
        data = event.removeprefix(b"data: ")
        if data.startswith(b"{") and b'"error"' in data:
            parsed = orjson.loads(data)
            if "error" in parsed:
                found.append(parsed)
    return found


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key=ADMIN_TOKEN, max_retries=0, timeout=SDK_TIMEOUT
    )


async def sdk_stream(client: openai.AsyncOpenAI, model: str = "gpt-test") -> tuple[str, Any]:
    """A streamed chat through the SDK: the text it assembled, and the response headers."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, stream=True
    )
    texts = [chunk.choices[0].delta.content or "" async for chunk in raw.parse() if chunk.choices]
    return "".join(texts), raw.headers


async def sdk_error(call: Awaitable[Any]) -> openai.APIStatusError:
    """The SDK's exception for a request that must fail."""
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    return caught.value


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body: dict[str, Any] = exc.response.json()
    error: dict[str, Any] = body["error"]
    return error


async def idle_rss(gateway: GatewayProcess) -> float:
    """The gateway's RSS (MiB) once it has served a normal request."""
    status, _, _ = await post(gateway.url, {**CHAT, "model": "warm"})
    assert status == 200
    return gateway.rss_mib


def assert_memory_bounded(gateway: GatewayProcess, idle: float, what: str) -> None:
    peak, now = gateway.peak_rss_mib, gateway.rss_mib
    assert peak < idle + RSS_HEADROOM_MIB, (
        f"{what}: peak RSS {peak:.0f} MiB, idle {idle:.0f} MiB (now {now:.0f} MiB)"
    )


def with_warm_model(raw: dict[str, Any], provider: str) -> dict[str, Any]:
    """Model ``warm`` on ``provider``: a normal request for the idle RSS measure."""
    raw["models"]["warm"] = {"backends": [{"provider": provider, "model": "up-model"}]}
    return raw


# --------------------------------------------------------------------------------------
# 1. An unterminated line
# --------------------------------------------------------------------------------------


async def test_unterminated_line_before_commit_fails_over_invisibly(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory, upstream2: FakeUpstream
) -> None:
    hostile = await serve(aiohttp_server, UnterminatedLine())
    server = await start_gateway(failover_config(hostile.upstream(), upstream2))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        text, headers = await sdk_stream(client)
    finally:
        await client.close()
    assert text == CONTENT
    assert headers["x-berry-provider"] == "up2"
    assert headers["x-berry-attempts"] == "2"

    status, raw_headers, body = await post(base_url(server), STREAM_CHAT)
    assert status == 200
    assert raw_headers["X-Berry-Provider"] == "up2"
    assert body == FULL_STREAM  # the whole healthy stream, [DONE] included, nothing else

    # The gateway hung up on the hostile upstream, having read about max_event_bytes.
    await hostile.until(hostile.settled)
    assert hostile.answers == 2
    assert hostile.cut == 2
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most} bytes read of an endless line"


async def test_unterminated_line_with_a_single_backend_is_a_502(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    hostile = await serve(aiohttp_server, UnterminatedLine())
    server = await start_gateway(gateway_config(hostile.upstream()))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        exc = await sdk_error(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        )
    finally:
        await client.close()
    assert exc.status_code == 502
    error = error_of(exc)
    assert error["code"] == "upstream_error"
    assert error["details"]["attempts"] == int(exc.response.headers["x-berry-attempts"])
    await hostile.until(hostile.settled)
    assert hostile.cut == hostile.answers == error["details"]["attempts"]
    assert hostile.finished == 0
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most} bytes read of an endless line"


async def test_unterminated_event_after_commit_ends_with_one_error_event(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    hostile = await serve(aiohttp_server, UnterminatedLine(commit_first=True))
    server = await start_gateway(gateway_config(hostile.upstream()))
    status, _, body = await post(base_url(server), STREAM_CHAT)
    assert status == 200
    events = events_of(body)
    assert b'"content":"Hello"' in events[1]
    errors = error_events(body)
    assert len(errors) == 1
    assert events[-1].removeprefix(b"data: ") == orjson.dumps(errors[0])
    assert errors[0]["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in body
    assert b"xxxx" not in body  # not a byte of the unterminated event reached the client
    await hostile.until(hostile.settled)
    assert hostile.cut == hostile.answers == 1
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most} bytes read of an endless line"


async def test_unterminated_lines_leave_gateway_memory_bounded(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory
) -> None:
    hostile = await serve(aiohttp_server, UnterminatedLine())
    raw = with_warm_model(gateway_config(hostile.upstream()), "up1")
    gateway = await gateway_process(raw)
    idle = await idle_rss(gateway)

    # Hostile streams (before and after the commit) alternate with ordinary requests to
    # the same backend, until the upstream has pushed over 200 MB at the gateway.
    requests = 0
    async with asyncio.timeout(40):
        while hostile.sent < 200 * 1000 * 1000 and requests < 400:
            hostile.commit_first = requests % 4 == 2
            status, _, body = await post(gateway.url, STREAM_CHAT)
            if requests % 4 == 2:
                assert status == 200
                assert len(error_events(body)) == 1
                assert b"[DONE]" not in body
            else:
                assert status == 502, body[:300]
            status, _, body = await post(gateway.url, CHAT)
            assert status == 200, body[:300]
            requests += 2
            await hostile.until(hostile.settled)
    assert hostile.sent >= 200 * 1000 * 1000
    assert_memory_bounded(gateway, idle, f"after {hostile.sent / MIB:.0f} MiB unterminated")
    assert hostile.finished == 0
    assert hostile.cut == hostile.answers
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most} bytes read of an endless line"


# --------------------------------------------------------------------------------------
# 2. An endless firehose towards a client that stopped reading
# --------------------------------------------------------------------------------------


def raw_request(port: int, body: dict[str, Any]) -> bytes:
    payload = orjson.dumps(body)
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


async def stalled_client(port: int, body: dict[str, Any]) -> socket.socket:
    """A raw socket that sends ``body`` as a chat request and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, raw_request(port, body))
    return sock


async def read_to_the_end(sock: socket.socket, within: float = 10.0) -> int:
    """Read what is left until the peer closed; the byte count. Fails after ``within``."""
    loop = asyncio.get_running_loop()
    total = 0
    async with asyncio.timeout(within):
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 20)
            except ConnectionResetError:
                return total
            if not data:
                return total
            total += len(data)


async def access_line(gateway: GatewayProcess, within: float = 5.0) -> dict[str, Any]:
    """The access log line of the stream request (another process writes it: poll)."""
    async with asyncio.timeout(within):
        while True:
            for line in gateway.log_lines():
                if line.get("event") == "request" and line.get("stream") is True:
                    return line
            await asyncio.sleep(0.05)


async def test_firehose_to_a_client_that_stopped_reading(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory
) -> None:
    hostile = await serve(aiohttp_server, Firehose())
    raw = with_warm_model(gateway_config(hostile.upstream()), "up1")
    raw["providers"]["up1"]["idle_timeout_seconds"] = 1
    gateway = await gateway_process(raw)
    idle = await idle_rss(gateway)

    sock = await stalled_client(gateway.port, STREAM_CHAT)
    try:
        stalled_at = time.monotonic()
        await hostile.until(lambda: hostile.answers == 1 and hostile.first_write_at is not None)
        # Meanwhile another request to the same provider is served at once.
        started = time.monotonic()
        status, headers, _ = await post(gateway.url, CHAT, within=5)
        latency = time.monotonic() - started
        assert status == 200
        assert headers["X-Berry-Provider"] == "up1"
        assert latency < 0.75, f"a normal request took {latency:.2f} s"
        assert hostile.cut == 0, "the stalled client was dropped before the idle limit"

        # The gateway gives up on the stalled client after the idle limit (1 s) and closes
        # the upstream connection instead of draining it into memory.
        await hostile.until(lambda: hostile.answers == 1 and hostile.settled(), within=15)
        assert hostile.cut == 1, "the upstream was never cut off"
        assert hostile.cut_at is not None
        held = hostile.cut_at - stalled_at
        assert 1.0 <= held < 5.0, f"stalled client held for {held:.2f} s"
        assert_memory_bounded(gateway, idle, f"after {hostile.sent / MIB:.0f} MiB firehose")
        assert hostile.sent < 256 * MIB, f"the gateway took {hostile.sent / MIB:.0f} MiB"
        # ... and it dropped the client's connection: the client sees its end.
        leftover = await read_to_the_end(sock)
        assert leftover < 256 * MIB
    finally:
        sock.close()
    line = await access_line(gateway)
    assert line["abort_reason"] == "client_stalled"


async def test_stalled_client_frees_its_connection_slot(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    hostile = await serve(aiohttp_server, Firehose())
    raw = gateway_config(hostile.upstream())
    raw["providers"]["up1"]["idle_timeout_seconds"] = 1
    raw["providers"]["up1"]["max_connections"] = 1
    server = await start_gateway(raw)
    assert server.port is not None
    sock = await stalled_client(server.port, STREAM_CHAT)
    try:
        await hostile.until(lambda: hostile.answers == 1 and hostile.settled(), within=15)
        assert hostile.cut == 1
        # The only slot is free again: the next request is served, not refused 503.
        status, _, body = await post(base_url(server), CHAT, within=5)
        assert status == 200, body[:300]
    finally:
        sock.close()


# --------------------------------------------------------------------------------------
# 3. A 400 MB non-stream body
# --------------------------------------------------------------------------------------


async def test_400_mb_body_fails_over_or_502_and_memory_stays_small(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory, upstream2: FakeUpstream
) -> None:
    hostile = await serve(aiohttp_server, HugeBody())
    raw = with_lone_model(failover_config(hostile.upstream(), upstream2))
    raw = with_warm_model(raw, "up2")
    raw["providers"]["up1"]["max_response_bytes"] = MIB
    gateway = await gateway_process(raw)
    idle = await idle_rss(gateway)

    client = sdk(gateway.url)
    try:
        answer = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
        assert answer.parse().choices[0].message.content == CONTENT
        assert answer.headers["x-berry-provider"] == "up2"
        assert answer.headers["x-berry-attempts"] == "2"

        exc = await sdk_error(client.chat.completions.create(model="lone", messages=MESSAGES))
    finally:
        await client.close()
    assert exc.status_code == 502
    assert error_of(exc)["code"] == "upstream_error"
    await hostile.until(hostile.settled)
    assert_memory_bounded(gateway, idle, f"after {hostile.answers} bodies of 400 MB")
    assert hostile.finished == 0, "the gateway read a 400 MB body to its end"
    assert hostile.cut == hostile.answers >= 2
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most / MIB:.0f} MiB read of 400 MB"


# --------------------------------------------------------------------------------------
# 4. A gzip bomb
# --------------------------------------------------------------------------------------


async def test_gzip_bomb_answer_fails_over_or_502_and_memory_stays_small(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory, upstream2: FakeUpstream
) -> None:
    assert len(gzip_bomb()) < 2 * MIB
    assert inflated_size(gzip_bomb()) >= 300 * 1000 * 1000  # a bomb indeed
    hostile = await serve(aiohttp_server, GzipBomb())
    raw = with_lone_model(failover_config(hostile.upstream(), upstream2))
    raw = with_warm_model(raw, "up2")
    raw["providers"]["up1"]["max_response_bytes"] = MIB
    gateway = await gateway_process(raw)
    idle = await idle_rss(gateway)

    client = sdk(gateway.url)
    try:
        answer = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
        assert answer.parse().choices[0].message.content == CONTENT
        assert answer.headers["x-berry-provider"] == "up2"
        assert answer.headers["x-berry-attempts"] == "2"
        exc = await sdk_error(client.chat.completions.create(model="lone", messages=MESSAGES))
    finally:
        await client.close()
    assert exc.status_code == 502
    assert error_of(exc)["code"] == "upstream_error"
    assert hostile.bombs >= 2
    assert_memory_bounded(gateway, idle, f"after {hostile.bombs} gzip bombs")


async def test_gzip_bomb_event_stream_fails_over_or_502_and_memory_stays_small(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory, upstream2: FakeUpstream
) -> None:
    gzip_bomb()  # built before the gateway starts
    hostile = await serve(aiohttp_server, GzipBomb())
    raw = with_lone_model(failover_config(hostile.upstream(), upstream2))
    raw = with_warm_model(raw, "up2")
    gateway = await gateway_process(raw)  # max_event_bytes: the 1 MiB default
    idle = await idle_rss(gateway)

    client = sdk(gateway.url)
    try:
        text, headers = await sdk_stream(client)
        assert text == CONTENT
        assert headers["x-berry-provider"] == "up2"
        assert headers["x-berry-attempts"] == "2"
        exc = await sdk_error(
            client.chat.completions.create(model="lone", messages=MESSAGES, stream=True)
        )
    finally:
        await client.close()
    assert exc.status_code == 502
    assert error_of(exc)["code"] == "upstream_error"
    assert hostile.bombs >= 2
    assert_memory_bounded(gateway, idle, f"after {hostile.bombs} gzip-bombed streams")


async def test_gzip_bomb_model_list_keeps_the_prober_small(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory
) -> None:
    gzip_bomb()  # built before the clock starts
    hostile = await serve(aiohttp_server, GzipBomb())
    raw = gateway_config(hostile.upstream(), health_check_interval_seconds=1)
    gateway = await gateway_process(raw)
    await hostile.until(lambda: hostile.probes >= 1)  # the start-up round, unarmed
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/health") as response:
            assert response.status == 200
        idle = gateway.rss_mib
        hostile.armed = True
        await hostile.until(lambda: hostile.bombs >= 3, within=10)
        async with session.get(gateway.url + "/health") as response:
            health = await response.json()
    assert "up1" in health["providers"]
    assert health["providers"]["up1"]["last_check"] is not None
    assert_memory_bounded(gateway, idle, f"after {hostile.bombs} bombs to the prober")


# --------------------------------------------------------------------------------------
# 5. Comments-only thinking
# --------------------------------------------------------------------------------------

KEEP_ALIVE = b": keep-alive\n\n"


@dataclass
class Thinker:
    """Streams ``: keep-alive`` comments every ``every`` s for ``think`` s (before the
    first content, or with ``after_commit`` after the first content chunk), then the
    rest; with ``silent``, sends nothing at all for ``think`` s first."""

    think: float = 2.5
    every: float = 0.3
    after_commit: bool = False
    silent: bool = False
    requests: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def _think(self, response: web.StreamResponse) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.think
        for _ in range(int(self.think / self.every) + 2):
            if loop.time() >= until:
                return
            await asyncio.sleep(self.every)  # the model thinking: paced on purpose
            if not self.silent:
                await response.write(KEEP_ALIVE)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        events = stream_events(include_usage=False)
        response = event_stream()
        try:
            if self.silent:
                await self._think(response)  # nothing is sent, not even headers
            await response.prepare(request)
            if self.after_commit:
                await response.write(b"".join(events[:2]))
                events = events[2:]
            if not self.silent:
                await self._think(response)
            for event in events:
                await response.write(event)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        await response.write_eof()
        return response


def thinking_config(thinker: TestServer, backup: FakeUpstream) -> dict[str, Any]:
    raw = failover_config(FakeUpstream(server=thinker), backup)
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 1
    raw["providers"]["up1"]["idle_timeout_seconds"] = 1
    return raw


async def test_comments_only_thinking_is_not_a_failure(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory, upstream2: FakeUpstream
) -> None:
    thinker = Thinker(think=2.5)
    server = await start_gateway(thinking_config(await aiohttp_server(thinker.app()), upstream2))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        started = time.monotonic()
        text, headers = await sdk_stream(client)
        took = time.monotonic() - started
    finally:
        await client.close()
    assert text == CONTENT
    assert headers["x-berry-provider"] == "up1"
    assert headers["x-berry-attempts"] == "1"
    assert thinker.requests == 1
    assert upstream2.requests == []
    assert took >= 2.5  # it did think that long


async def test_comments_after_the_commit_keep_the_stream_alive(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory, upstream2: FakeUpstream
) -> None:
    thinker = Thinker(think=2.0, after_commit=True)
    server = await start_gateway(thinking_config(await aiohttp_server(thinker.app()), upstream2))
    status, headers, body = await post(base_url(server), STREAM_CHAT)
    assert status == 200
    assert headers["X-Berry-Attempts"] == "1"
    assert error_events(body) == []
    assert body.endswith(b"data: [DONE]\n\n")
    data = [e for e in events_of(body) if e.startswith(b"data: {")]
    assert data == [e.removesuffix(b"\n\n") for e in stream_events(include_usage=False)[:-1]]


async def test_silence_past_the_first_byte_timeout_fails_over(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory, upstream2: FakeUpstream
) -> None:
    thinker = Thinker(think=3.0, silent=True)
    server = await start_gateway(thinking_config(await aiohttp_server(thinker.app()), upstream2))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        started = time.monotonic()
        text, headers = await sdk_stream(client)
        took = time.monotonic() - started
    finally:
        await client.close()
    assert text == CONTENT
    assert headers["x-berry-provider"] == "up2"
    assert headers["x-berry-attempts"] == "2"
    assert 1.0 <= took < 2.5, f"failover after {took:.2f} s (first-byte limit 1 s)"
    await asyncio.wait_for(thinker.disconnected.wait(), 5)  # the silent one was closed


# --------------------------------------------------------------------------------------
# 6. An upstream that echoes the provider's key
# --------------------------------------------------------------------------------------

ECHO_ERROR = orjson.dumps(
    {
        "error": {
            "message": f"Incorrect API key provided: {UPSTREAM_KEY}. Context too long.",
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_error_body_echoing_the_key_is_redacted(
    upstream: FakeUpstream, start_gateway: GatewayFactory, stream: bool
) -> None:
    upstream.mode = "status"
    upstream.status_code = 400
    upstream.error_body = ECHO_ERROR
    upstream.extra_headers = {"X-Debug-Authorization": f"Bearer {UPSTREAM_KEY}"}
    server = await start_gateway(gateway_config(upstream))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        exc = await sdk_error(
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=stream)
        )
    finally:
        await client.close()
    assert isinstance(exc, openai.BadRequestError)  # the caller's error, passed through
    text = exc.response.text
    assert UPSTREAM_KEY not in text
    assert "[REDACTED]" in text
    error = error_of(exc)  # still valid JSON
    assert error["message"] == "Incorrect API key provided: [REDACTED]. Context too long."
    assert error["code"] == "context_length_exceeded"
    for name, value in exc.response.headers.items():
        assert UPSTREAM_KEY not in value, name


@dataclass
class KeyEcho:
    """A stream whose content, and whose final error event, quote the provider's key
    (one event is written in two halves that split the key); a non-stream answer
    whose content quotes it."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await chat_body(request)
        if not body.get("stream"):
            answer = chat_completion(body["model"])
            answer["choices"][0]["message"]["content"] = f"your key is {UPSTREAM_KEY}"
            return web.json_response(answer)
        response = event_stream()
        await response.prepare(request)
        await response.write(chat_chunk({"role": "assistant", "content": ""}))
        await response.write(chat_chunk({"content": f"your key is {UPSTREAM_KEY}"}))
        split = chat_chunk({"content": f" and again {UPSTREAM_KEY}!"})
        cut = split.index(UPSTREAM_KEY.encode()) + 6
        await response.write(split[:cut])
        await asyncio.sleep(0.05)  # let the halves arrive as two reads (either way is fine)
        await response.write(split[cut:])
        await response.write(
            b"data: " + orjson.dumps({"error": {"message": f"key {UPSTREAM_KEY} revoked"}})
        )
        await response.write(b"\n\n")
        await response.write_eof()
        return response


async def collect_stream(client: openai.AsyncOpenAI, texts: list[str]) -> None:
    """Stream a chat through the SDK, appending each content delta to ``texts``."""
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")


async def test_stream_events_echoing_the_key_are_redacted(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    echo = await aiohttp_server(KeyEcho().app())
    server = await start_gateway(gateway_config(FakeUpstream(server=echo)))
    status, _, body = await post(base_url(server), STREAM_CHAT)
    assert status == 200
    assert UPSTREAM_KEY.encode() not in body
    payloads = [orjson.loads(e.removeprefix(b"data: ")) for e in events_of(body)]  # valid
    contents = [p["choices"][0]["delta"].get("content") for p in payloads if p.get("choices")]
    assert contents[1:] == ["your key is [REDACTED]", " and again [REDACTED]!"]
    assert payloads[-1] == {"error": {"message": "key [REDACTED] revoked"}}

    # The SDK's view of the same stream: the text it assembles carries no key either.
    client = sdk_for(server, ADMIN_TOKEN)
    texts: list[str] = []
    try:
        with pytest.raises(openai.APIError) as caught:
            await collect_stream(client, texts)
    finally:
        await client.close()
    assert "".join(texts) == "your key is [REDACTED] and again [REDACTED]!"
    assert UPSTREAM_KEY not in str(caught.value)


async def test_a_200_answer_echoing_the_key_is_redacted(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    echo = await aiohttp_server(KeyEcho().app())
    server = await start_gateway(gateway_config(FakeUpstream(server=echo)))
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
    finally:
        await client.close()
    assert UPSTREAM_KEY not in raw.text
    assert raw.parse().choices[0].message.content == "your key is [REDACTED]"


# --------------------------------------------------------------------------------------
# 7. A huge Retry-After
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["1000000000", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_huge_retry_after_is_capped_at_an_hour(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    retry_after: str,
) -> None:
    for fake in (upstream, upstream2):
        fake.mode = "status"
        fake.status_code = 429
        fake.error_body = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
        fake.extra_headers = {"Retry-After": retry_after}
    clock = FakeClock()
    server = await start_gateway(failover_config(upstream, upstream2), clock=clock)
    pool = server.app[keys.GATEWAY].runtime.pool
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        exc = await sdk_error(client.chat.completions.create(model="gpt-test", messages=MESSAGES))
        assert isinstance(exc, openai.RateLimitError)
        assert exc.status_code == 429
        error = error_of(exc)
        assert error["code"] == "upstream_rate_limited"
        told = int(exc.response.headers["retry-after"])
        assert 1 <= told <= MAX_RETRY_AFTER_SECONDS
        assert error["details"]["retry_after"] == told
        for pid in ("up1", "up2"):
            cooling = pool.providers[pid].cooldown_until - clock()
            assert 0 < cooling <= MAX_RETRY_AFTER_SECONDS, (pid, cooling)

        # Within the hour up1 is avoided; once it has passed, both are back in rotation.
        upstream.mode = upstream2.mode = "ok"
        clock.now += MAX_RETRY_AFTER_SECONDS + 1
        answer = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
        assert answer.headers["x-berry-provider"] == "up1"
        assert answer.headers["x-berry-attempts"] == "1"

        # Only up1 says "come back in a billion seconds" now (other-model is up1 alone).
        upstream.mode = "status"
        exc = await sdk_error(
            client.chat.completions.create(model="other-model", messages=MESSAGES)
        )
        assert int(exc.response.headers["retry-after"]) <= MAX_RETRY_AFTER_SECONDS
        upstream.mode = "ok"
        clock.now += MAX_RETRY_AFTER_SECONDS - 1
        answer = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
        assert answer.headers["x-berry-provider"] == "up2"  # up1 is still cooling down
        clock.now += 2
        answer = await client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES
        )
        assert answer.headers["x-berry-provider"] == "up1"  # back after at most an hour
    finally:
        await client.close()


# --------------------------------------------------------------------------------------
# 8. A redirect
# --------------------------------------------------------------------------------------


@dataclass
class Redirector:
    """Answers every chat with ``status`` to ``target`` (a FakeUpstream: it records
    whatever reaches it)."""

    target: str = ""
    status: int = 307

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=self.status,
            headers={"Location": self.target, "Content-Type": "application/json"},
            body=orjson.dumps({"moved_to": self.target}),
        )


async def redirecting_pair(
    aiohttp_server: ServerFactory, status: int
) -> tuple[FakeUpstream, FakeUpstream]:
    """A redirecting upstream and the server its Location names."""
    target = FakeUpstream()
    target.server = await aiohttp_server(target.app())
    location = f"{target.url}/v1/chat/completions?leak=internal-host"
    redirector = Redirector(target=location, status=status)
    return FakeUpstream(server=await aiohttp_server(redirector.app())), target


@pytest.mark.parametrize("status", [307, 301])
@pytest.mark.parametrize("stream", [False, True])
async def test_redirect_is_a_failure_and_its_location_never_reaches_the_client(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    upstream2: FakeUpstream,
    stream: bool,
    status: int,
) -> None:
    redirecting, target = await redirecting_pair(aiohttp_server, status)
    raw = with_lone_model(failover_config(redirecting, upstream2))
    server = await start_gateway(raw)
    body = {**CHAT, "stream": stream}
    code, headers, answer = await post(base_url(server), body)
    assert code == 200
    assert headers["X-Berry-Provider"] == "up2"
    assert headers["X-Berry-Attempts"] == "2"
    assert "Location" not in headers
    assert b"leak=internal-host" not in answer
    if stream:
        assert answer == FULL_STREAM
    else:
        assert orjson.loads(answer)["choices"][0]["message"]["content"] == CONTENT

    code, headers, answer = await post(base_url(server), {**body, "model": "lone"})
    assert code == 502
    assert orjson.loads(answer)["error"]["code"] == "upstream_error"
    assert "Location" not in headers
    assert b"leak=internal-host" not in answer
    assert target.url.removeprefix("http://").encode() not in answer
    assert target.requests == []  # the redirect was never followed


# --------------------------------------------------------------------------------------
# 9. Answers that are not HTTP, or not whole
# --------------------------------------------------------------------------------------


def broken_reply(kind: str, stream: bool) -> bytes:
    """Raw bytes a broken upstream answers with."""
    content_type = b"text/event-stream" if stream else b"application/json"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\n"
    if kind == "not_http":
        return b"SSH-2.0-OpenSSH_9.6\r\n"
    if kind == "huge_header":
        return head + b"X-Junk: " + b"a" * MIB + b"\r\nContent-Length: 2\r\n\r\n{}"
    assert kind == "short_body"  # promises 100000 bytes, sends a few, hangs up
    return head + b"Content-Length: 100000\r\n\r\n" + b'data: {"id": "chatcmpl-'


@contextlib.asynccontextmanager
async def raw_upstream(reply: bytes) -> AsyncIterator[str]:
    """A TCP server that reads one request, answers ``reply`` and hangs up; its URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)  # all of it: no reset before the reply
            writer.write(reply)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", ["not_http", "huge_header", "short_body"])
@pytest.mark.parametrize("stream", [False, True])
async def test_broken_http_from_the_upstream_fails_over_or_502_never_500(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    kind: str,
    stream: bool,
) -> None:
    async with raw_upstream(broken_reply(kind, stream)) as url:
        raw = with_lone_model(failover_config(upstream, upstream2))
        raw["providers"]["up1"]["base_url"] = url
        server = await start_gateway(raw)
        body = {**CHAT, "stream": stream}
        code, headers, answer = await post(base_url(server), body)
        assert code == 200, answer[:300]
        assert headers["X-Berry-Provider"] == "up2"
        assert headers["X-Berry-Attempts"] == "2"
        if stream:
            assert answer == FULL_STREAM
        else:
            assert orjson.loads(answer)["choices"][0]["message"]["content"] == CONTENT

        code, _, answer = await post(base_url(server), {**body, "model": "lone"})
        assert code == 502, answer[:300]
        assert orjson.loads(answer)["error"]["code"] == "upstream_error"
    assert upstream.requests == []  # up1's fake never served: the raw server did


# --------------------------------------------------------------------------------------
# 10. Failure bodies, oversize error bodies, a usage member of tiny objects
# --------------------------------------------------------------------------------------


@dataclass
class HugeFailure(Hostile):
    """Answers every chat with ``status`` and a 400 MB body behind it."""

    status: int = 500

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            status=self.status, headers={"Content-Type": "application/json"}
        )
        response.content_length = HUGE_BODY_BYTES
        head = b'{"error": {"message": "'
        return await self.push(request, response, head, FILLER, HUGE_BODY_BYTES - len(head))


@pytest.mark.parametrize(("status", "stream"), [(500, False), (429, False), (503, True)])
async def test_a_failures_body_is_never_read(
    aiohttp_server: ServerFactory,
    upstream2: FakeUpstream,
    start_gateway: GatewayFactory,
    status: int,
    stream: bool,
) -> None:
    """The status says all: with the default 128 MiB answer limit, the gateway still
    closes the connection at once instead of reading up to the limit to throw it away."""
    hostile = await serve(aiohttp_server, HugeFailure(status=status))
    server = await start_gateway(failover_config(hostile.upstream(), upstream2))
    status_seen, headers, _ = await post(base_url(server), STREAM_CHAT if stream else CHAT)
    assert (status_seen, headers["X-Berry-Provider"]) == (200, "up2")
    await hostile.until(hostile.settled)
    assert hostile.cut == hostile.answers >= 1
    assert hostile.most < CUT_EARLY_BYTES, f"{hostile.most / MIB:.0f} MiB of a failure's body"


@dataclass
class HugeCallerError(Hostile):
    """Answers a 400 "caller error" whose body is far larger than any error message."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=400, headers={"Content-Type": "application/json"})
        response.content_length = 10 * MIB
        head = b'{"error": {"message": "'
        return await self.push(request, response, head, FILLER, 10 * MIB - len(head))


@pytest.mark.parametrize("stream", [False, True])
async def test_a_caller_error_larger_than_any_message_is_a_broken_answer(
    aiohttp_server: ServerFactory,
    upstream2: FakeUpstream,
    start_gateway: GatewayFactory,
    stream: bool,
) -> None:
    hostile = await serve(aiohttp_server, HugeCallerError())
    server = await start_gateway(failover_config(hostile.upstream(), upstream2))
    status, headers, _ = await post(base_url(server), STREAM_CHAT if stream else CHAT)
    assert (status, headers["X-Berry-Provider"], headers["X-Berry-Attempts"]) == (200, "up2", "2")


@pytest.mark.parametrize("stream", [False, True])
async def test_huge_caller_errors_on_a_lone_backend_are_never_retried_nor_trip_it(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory, stream: bool
) -> None:
    """One backend, which answers every request with a 10 MiB 400 (a validation error
    echoing a huge input, say). Each request is one attempt, and however many come, the
    backend's breakers stay closed: the request may be what made the answer huge."""
    hostile = await serve(aiohttp_server, HugeCallerError())
    raw = gateway_config(hostile.upstream(), circuit_breaker_failure_threshold=2)
    server = await start_gateway(raw)
    for _ in range(4):
        status, headers, body = await post(base_url(server), STREAM_CHAT if stream else CHAT)
        assert (status, headers["X-Berry-Attempts"]) == (502, "1")
        assert orjson.loads(body)["error"]["code"] == "upstream_error"
    assert hostile.answers == 4


@dataclass
class TinyObjectsUsage(Hostile):
    """A 200 chat completion whose ``usage`` is 24 MiB of empty objects."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        body = await chat_body(request)
        answer = orjson.dumps(chat_completion(body["model"]))
        usage = b'"usage": [' + b"{}," * (8 * MIB) + b"{}]"
        self.answers += 1
        self.finished += 1
        return web.Response(
            body=answer[:-1] + b", " + usage + b"}", content_type="application/json"
        )


async def test_a_usage_member_of_tiny_objects_is_not_built_into_objects(
    aiohttp_server: ServerFactory, gateway_process: ProcessFactory, upstream2: FakeUpstream
) -> None:
    hostile = await serve(aiohttp_server, TinyObjectsUsage())
    raw = with_warm_model(with_lone_model(gateway_config(hostile.upstream(), upstream2)), "up2")
    gateway = await gateway_process(raw)
    idle = await idle_rss(gateway)
    status, _, body = await post(gateway.url, {**CHAT, "model": "lone"})
    assert status == 200
    assert orjson.loads(body)["choices"][0]["message"]["content"] == CONTENT
    size_mib = len(body) / MIB
    # The answer is held and written (a few copies of 24 MiB); decoding its usage into
    # Python objects cost ~600 MiB more.
    assert gateway.peak_rss_mib - idle < 4 * size_mib + RSS_HEADROOM_MIB, (idle, size_mib)
