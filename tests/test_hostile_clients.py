"""The gateway against hostile, slow and broken clients (issue 7; SPEC §2 "Error shape", §5).

Each test plays one kind of client a gateway meets on the open internet and checks what a
user would notice: the answer that client gets (status, the SPEC envelope, headers, whether
the connection was closed and when), whether the gateway keeps serving everybody else (a
later request's status and latency, a breaker that is not left stuck, a connection slot
that is given back), the gateway's memory (``VmRSS`` and ``VmHWM`` from
``/proc/PID/status`` of a ``berry-proxy serve`` process) where memory is the point, and
that process's real log output where logging is.

Covered:

1. bad bytes in a request head (a control byte in a bearer token, an oversize line that
   carries one): 400 (431) in the envelope, closed, one redacted JSON log line, no request
   byte and no traceback in the process output;
2. a header line over 8190 bytes and more than 128 headers: 431;
3. no version-revealing ``Server`` header on any kind of answer;
4. slow headers and idle keep-alive connections: cut after the keep-alive timeout;
5. a body that stops short of its ``Content-Length``: 408 after the body timeout, and the
   memory of eight such ~30 MB bodies is given back when they are answered;
6. ``Content-Length`` over ``max_body_bytes``: 413 before any body byte and before any
   ``100 Continue``; ``100 Continue`` only for an authorised request of allowed size;
   a chunked body that grows past the limit;
7. a body that is not what its ``Content-Encoding`` says: 400 ``invalid_body``, and one
   access line for it in the log, no error;
8. JSON nested 1000+ levels deep: 400 ``invalid_json``, also while a breaker is half-open
   (its trial is not left stuck); moderate nesting goes upstream byte for byte;
9. a 32 MiB body of tiny JSON objects: bounded memory, and the loop keeps serving others;
10. huge or deep values in the few fields the gateway decodes: a clean 400;
11. a client that disconnects mid-stream gives its connection slot back at once;
12. a client that stops reading a large answer (unary or stream) is dropped after the
    provider's idle limit, and its slot is given back.

Raw-socket clients (``RawClient``) send exact bytes to 127.0.0.1 and read exact bytes back;
every read and every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import re
import socket
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import openai
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from berry_proxy import keys

from .conftest import (
    ADMIN_TOKEN,
    CHAT_CONTENT,
    AccessLines,
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
)

MIB = 1024 * 1024
CONTENT = "".join(CHAT_CONTENT)
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello"}
]
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES}
CHAT_BODY = orjson.dumps(CHAT)
AUTH = ("Authorization", f"Bearer {ADMIN_TOKEN}")
JSON = ("Content-Type", "application/json")
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# A raw read that gets nothing for this long fails the test instead of hanging it.
READ_TIMEOUT = 10.0
# Small limits, so that a test which waits for one stays short.
KEEPALIVE_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0


# --------------------------------------------------------------------------------------
# A raw HTTP/1.1 client
# --------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status_line: bytes
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[bytes] = field(default_factory=list)  # 1xx status lines before this one

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    def json(self) -> Any:
        return orjson.loads(self.body)


class Closed(Exception):
    """The peer closed the connection before a whole response arrived."""


class RawClient:
    """One TCP connection to the gateway; sends exact bytes, reads exact responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def try_send(self, data: bytes) -> bool:
        """Send ``data``; False when the gateway has already closed the connection."""
        try:
            await self.send(data)
        except ConnectionError:
            return False
        return True

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise Closed(f"connection closed mid-line after {line[:80]!r}")
        return line[:-2]

    async def _head(self) -> tuple[bytes, int, list[tuple[str, str]]]:
        status_line = await self._line()
        parts = status_line.split(b" ", 2)
        assert parts[0] in (b"HTTP/1.1", b"HTTP/1.0"), status_line[:80]
        headers: list[tuple[str, str]] = []
        for _ in range(200):  # bounded: a response head has far fewer lines
            line = await self._line()
            if not line:
                return status_line, int(parts[1]), headers
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        raise AssertionError("a response head of more than 200 lines")

    async def status_line(self, within: float = READ_TIMEOUT) -> bytes:
        """Only the next status line (for ``100 Continue`` and its headers, if any)."""
        async with asyncio.timeout(within):
            status_line, _, _ = await self._head()
        return status_line

    async def response(self, within: float = READ_TIMEOUT) -> RawResponse:
        """The next whole final response, with the 1xx status lines that preceded it."""
        interim: list[bytes] = []
        async with asyncio.timeout(within):
            for _ in range(10):
                status_line, status, headers = await self._head()
                if 100 <= status < 200:
                    interim.append(status_line)
                    continue
                body = await self._body(status, headers)
                return RawResponse(status_line, status, headers, body, interim)
        raise AssertionError(f"ten interim responses: {interim}")

    async def _body(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lower = {k.lower(): v for k, v in headers}
        if status in (204, 304):
            return b""
        if "content-length" in lower:
            return await self.reader.readexactly(int(lower["content-length"]))
        if lower.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            for _ in range(100_000):  # bounded: far more chunks than any answer here
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    await self._line()  # no trailers: the empty line
                    return bytes(body)
                body += await self.reader.readexactly(size)
                await self._line()
            raise AssertionError("more than 100000 chunks")
        return await self.reader.read()  # until EOF

    async def closed_within(self, seconds: float) -> float:
        """Seconds (since the connection opened) until the gateway closed it; fails the
        test if it is still open after ``seconds`` more. Anything still sent is read and
        dropped (at most 1 MiB)."""
        received = 0
        try:
            async with asyncio.timeout(seconds):
                while received <= MIB:
                    data = await self.reader.read(65536)
                    if not data:
                        break
                    received += len(data)
        except TimeoutError:
            raise AssertionError(f"the gateway kept the connection open {seconds} s") from None
        except ConnectionError:
            pass
        assert received <= MIB, "the gateway kept sending after the answer"
        return time.monotonic() - self.opened

    def abort(self) -> None:
        """Drop the connection at once (RST), as a crashed client does."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_connection(port: int | None) -> AsyncIterator[RawClient]:
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = RawClient(reader, writer)
    try:
        yield client
    finally:
        await client.close()


def http_head(method: str, path: str, headers: Sequence[tuple[str, str | bytes]] = ()) -> bytes:
    """A request head (through the blank line) with ``Host`` first."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    for name, value in headers:
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    return b"\r\n".join(lines) + b"\r\n\r\n"


def chat_request(body: bytes = CHAT_BODY, *extra: tuple[str, str | bytes]) -> bytes:
    head = http_head(
        "POST", "/v1/chat/completions", [AUTH, JSON, ("Content-Length", str(len(body))), *extra]
    )
    return head + body


def assert_envelope(response: RawResponse, status: int, type_: str, code: str) -> dict[str, Any]:
    """The SPEC §2 error envelope, its JSON content type and a sane ``X-Request-ID``."""
    assert response.status == status, (response.status_line, response.body[:300])
    content_type = response.header("Content-Type") or ""
    assert content_type.startswith("application/json"), content_type
    request_id = response.header("X-Request-ID")
    assert request_id is not None, response.headers
    assert SANE_REQUEST_ID.fullmatch(request_id), request_id
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error), error
    assert (error["type"], error["code"]) == (type_, code), error
    return dict(error)


