"""The load client of bench/streams.py: many SSE streams, timed per event.

A raw asyncio protocol on uvloop (an HTTP/1.1 client that does only what the bench needs:
one POST per stream, chunked answers decoded, keep-alive), so that it costs far less than
the proxies it loads and its own CPU use, which it reports, shows headroom. For each
stream it records the time from sending the request to the first event (``ttfb``), and
for each event stamped by bench/slow_upstream.py how long it took from the upstream's
write to arriving here (``event latency``). A stream counts as an error unless it was a
200 ending in ``data: [DONE]`` and the chunked body's end.

Two shapes:

- ``--connections C --seconds S``: C connections, each sending streams one after another
  for S seconds (the realistic-stream scenario);
- ``--burst N``: N connections opened at once, one stream each (the open-streams
  scenario); it prints ``OPEN`` on stderr once all N have their first event, so the
  runner can sample memory at the peak.

It prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import cast

import uvloop

STAMP_RE = re.compile(rb'"t":(\d+)')
CONNECT_TIMEOUT_S = 30.0
# How a streamed answer ends: the [DONE] event, its chunk's end, the zero-size chunk.
LAST_BYTES = b"data: [DONE]\n\n\r\n0\r\n\r\n"


@dataclass
class Totals:
    """Everything measured, over all connections."""

    streams: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    events: int = 0
    ttfb_ns: array[int] = field(default_factory=lambda: array("q"))
    event_ns: array[int] = field(default_factory=lambda: array("q"))

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class StreamClient(asyncio.Protocol):
    """One connection; ``run`` sends a stream and resolves when it has been read whole."""

    def __init__(self, totals: Totals, request: bytes, stamps: bool = True) -> None:
        self.totals = totals
        self.request = request
        # Without stamps (the open-streams scenario) the body is not decoded, only its
        # end recognised: a thousand streams must not make this client the bottleneck.
        self.stamps = stamps
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bool] | None = None
        self.first_event: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.head = b""
        self.in_body = False
        self.status_ok = False
        self.raw = b""  # chunked bytes not decoded yet
        self.body = b""  # decoded bytes not split into events yet
        self.saw_done = False
        self.sent_ns = 0
        self.got_first = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it is one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish(False)

    def send(self) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        self.reset()
        self.done = loop.create_future()
        self.first_event = loop.create_future()
        assert self.transport is not None  # connected
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)
        return self.done

    def finish(self, ok: bool) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(ok)
        if self.first_event is not None and not self.first_event.done():
            self.first_event.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.status_ok = head.startswith(b"HTTP/1.1 200")
            if not self.status_ok or b"chunked" not in head.lower():
                self.finish(False)
                if self.transport is not None:
                    self.transport.close()
                return
            self.in_body = True
        if self.stamps:
            self.raw += data
            self.decode()
        else:
            self.scan(data)

    def scan(self, data: bytes) -> None:
        """The light path: the first event's arrival and the answer's end, no decoding."""
        if not self.got_first and b"data:" in data:
            self.got_first = True
            self.totals.ttfb_ns.append(time.monotonic_ns() - self.sent_ns)
            if self.first_event is not None and not self.first_event.done():
                self.first_event.set_result(None)
        self.raw = (self.raw + data)[-len(LAST_BYTES) :]
        if self.raw == LAST_BYTES:
            self.totals.events += 1  # the [DONE] one; events are only counted with stamps
            self.saw_done = True
            self.in_body = False
            self.finish(True)

    def decode(self) -> None:
        """Take whole chunks off ``raw``; the zero-size chunk ends the answer."""
        raw = self.raw
        pos = 0
        while True:
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(raw[pos:line_end].split(b";")[0], 16)
            start = line_end + 2
            if size == 0:
                if len(raw) < start + 2:
                    break
                self.raw = raw[start + 2 :]
                self.events(final=True)
                return
            if len(raw) < start + size + 2:
                break
            self.body += raw[start : start + size]
            pos = start + size + 2
        self.raw = raw[pos:]
        self.events(final=False)

    def events(self, final: bool) -> None:
        now = time.monotonic_ns()
        body = self.body
        cut = body.rfind(b"\n\n")
        if cut >= 0:
            complete, self.body = body[: cut + 2], body[cut + 2 :]
            totals = self.totals
            if not self.got_first and b"data:" in complete:
                self.got_first = True
                totals.ttfb_ns.append(now - self.sent_ns)
                if self.first_event is not None and not self.first_event.done():
                    self.first_event.set_result(None)
            for stamp in STAMP_RE.findall(complete):
                totals.event_ns.append(now - int(stamp))
            totals.events += complete.count(b"\n\n")
            if b"data: [DONE]" in complete:
                self.saw_done = True
        if final:
            self.in_body = False
            self.finish(self.saw_done)


def request_bytes(url: str, token: str, model: str) -> tuple[str, int, bytes]:
    """Host, port and the raw POST for ``url``."""
    match = re.match(r"^http://([^:/]+):(\d+)(/.*)$", url)
    if match is None:
        raise SystemExit(f"not an http://host:port/path URL: {url}")
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 256,
            "stream": True,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return host, port, head + body


async def connect(
    host: str, port: int, totals: Totals, request: bytes, stamps: bool = True
) -> StreamClient | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, client = await loop.create_connection(
                lambda: StreamClient(totals, request, stamps), host, port
            )
    except (OSError, TimeoutError) as exc:
        totals.error(f"connect: {type(exc).__name__}")
        return None
    return client


async def one_stream(client: StreamClient, totals: Totals) -> bool:
    ok = await client.send()
    totals.streams += 1
    if not ok:
        totals.error("stream")
    return ok


async def repeat(host: str, port: int, request: bytes, connections: int, seconds: float) -> Totals:
    """``connections`` connections sending streams back to back for ``seconds``."""
    totals = Totals()
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        client = await connect(host, port, totals, request)
        while client is not None and time.monotonic() < stop_at:
            if not await one_stream(client, totals) or client.transport is None:
                client = await connect(host, port, totals, request)
        if client is not None and client.transport is not None:
            client.transport.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return totals


async def burst(host: str, port: int, request: bytes, count: int) -> Totals:
    """``count`` connections at once, one stream each; ``OPEN`` on stderr when all of
    them have their first event (the moment the runner samples memory)."""
    totals = Totals()
    clients = await asyncio.gather(
        *(connect(host, port, totals, request, stamps=False) for _ in range(count))
    )
    live = [c for c in clients if c is not None]
    streams = [asyncio.ensure_future(one_stream(c, totals)) for c in live]
    await asyncio.gather(*(c.first_event for c in live if c.first_event is not None))
    print("OPEN", file=sys.stderr, flush=True)
    await asyncio.gather(*streams)
    for client in live:
        if client.transport is not None:
            client.transport.close()
    return totals


def percentile(values: array[int], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] / 1e6  # ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst", type=int, help="open this many streams at once instead")
    args = parser.parse_args()
    host, port, request = request_bytes(args.url, args.token, args.model)
    started = time.monotonic()
    if args.burst:
        totals = uvloop.run(burst(host, port, request, args.burst))
    else:
        totals = uvloop.run(repeat(host, port, request, args.connections, args.seconds))
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "streams": totals.streams,
        "errors": totals.errors,
        "error_kinds": totals.error_kinds,
        "events": totals.events,
        "seconds": elapsed,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "ttfb_p50_ms": percentile(totals.ttfb_ns, 0.5),
        "ttfb_p99_ms": percentile(totals.ttfb_ns, 0.99),
        "event_p50_ms": percentile(totals.event_ns, 0.5),
        "event_p99_ms": percentile(totals.event_ns, 0.99),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
