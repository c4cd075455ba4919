"""A fake model that streams as a real one does: small SSE events with gaps between writes.

`bench/streams.py` puts it behind the bare pass-through and the gateway. The path says how
the stream looks: ``POST /<events>x<gap_ms>/v1/chat/completions`` answers 200 with a
chunked ``text/event-stream`` of one role event, ``<events>`` content events written
``<gap_ms>`` milliseconds apart (one write, and one HTTP chunk, each), a finish event, a
usage event and ``data: [DONE]``. Every content event carries ``"t"``: the
``CLOCK_MONOTONIC`` nanoseconds at which it was written, a clock every process on the
machine shares, so the load client can tell how long the event took to reach it.
``GET .../models`` answers a model list (the gateway's health probe).

It is a raw asyncio protocol on uvloop, not an aiohttp server, so that a thousand open
streams cost it little: the proxies in front of it are what is measured.

    python bench/slow_upstream.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from typing import cast

import uvloop

PATH_RE = re.compile(rb"^/(\d+)x(\d+)/v1/chat/completions$")
MAX_HEAD_BYTES = 64 * 1024
CREATED = 1732170000


def event(payload: dict[str, object]) -> bytes:
    """One SSE event as an HTTP chunk."""
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return chunk(data)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chat_chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
    return {
        "id": "chatcmpl-slow000000000000000000000001",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "bench-slow",
        "system_fingerprint": "fp_bench0001",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        # As OpenAI writes every chunk of a stream whose request asked for usage (the
        # gateway always asks); the last chunk carries the usage itself.
        "usage": None,
    }


ROLE = event(chat_chunk({"role": "assistant", "content": "", "refusal": None}, None))
# A content event, split where the write time goes: ...,"t":<ns>}
_CONTENT = json.dumps(chat_chunk({"content": " tok"}, None), separators=(",", ":")).encode()
CONTENT_HEAD = b"data: " + _CONTENT[:-1] + b',"t":'
CONTENT_TAIL = b"}\n\n"


def ending(events: int) -> bytes:
    """Finish, usage and [DONE] events, then the chunked body's end."""
    usage = {"prompt_tokens": 9, "completion_tokens": events, "total_tokens": 9 + events}
    finish = event(chat_chunk({}, "stop"))
    usage_event = event(chat_chunk({}, None) | {"choices": [], "usage": usage})  # replaces null
    return finish + usage_event + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
)
MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": "bench-slow", "object": "model", "created": CREATED, "owned_by": "b"}],
    }
).encode()


def plain(status: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class Stream(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive), one stream each."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.body_left: int | None = None
        self.path = b""
        self.timer: asyncio.TimerHandle | None = None
        self.left = 0
        self.gap = 0.0
        self.events = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it is one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self.timer is None:
            if self.body_left is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        self.transport.close()
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                lines = head.split(b"\r\n")
                self.path = lines[0].split(b" ")[1] if b" " in lines[0] else b""
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.body_left = length
            if len(self.buffer) < self.body_left:
                return
            self.buffer = self.buffer[self.body_left :]
            self.body_left = None
            self.answer(self.path)

    def answer(self, path: bytes) -> None:
        assert self.transport is not None  # connected
        if path.endswith(b"/models"):
            self.transport.write(plain("200 OK", MODELS))
            return
        match = PATH_RE.match(path)
        if match is None:
            self.transport.write(plain("404 Not Found", b'{"error":{"message":"no such path"}}'))
            return
        self.events = self.left = int(match.group(1))
        self.gap = int(match.group(2)) / 1000
        self.transport.write(STREAM_HEAD + ROLE)
        self.timer = self.loop.call_later(self.gap, self.next_event)

    def next_event(self) -> None:
        transport = self.transport
        if transport is None:
            return
        data = CONTENT_HEAD + b"%d" % time.monotonic_ns() + CONTENT_TAIL
        transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.left -= 1
        if self.left > 0:
            self.timer = self.loop.call_later(self.gap, self.next_event)
            return
        transport.write(ending(self.events))
        self.timer = None
        if self.buffer:
            self.data_received(b"")  # a request that arrived meanwhile


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Stream, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