async def envelope_of(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The same for an ``aiohttp`` response (type ``invalid_request``: every 4xx here)."""
    text = await response.text()
    assert response.status == status, text[:300]
    assert response.content_type == "application/json"
    assert SANE_REQUEST_ID.fullmatch(response.headers.get("X-Request-ID", "")), response.headers
    error = orjson.loads(text)["error"]
    assert {"type", "code", "message", "param"} <= set(error), error
    assert (error["type"], error["code"]) == ("invalid_request", code), error
    return dict(error)


async def chat_ok(server_url: str, within: float = 5.0) -> float:
    """One small chat request through the SDK; its latency. Fails unless it is a 200."""
    client = openai.AsyncOpenAI(
        base_url=server_url + "/v1", api_key=ADMIN_TOKEN, max_retries=0, timeout=within
    )
    try:
        started = time.monotonic()
        answer = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        latency = time.monotonic() - started
    finally:
        await client.close()
    assert answer.choices[0].message.content == CONTENT
    return latency


# --------------------------------------------------------------------------------------
# An upstream that reads bodies as bytes (it never builds a JSON tree of them)
# --------------------------------------------------------------------------------------


@dataclass
class Sink:
    """An OpenAI-compatible chat upstream that reads each request body as bytes and
    answers a fixed completion. ``keep`` keeps whole bodies (for byte comparisons);
    otherwise only their sizes, so that 32 MiB bodies cost the test process nothing."""

    keep: bool = True
    bodies: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.respond)
        return app

    async def respond(self, request: web.Request) -> web.Response:
        size = 0
        kept = bytearray()
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if self.keep:
                kept += chunk
        self.sizes.append(size)
        if self.keep:
            self.bodies.append(bytes(kept))
        return web.json_response(chat_completion("up-model"))

    def config(self) -> dict[str, Any]:
        """``gateway_config`` with this sink as provider ``up1``."""
        assert self.server is not None
        return gateway_config(FakeUpstream(server=self.server))


@pytest.fixture
async def sink(aiohttp_server: ServerFactory) -> Sink:
    fake = Sink()
    fake.server = await aiohttp_server(fake.app())
    return fake


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_chat(depth: int) -> bytes:
    """A chat body whose one message's content is an array nested ``depth`` levels."""
    return b'{"model":"gpt-test","messages":[{"role":"user","content":' + nested(depth) + b"}]}"


# --------------------------------------------------------------------------------------
# 1-3. Request heads the parser cannot read; the Server header
# --------------------------------------------------------------------------------------

SECRET = "sk-client-secret-Zq7Xw3Vb9Nm2Lk5Jh8Gf"
MARKER = "hostile-marker-5f1e9c"


def _bad_heads() -> list[tuple[str, bytes, int, str]]:
    token = SECRET.encode()
    query = f"/v1/chat/completions?{MARKER}=1"
    return [
        (
            "control byte in a bearer token",
            http_head(
                "POST",
                query,
                [
                    ("Authorization", b"Bearer " + token[:12] + b"\x01" + token[12:]),
                    ("X-Trace", MARKER),
                    ("Content-Length", "2"),
                ],
            )
            + b"{}",
            400,
            "invalid_http",
        ),
        (
            "NUL byte in a bearer token",
            http_head(
                "POST",
                query,
                [
                    ("Authorization", b"Bearer " + token + b"\x00" + MARKER.encode()),
                    ("Content-Length", "2"),
                ],
            )
            + b"{}",
            400,
            "invalid_http",
        ),
        (
            "space inside a header name",
            http_head("GET", query, [(f"X-{MARKER} Bad", SECRET)]),
            400,
            "invalid_http",
        ),
        (
            "a bearer token in a header line over 8190 bytes",
            http_head("GET", query, [("Authorization", f"Bearer {SECRET}{MARKER * 400}")]),
            431,
            "request_headers_too_large",
        ),
    ]


async def _until_logged(gateway: GatewayProcess, request_id: str, within: float = 5.0) -> None:
    """Wait until the access line of ``request_id`` is in the process's log."""
    async with asyncio.timeout(within):
        for _ in range(int(within / 0.02) + 1):
            if any(line.get("request_id") == request_id for line in gateway.log_lines()):
                return
            await asyncio.sleep(0.02)  # another process's file: nothing to await
    raise AssertionError(f"no log line for {request_id}")


async def _start_up_logged(gateway: GatewayProcess) -> None:
    """Access lines go out in batches: wait until those of the start-up checks are out,
    so that the lines a test counts after this are its own."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/v1/health", headers={"X-Request-ID": "start-up"}) as ok,
    ):
        assert ok.status == 200
    await _until_logged(gateway, "start-up")


async def test_bad_header_bytes_get_the_envelope_and_one_redacted_log_line(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(gateway_config(upstream))
    await _start_up_logged(gateway)
    for index, (case, head, status, code) in enumerate(_bad_heads()):
        lines_before = len(gateway.log_lines())
        async with raw_connection(gateway.port) as conn:
            await conn.send(head)
            response = await conn.response()
            await conn.closed_within(2.0)
        assert_envelope(response, status, "invalid_request", code)
        request_id = response.header("X-Request-ID")
        # A later request's access line: every line about the bad one is written by then.
        marker_id = f"after-bad-head-{index}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/v1/health", headers={"X-Request-ID": marker_id}) as after,
        ):
            assert after.status == 200, case
        await _until_logged(gateway, marker_id)
        new = gateway.log_lines()[lines_before:]
        about_it = new[
            : next(i for i, line in enumerate(new) if line.get("request_id") == marker_id)
        ]
        assert len(about_it) == 1, (case, about_it)
        (line,) = about_it
        assert line["request_id"] == request_id, (case, line)
        assert line["event"] == "request_unreadable", (case, line)
        assert line["status"] == status, (case, line)
        assert re.fullmatch(r"[A-Za-z]+", line["error"]), (case, line)

    output = gateway.log_path.read_bytes()
    raw_lines = [raw for raw in output.splitlines() if raw.strip()]
    for raw in raw_lines:  # stdout and stderr both: every line is one JSON object
        assert isinstance(orjson.loads(raw), dict), raw[:200]
    assert b"Traceback" not in output
    for fragment in (SECRET, SECRET[12:], SECRET[:12], MARKER):
        assert fragment.encode() not in output, fragment


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("header line over 8190 bytes", [("X-Big", "a" * 9000)]),
        ("token in a header line over 8190 bytes", [("Authorization", "Bearer " + "t" * 9000)]),
        ("129 headers", [(f"X-Many-{i}", "v") for i in range(129)]),
        ("300 headers", [(f"X-Many-{i}", "v") for i in range(300)]),
    ],
)
async def test_oversize_request_heads_get_431(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    case: str,
    headers: list[tuple[str, str]],
) -> None:
    server = await start_gateway(gateway_config(upstream))
    async with raw_connection(server.port) as conn:
        await conn.send(http_head("POST", "/v1/chat/completions", [AUTH, *headers]))
        response = await conn.response()
        await conn.closed_within(2.0)
    assert_envelope(response, 431, "invalid_request", "request_headers_too_large")
    assert upstream.requests == [], case
    assert await chat_ok(base_url(server)) < 2.0  # and the gateway serves the next one


def _assert_no_version(response: RawResponse, case: str) -> None:
    for name, value in response.headers:
        lowered = value.lower()
        assert "aiohttp" not in lowered, (case, name, value)
        assert "python" not in lowered, (case, name, value)
    assert response.header("Server") in (None, "berry-proxy"), (case, response.headers)


async def test_no_response_reveals_the_server_software_or_its_version(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["body_timeout_seconds"] = BODY_TIMEOUT
    server = await start_gateway(raw)
    stream_body = orjson.dumps({**CHAT, "stream": True})
    cases: list[tuple[str, bytes, int]] = [
        ("200 health", http_head("GET", "/v1/health"), 200),
        ("200 chat", chat_request(), 200),
        ("200 stream", chat_request(stream_body), 200),
        ("404 unknown path", http_head("GET", "/v1/nope"), 404),
        ("405 wrong method", http_head("GET", "/v1/chat/completions"), 405),
        ("401 no token", http_head("GET", "/v1/models"), 401),
        ("400 malformed JSON", chat_request(b"{nope"), 400),
        (
            "413 too large",
            http_head("POST", "/v1/chat/completions", [AUTH, ("Content-Length", "99999999")]),
            413,
        ),
        (
            "408 body too slow",
            http_head("POST", "/v1/chat/completions", [AUTH, ("Content-Length", "100")]) + b"{",
            408,
        ),
        ("400 parser error", b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01Header: y\r\n\r\n", 400),
        ("400 not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        ("431 header too long", http_head("GET", "/v1/health", [("X-Big", "a" * 9000)]), 431),
    ]
    for case, request, status in cases:
        async with raw_connection(server.port) as conn:
            await conn.send(request)
            response = await conn.response()
        assert response.status == status, (case, response.status_line, response.body[:200])
        _assert_no_version(response, case)
        if case == "200 stream":
            assert response.body.endswith(b"data: [DONE]\n\n"), response.body[-200:]

    # The interim answer too: 100 Continue, then the final answer.
    async with raw_connection(server.port) as conn:
        await conn.send(
            http_head(
                "POST",
                "/v1/chat/completions",
                [AUTH, JSON, ("Content-Length", str(len(CHAT_BODY))), ("Expect", "100-continue")],
            )
        )
        interim = await conn.reader.readuntil(b"\r\n\r\n")
        assert interim.startswith(b"HTTP/1.1 100"), interim
        assert b"aiohttp" not in interim.lower()
        assert b"python" not in interim.lower()
        await conn.send(CHAT_BODY)
        response = await conn.response()
    assert response.status == 200
    _assert_no_version(response, "200 after 100 Continue")


# --------------------------------------------------------------------------------------
# 4. Slow headers and idle keep-alive connections
# --------------------------------------------------------------------------------------


def _quick_timeouts(upstream: FakeUpstream) -> dict[str, Any]:
    raw = gateway_config(upstream)
    raw["server"]["keepalive_timeout_seconds"] = KEEPALIVE_TIMEOUT
    raw["server"]["body_timeout_seconds"] = BODY_TIMEOUT
    return raw


async def test_a_request_head_sent_byte_by_byte_is_cut_after_the_keepalive_timeout(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(_quick_timeouts(upstream))
    async with raw_connection(server.port) as conn:
        closing = asyncio.create_task(conn.closed_within(8 * KEEPALIVE_TIMEOUT))
        await conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sent = 0
        # One byte every 0.2 s: the head would take minutes; the gateway must not wait.
        for _ in range(40):
            if closing.done() or not await conn.try_send(b"a"):
                break
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closing), 0.2)
        closed_after = await closing
    assert closed_after < 3 * KEEPALIVE_TIMEOUT, (closed_after, sent)
    assert sent >= 2, "the gateway cut the connection before the head was even slow"
    assert upstream.requests == []
    assert await chat_ok(base_url(server)) < 2.0


async def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(_quick_timeouts(upstream))
    async with raw_connection(server.port) as conn:
        for _ in range(2):  # two requests on one connection: it is kept alive
            await conn.send(http_head("GET", "/v1/health"))
            response = await conn.response()
            assert response.status == 200
            assert (response.header("Connection") or "").lower() != "close"
        answered = time.monotonic()
        await conn.closed_within(3 * KEEPALIVE_TIMEOUT)
        idle = time.monotonic() - answered
    assert 0.5 * KEEPALIVE_TIMEOUT <= idle < 3 * KEEPALIVE_TIMEOUT, idle


# --------------------------------------------------------------------------------------
# 5. Bodies that stop short
# --------------------------------------------------------------------------------------


async def test_a_body_that_stops_short_gets_408_after_the_body_timeout(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = _quick_timeouts(upstream)
    raw["server"]["max_body_bytes"] = 8 * MIB
    raw["server"]["keepalive_timeout_seconds"] = 30.0  # only the body limit may end it
    server = await start_gateway(raw)
    async with raw_connection(server.port) as conn:
        await conn.send(
            http_head("POST", "/v1/chat/completions", [AUTH, JSON, ("Content-Length", "5000000")])
        )
        await conn.send(b'{"model": "gpt-test", "messages": [' + b" " * 100_000)
        started = time.monotonic()
        response = await conn.response(within=10 * BODY_TIMEOUT)
        waited = time.monotonic() - started
        # Answered, and closed at once: the rest of the body is not awaited any longer.
        await conn.closed_within(2.0)
    error = assert_envelope(response, 408, "invalid_request", "request_timeout")
    assert "seconds" in error["message"]
    assert 0.8 * BODY_TIMEOUT <= waited < 3 * BODY_TIMEOUT, waited
    assert upstream.requests == []
    assert await chat_ok(base_url(server)) < 2.0


async def test_bodies_stopped_short_of_30_mb_give_their_memory_back_once_answered(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["max_body_bytes"] = 32 * MIB
    raw["server"]["body_timeout_seconds"] = 3.0
    gateway = await gateway_process(raw)
    await chat_ok(gateway.url)  # warm: imports, upstream connection pool
    idle = gateway.rss_mib
    connections = 8
    declared = 30_000_000
    payload = b'{"model": "gpt-test", "messages": [' + b" " * (declared - 1024)
    head = http_head(
        "POST", "/v1/chat/completions", [AUTH, JSON, ("Content-Length", str(declared))]
    )

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(raw_connection(gateway.port))
            for _ in range(connections)
        ]

        async def stop_short(conn: RawClient) -> tuple[float, float, RawResponse]:
            await conn.send(head)
            await conn.send(payload)
            drained = time.monotonic()
            response = await conn.response(within=20.0)
            return drained, time.monotonic(), response

        async with asyncio.timeout(40):
            results = await asyncio.gather(*(stop_short(conn) for conn in clients))
        for drained, answered, response in results:
            assert_envelope(response, 408, "invalid_request", "request_timeout")
            assert answered - drained < 3.0 + 2.0, answered - drained
        peak = gateway.peak_rss_mib
        # The clients are all still connected: their buffers must be gone anyway.
        after = gateway.rss_mib
        for _ in range(50):  # up to 5 s for the process to give its pages back
            if after - idle < 64:
                break
            await asyncio.sleep(0.1)  # another process's memory: nothing to await
            after = gateway.rss_mib

    total_mib = connections * declared / MIB
    # The bodies did reach the gateway (it must hold what it has read until the end)...
    assert peak - idle > total_mib / 2, (idle, peak, after)
    # ... at about their size, and it gave the memory back once it had answered.
    assert peak - idle < 2 * total_mib + 64, (idle, peak, after)
    assert after - idle < 64, (idle, peak, after)
    assert await chat_ok(gateway.url) < 2.0


async def test_a_declared_length_costs_nothing_until_the_bytes_arrive(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    """20 clients each declare a 32 MiB body and send two bytes of it: the gateway must
    not allocate what they only promised (640 MiB for 40 bytes)."""
    raw = gateway_config(upstream)
    raw["server"]["max_body_bytes"] = 32 * MIB
    raw["server"]["body_timeout_seconds"] = 30.0
    gateway = await gateway_process(raw)
    await chat_ok(gateway.url)
    idle = gateway.rss_mib
    head = http_head(
        "POST", "/v1/chat/completions", [AUTH, JSON, ("Content-Length", str(32 * MIB))]
    )
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(raw_connection(gateway.port)) for _ in range(20)]
        for conn in clients:
            await conn.send(head + b"{")
        # A request through the same loop: by now every handler has read its first byte.
        assert await chat_ok(gateway.url) < 2.0
        for conn in clients:
            await conn.send(b" ")  # a second chunk: the body is being read now
        assert await chat_ok(gateway.url) < 2.0
        held = gateway.peak_rss_mib - idle
    assert held < 32, (idle, held)


# --------------------------------------------------------------------------------------
# 6. Content-Length over the limit; Expect: 100-continue
# --------------------------------------------------------------------------------------


def _limits(upstream: FakeUpstream) -> dict[str, Any]:
    raw = gateway_config(upstream)  # max_body_bytes 64 KiB
    # A gateway that waited for the body before refusing it would wait this long.
    raw["server"]["body_timeout_seconds"] = 30.0
    return raw


LIMIT = 64 * 1024


@pytest.mark.parametrize("expect", [False, True])
async def test_a_content_length_over_the_limit_is_refused_before_any_body_byte(
    start_gateway: GatewayFactory, upstream: FakeUpstream, expect: bool
) -> None:
    server = await start_gateway(_limits(upstream))
    headers = [AUTH, JSON, ("Content-Length", str(LIMIT + 1))]
    if expect:
        headers.append(("Expect", "100-continue"))
    async with raw_connection(server.port) as conn:
        await conn.send(http_head("POST", "/v1/chat/completions", headers))
        started = time.monotonic()
        first = await conn.status_line(within=2.0)  # nothing of the body was sent
        assert first.startswith(b"HTTP/1.1 413"), first
    assert time.monotonic() - started < 2.0
    async with raw_connection(server.port) as conn:
        await conn.send(http_head("POST", "/v1/chat/completions", headers))
        response = await conn.response(within=2.0)
    error = assert_envelope(response, 413, "invalid_request", "request_too_large")
    assert response.interim == []
    assert error["details"] == {"max_body_bytes": LIMIT}
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("token", "code"), [(None, "missing_token"), ("not-a-real-token-at-all", "invalid_token")]
)
async def test_expect_100_continue_without_a_good_token_gets_401_and_no_invitation(
    start_gateway: GatewayFactory, upstream: FakeUpstream, token: str | None, code: str
) -> None:
    server = await start_gateway(_limits(upstream))
    headers: list[tuple[str, str | bytes]] = [
        JSON,
        ("Content-Length", str(len(CHAT_BODY))),
        ("Expect", "100-continue"),
    ]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    async with raw_connection(server.port) as conn:
        await conn.send(http_head("POST", "/v1/chat/completions", headers))
        response = await conn.response(within=2.0)
    assert response.interim == [], response.interim
    assert_envelope(response, 401, "authentication_error", code)
    assert upstream.requests == []


async def test_expect_100_continue_with_a_good_token_and_a_small_body_is_invited_and_served(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(_limits(upstream))
    async with raw_connection(server.port) as conn:
        await conn.send(
            http_head(
                "POST",
                "/v1/chat/completions",
                [AUTH, JSON, ("Content-Length", str(len(CHAT_BODY))), ("Expect", "100-continue")],
            )
        )
        first = await conn.status_line(within=2.0)
        assert first == b"HTTP/1.1 100 Continue", first
        await conn.send(CHAT_BODY)
        response = await conn.response()
    assert response.status == 200, response.body[:300]
    assert response.json()["choices"][0]["message"]["content"] == CONTENT
    assert len(upstream.requests) == 1


async def test_a_chunked_body_growing_past_the_limit_gets_413(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(_limits(upstream))
    piece = b" " * 16384
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    async with raw_connection(server.port) as conn:
        await conn.send(
            http_head(
                "POST", "/v1/chat/completions", [AUTH, JSON, ("Transfer-Encoding", "chunked")]
            )
        )
        answer = asyncio.create_task(conn.response(within=5.0))
        sent = 0
        for _ in range(64):  # up to 1 MiB, far past the 64 KiB limit; never the last chunk
            if answer.done() or not await conn.try_send(chunk):
                break
            sent += len(piece)
            await asyncio.sleep(0)  # let the answer, if any, be read
        response = await answer
    assert_envelope(response, 413, "invalid_request", "request_too_large")
    assert sent > LIMIT
    assert upstream.requests == []
    assert await chat_ok(base_url(server)) < 2.0


# --------------------------------------------------------------------------------------
# 7. A body that is not what its Content-Encoding says
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", CHAT_BODY),  # plain bytes labelled gzip
        ("deflate", CHAT_BODY),  # plain bytes labelled deflate
        ("gzip", gzip.compress(CHAT_BODY)[:10] + b"\xff" * 40),  # a gzip header, then garbage
        ("deflate", zlib.compress(CHAT_BODY)[:2] + b"\x00\xff" * 20),
    ],
)
async def test_a_body_that_is_not_its_content_encoding_gets_400_invalid_body(
    start_gateway: GatewayFactory, upstream: FakeUpstream, encoding: str, body: bytes
) -> None:
    server = await start_gateway(gateway_config(upstream))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(server) + "/v1/chat/completions",
            data=body,
            headers={
                "Authorization": f"Bearer {ADMIN_TOKEN}",
                "Content-Type": "application/json",
                "Content-Encoding": encoding,
            },
        ) as response,
    ):
        error = await envelope_of(response, 400, "invalid_body")
    assert "Content-Encoding" in error["message"]
    assert upstream.requests == []
    assert await chat_ok(base_url(server)) < 2.0  # the next request works


async def test_a_body_that_is_not_its_content_encoding_logs_one_line_and_no_error(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(gateway_config(upstream))
    await _start_up_logged(gateway)
    lines_before = len(gateway.log_lines())
    async with raw_connection(gateway.port) as conn:
        await conn.send(chat_request(CHAT_BODY, ("Content-Encoding", "gzip")))
        response = await conn.response()
    assert_envelope(response, 400, "invalid_request", "invalid_body")
    request_id = response.header("X-Request-ID")
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/v1/health", headers={"X-Request-ID": "after-bad-body"}) as ok,
    ):
        assert ok.status == 200
    await _until_logged(gateway, "after-bad-body")
    new = gateway.log_lines()[lines_before:]
    about_it = new[
        : next(i for i, ln in enumerate(new) if ln.get("request_id") == "after-bad-body")
    ]
    # The access line of a client's mistake, and nothing else: no "Unhandled exception".
    assert [(ln.get("event"), ln.get("request_id")) for ln in about_it] == [
        ("request", request_id)
    ], about_it
    assert about_it[0]["error_code"] == "invalid_body"
    assert not [ln for ln in new if ln.get("level") in ("error", "critical")], new


# --------------------------------------------------------------------------------------
# 8. Deep JSON
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 1_200, 20_000, 400_000])
async def test_json_nested_deeper_than_sane_gets_400_invalid_json(
    start_gateway: GatewayFactory, upstream: FakeUpstream, depth: int
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["max_body_bytes"] = 4 * MIB
    server = await start_gateway(raw)
    async with raw_connection(server.port) as conn:
        await conn.send(chat_request(deep_chat(depth)))
        response = await conn.response()
    assert_envelope(response, 400, "invalid_request", "invalid_json")
    assert upstream.requests == []
    assert await chat_ok(base_url(server)) < 2.0


async def test_deep_json_does_not_leave_a_half_open_breaker_stuck(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["max_body_bytes"] = MIB
    del raw["models"]["other-model"]  # the provider's only backend is billed per request
    raw["models"]["gpt-test"]["backends"][0]["billing_mode"] = "per_request"
    raw["settings"] = {
        "circuit_breaker_failure_threshold": 1,
        "circuit_breaker_timeout_seconds": 30,
    }
    clock = FakeClock()
    server = await start_gateway(raw, clock=clock)
    url = base_url(server)
    client = sdk_for(server, ADMIN_TOKEN)
    try:
        upstream.mode = "status"  # 500: the breaker opens after one failure
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert failed.value.status_code in (502, 503)
        sent = len(upstream.requests)
        assert sent >= 1
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert refused.value.status_code == 503, "the breaker did not open"
        assert len(upstream.requests) == sent

        clock.now += 31  # half-open: the next admitted request is its single trial
        upstream.mode = "ok"
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(
                    url + "/v1/chat/completions",
                    data=deep_chat(5_000),
                    headers={
                        "Authorization": f"Bearer {ADMIN_TOKEN}",
                        "Content-Type": "application/json",
                    },
                ) as response:
                    await envelope_of(response, 400, "invalid_json")
        assert len(upstream.requests) == sent

        async with asyncio.timeout(5):
            answer = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        assert answer.choices[0].message.content == CONTENT
        assert await chat_ok(url) < 2.0  # the trial succeeded: closed again
    finally:
        await client.close()


def _schema(depth: int) -> bytes:
    """A JSON schema nested ``2 * depth`` levels deep, spaced as orjson never would (a
    re-encoded member would lose the spacing)."""
    schema = b'{"type" :  "string", "description": "the leaf"}'
    for level in reversed(range(depth)):
        name = f'"p{level}"'.encode()
        schema = (
            b'{"type" :  "object", "properties": {' + name + b": " + schema + b"}, "
            b'"required": [' + name + b"]}"
        )
    return schema


async def test_moderately_nested_tool_schemas_go_upstream_byte_for_byte(
    start_gateway: GatewayFactory, sink: Sink
) -> None:
    raw = sink.config()
    raw["server"]["max_body_bytes"] = MIB
    server = await start_gateway(raw)
    schema = _schema(100)  # 200 levels
    tools = b'[{"type": "function", "function": {"name": "deep", "parameters": ' + schema + b"}}]"
    body = (
        b'{"model": "gpt-test", "messages": [{"role": "user", "content": "x"}], "tools": '
        + tools
        + b"}"
    )
    async with raw_connection(server.port) as conn:
        await conn.send(chat_request(body))
        response = await conn.response()
    assert response.status == 200, response.body[:300]
    (forwarded,) = sink.bodies
    members = msgspec.json.decode(forwarded, type=dict[str, msgspec.Raw])
    assert bytes(members["tools"]) == tools
    assert orjson.loads(bytes(members["model"])) == "up-model"
    parameters = orjson.loads(bytes(members["tools"]))[0]["function"]["parameters"]
    assert parameters == orjson.loads(schema)
    for level in range(100):  # really 200 levels down
        parameters = parameters["properties"][f"p{level}"]
    assert parameters["description"] == "the leaf"


# --------------------------------------------------------------------------------------
# 9. A 32 MiB body of tiny objects
# --------------------------------------------------------------------------------------

BIG_BODY_BYTES = 32 * MIB


def tiny_objects_body(size: int = BIG_BODY_BYTES) -> bytes:
    start = b'{"model":"gpt-test","messages":[{"role":"user","content":"x"}'
    end = b"]}"
    count = (size - len(start) - len(end)) // 3
    return start + b",{}" * count + end


async def test_a_32_mib_body_of_tiny_objects_costs_little_memory_and_no_stall(
    gateway_process: ProcessFactory, sink: Sink
) -> None:
    sink.keep = False
    raw = sink.config()
    raw["server"]["max_body_bytes"] = 40 * MIB
    gateway = await gateway_process(raw)
    body = tiny_objects_body()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
    url = gateway.url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def big() -> None:
            async with session.post(url, data=io.BytesIO(body), headers=headers) as response:
                text = await response.text()
                assert response.status == 200, text[:300]

        async def small() -> float:
            started = time.monotonic()
            async with session.post(url, data=CHAT_BODY, headers=headers) as response:
                assert response.status == 200, await response.text()
                await response.read()
            return time.monotonic() - started

        await small()  # warm
        idle = gateway.rss_mib
        await big()
        one_peak = gateway.peak_rss_mib
        assert sink.sizes[-1] >= len(body) - 64  # it went upstream whole

        # Four at once, and small requests from another user of the gateway meanwhile.
        bigs = [asyncio.create_task(big()) for _ in range(4)]
        latencies: list[float] = []
        async with asyncio.timeout(60):
            for _ in range(2000):
                if all(task.done() for task in bigs):
                    break
                latencies.append(await small())
            await asyncio.gather(*bigs)
        four_peak = gateway.peak_rss_mib

    body_mib = len(body) / MIB
    assert one_peak - idle < 4 * body_mib, (idle, one_peak)
    assert four_peak - idle < 4 * 4 * body_mib, (idle, four_peak)
    assert len(latencies) >= 3, latencies
    # Validating one such body holds the loop ~0.12 s (it froze it 1.3 s when the body
    # was decoded whole), so four of them can delay a small request by a few of those
    # passes; this machine also runs the client and the upstream sink.
    assert max(latencies) < 2.0, sorted(latencies)[-5:]


# --------------------------------------------------------------------------------------
# 10. Huge or deep values in the fields the gateway decodes
# --------------------------------------------------------------------------------------

_BASE = b'{"model":"gpt-test","messages":[{"role":"user","content":"x"}]'


@pytest.mark.parametrize(
    ("case", "extra", "param"),
    [
        ("100 KB stream_options", b'"stream_options":{"pad":"' + b"x" * 100_000 + b'"}', None),
        (
            "100 KB stream_options, streaming",
            b'"stream":true,"stream_options":{"pad":"' + b"x" * 100_000 + b'"}',
            None,
        ),
        (
            "stream_options nested 300 deep, streaming",
            b'"stream":true,"stream_options":{"a":' + nested(300) + b"}",
            None,
        ),
        ("temperature nested 500 deep", b'"temperature":' + nested(500), "temperature"),
        ("temperature nested 50000 deep", b'"temperature":' + nested(50_000), None),
        ("temperature of 100 KB", b'"temperature":[' + b"1," * 50_000 + b"1]", "temperature"),
        ("temperature 1e999", b'"temperature":1e999', "temperature"),
        ("top_p -1e999", b'"top_p":-1e999', "top_p"),
        ("stream as a 100 KB string", b'"stream":"' + b"x" * 100_000 + b'"', "stream"),
        ("model nested 500 deep", b'"model":' + nested(500), "model"),
        ("max_tokens of 100 KB", b'"max_tokens":{"a":"' + b"y" * 100_000 + b'"}', "max_tokens"),
    ],
)
async def test_huge_or_deep_values_in_decoded_fields_get_a_clean_400(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    case: str,
    extra: bytes,
    param: str | None,
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["max_body_bytes"] = MIB
    server = await start_gateway(raw)
    if extra.startswith(b'"model":'):
        body = b'{"messages":[{"role":"user","content":"x"}],' + extra + b"}"
    else:
        body = _BASE + b"," + extra + b"}"
    async with raw_connection(server.port) as conn:
        await conn.send(chat_request(body))
        response = await conn.response()
    assert response.status == 400, (case, response.status_line, response.body[:300])
    code = response.json()["error"]["code"]
    assert code in ("invalid_parameter", "invalid_json"), (case, response.body[:300])
    error = assert_envelope(response, 400, "invalid_request", code)
    name = param or ("stream_options" if b"stream_options" in extra else "temperature")
    if error["code"] == "invalid_parameter":
        assert error["param"] == name, (case, error)
        assert name in error["message"], (case, error)
    elif param is not None:
        raise AssertionError(f"{case}: expected invalid_parameter naming {param}: {error}")
    assert upstream.requests == [], case
    assert await chat_ok(base_url(server)) < 2.0


# --------------------------------------------------------------------------------------
# 11. A client that disconnects mid-stream
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["after the first content event", "before the first byte"])
async def test_a_client_that_drops_mid_stream_frees_its_connection_slot(
    start_gateway: GatewayFactory, upstream: FakeUpstream, when: str
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["max_connections"] = 1
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 30
    raw["providers"]["up1"]["idle_timeout_seconds"] = 30
    server = await start_gateway(raw)
    committed = when.startswith("after")
    upstream.mode = "gated" if committed else "stall"
    stream_body = orjson.dumps({**CHAT, "stream": True})
    try:
        async with raw_connection(server.port) as conn:
            await conn.send(chat_request(stream_body))
            async with asyncio.timeout(5):
                if committed:
                    seen = await conn.reader.readuntil(b"Hello")
                    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
                else:
                    await upstream.received.wait()
            upstream.mode = "ok"  # the next request is answered at once
            conn.abort()
            dropped = time.monotonic()
        latency = await chat_ok(base_url(server), within=5.0)
        since_drop = time.monotonic() - dropped
        async with asyncio.timeout(1):
            await upstream.disconnected.wait()  # the first upstream request was closed
    finally:
        upstream.gate.set()
    assert since_drop < 1.0, (since_drop, latency)
    assert len(upstream.requests) == 2


# --------------------------------------------------------------------------------------
# 12. A client that stops reading a large answer
# --------------------------------------------------------------------------------------

BIG_ANSWER_CONTENT = "x" * (20 * 1000 * 1000)
BIG_EVENT_CONTENT = "y" * 65536
BIG_EVENTS = 320  # ~21 MB of events: far more than the loopback socket buffers hold


@dataclass
class Flood:
    """An upstream whose first answer is large (20 MB of JSON, or ~21 MB of events);
    every later answer is small. Counts answers cut short by the gateway."""

    answers: int = 0
    cut: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.respond)
        return app

    async def respond(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.answers += 1
        first = self.answers == 1
        if not body.get("stream"):
            answer = chat_completion("up-model")
            if first:
                answer["choices"][0]["message"]["content"] = BIG_ANSWER_CONTENT
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(chat_chunk({"role": "assistant", "content": ""}))
            for _ in range(BIG_EVENTS if first else 1):
                await response.write(chat_chunk({"content": BIG_EVENT_CONTENT}))
            await response.write(chat_chunk({}, "stop"))
            await response.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionError):
            self.cut.set()
            raise
        await response.write_eof()
        return response


@pytest.fixture
async def flood(aiohttp_server: ServerFactory) -> Flood:
    fake = Flood()
    fake.server = await aiohttp_server(fake.app())
    return fake


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed(
    start_gateway: GatewayFactory, flood: Flood, stream: bool
) -> None:
    assert flood.server is not None
    raw = gateway_config(FakeUpstream(server=flood.server))
    idle = 1.0
    provider = raw["providers"]["up1"]
    provider.update(
        idle_timeout_seconds=idle,
        first_byte_timeout_seconds=5,
        max_connections=1,
        # A request waiting for the slot would wait this long: longer than a freed slot.
        pool_timeout_seconds=8,
        connect_timeout_seconds=8,
    )
    server = await start_gateway(raw)
    body = orjson.dumps({**CHAT, "stream": stream})
    async with raw_connection(server.port) as stalled:
        await stalled.send(chat_request(body))
        async with asyncio.timeout(5):
            for _ in range(500):  # the gateway has taken the slot for the stalled client
                if flood.answers >= 1:
                    break
                await asyncio.sleep(0.01)  # polling a counter: the fake sets no event
        assert flood.answers == 1
        # Another user, meanwhile: it needs the provider's only slot.
        started = time.monotonic()
        latency = await chat_ok(base_url(server), within=10.0)
        freed_after = time.monotonic() - started
        if not stream:
            # That answer's write waits on the stalled client; it stays stalled for three
            # times the idle limit (the gateway gives it two gaps without progress).
            await asyncio.sleep(3 * idle)
        # Now read what the gateway had sent the stalled client: not all of it.
        received = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                for _ in range(100_000):
                    data = await stalled.reader.read(MIB)
                    if not data:
                        break
                    received += len(data)
    full = len(BIG_ANSWER_CONTENT) if not stream else BIG_EVENTS * len(BIG_EVENT_CONTENT)
    assert received < full, (received, full)  # ... and it was dropped (the read ended)
    if stream:
        # A stream holds its slot while it is written: the stalled client held the only
        # slot until it was dropped (so the wait was real), no longer than the idle limit.
        assert 0.5 * idle < freed_after < 3 * idle + 1, (freed_after, latency)
    else:
        # A non-stream answer is written after its slot went back: no wait at all.
        assert freed_after < 0.5 * idle, (freed_after, latency)
    if stream:
        async with asyncio.timeout(2):
            await flood.cut.wait()  # the upstream stream was closed too


async def test_a_total_limit_passing_while_a_client_is_not_reading_blames_no_provider(
    start_gateway: GatewayFactory, flood: Flood, access_lines: AccessLines
) -> None:
    """The provider streams as fast as it can; the client stops reading. The provider's
    total limit passes while a write waits on the client: that client is dropped, and the
    provider is not charged with a timeout (its breaker and confidence stay untouched)."""
    assert flood.server is not None
    raw = gateway_config(FakeUpstream(server=flood.server))
    raw["providers"]["up1"].update(idle_timeout_seconds=30, total_timeout_seconds=1.0)
    server = await start_gateway(raw)
    pool = server.app[keys.GATEWAY].runtime.pool
    (backend,) = pool.backends["gpt-test"]
    body = orjson.dumps({**CHAT, "stream": True})
    async with raw_connection(server.port) as stalled:
        await stalled.send(chat_request(body))
        async with asyncio.timeout(10):
            await flood.cut.wait()  # the upstream stream was closed
            while not any(line.get("abort_reason") for line in access_lines):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # the access line follows the close
    (line,) = [line for line in access_lines if line.get("abort_reason")]
    assert line["abort_reason"] == "client_stalled"
    assert backend.provider.breaker.consecutive_failures == 0
    assert backend.breaker.consecutive_failures == 0
    assert backend.stats.failed_requests == 0


# --------------------------------------------------------------------------------------
# 13. Answers aiohttp writes: bounded by progress, not by their size
# --------------------------------------------------------------------------------------


async def test_a_pipelining_client_that_never_reads_is_dropped(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    """Thousands of pipelined requests, no answer ever read: the answers pile up in the
    connection's buffers until writing one waits on the client; the gateway then drops it
    after ``send_timeout_seconds`` without progress instead of holding it forever.

    Each answer is a model list of ~40 KiB, so the answers outgrow every kernel buffer
    (loopback's send buffer grows to megabytes) within the first few hundred requests.
    """
    raw = gateway_config(upstream)
    raw["server"]["send_timeout_seconds"] = 0.5
    template = raw["models"]["gpt-test"]
    raw["models"].update(
        {f"model-{i:03d}": {**template, "name": f"model-{i:03d}"} for i in range(300)}
    )
    server = await start_gateway(raw)
    request = http_head("GET", "/v1/models", [AUTH])
    with structlog.testing.capture_logs() as logs:
        async with raw_connection(server.port) as client:
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # One write, never drained: the test's loop goes on sending what it can.
            client.writer.write(request * 5000)
            async with asyncio.timeout(10):
                # Nothing is read meanwhile (reading would let the gateway go on); the
                # drop shows only as a log line, with no event to await.
                while not any(line["event"] == "client_stalled" for line in logs):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            closed = await client.closed_within(5.0) - client.opened
    assert closed < 10.0


@dataclass
class BigAnswer:
    """A chat upstream answering one 4 MiB completion."""

    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        answer = chat_completion("up-model")
        answer["choices"][0]["message"]["content"] = "z" * (4 * MIB)
        return web.json_response(answer)


async def test_a_client_reading_a_large_answer_slowly_but_steadily_gets_all_of_it(
    aiohttp_server: ServerFactory, start_gateway: GatewayFactory
) -> None:
    """The idle limit bounds the gap between progress, not the whole write: a client
    taking 4 MiB through a 256 KiB socket buffer, a read every 80 ms, takes over a second:
    more than twice the 0.5 s limit (a write bounded as a whole would be cut). It is not."""
    big = BigAnswer()
    big.server = await aiohttp_server(big.app())
    raw = gateway_config(FakeUpstream(server=big.server))
    raw["providers"]["up1"]["idle_timeout_seconds"] = 0.5
    server = await start_gateway(raw)
    received = bytearray()
    async with raw_connection(server.port) as client:
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        await client.send(chat_request() + http_head("GET", "/v1/health"))
        async with asyncio.timeout(30):
            for _ in range(10_000):  # bounded: 4 MiB in reads of tens of KiB, with slack
                data = await client.reader.read(256 * 1024)
                received += data
                if not data or b'{"status":"ok"' in received[-200:]:
                    break
                await asyncio.sleep(0.08)  # a slow reader
    # The whole 4 MiB answer, then the next one on the same connection: it was not cut.
    assert received.count(b"HTTP/1.1 200 OK") == 2
    assert b'{"status":"ok"' in received[-200:]
    assert len(received) > 4 * MIB
