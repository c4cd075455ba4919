"""The load client of bench/streams.py: many SSE streams, timed per event.

A raw asyncio protocol on uvloop (an HTTP/1.1 client that does only what the bench needs:
one POST per stream, chunked answers decoded, keep-alive), so that it costs far less than
the proxies it loads and its own CPU use, which it reports, shows headroom. For each
stream it records the time from sending the request to the first content event
(``ttfb``: the time to first token a user sees; the role-only event before it shows
nothing, and the gateway holds it until content comes), and
for each event stamped by bench/slow_upstream.py how long it took from the upstream's
write to arriving here (``event latency``). A stream counts as an error unless it was a
200 holding all ``--events`` content events and ending in ``data: [DONE]`` and the
chunked body's end, within 60 s of the run's last request.

Two shapes:

- ``--connections C --seconds S``: C connections, each sending streams one after another
  for S seconds (the realistic-stream scenario);
- ``--burst N``: N connections opened at once, one stream each (the open-streams
  scenario); it prints ``OPEN`` on stderr once all N requests are sent and have their
  first content event, so the runner can sample memory at the peak.

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

STAMP = b'"t":'
STAMP_RE = re.compile(rb'"t":(\d+)')
CONNECT_TIMEOUT_S = 30.0
# A stream not read whole this long after the run's last one began is an error, and the
# client ends: every run stops by itself.
STREAM_TIMEOUT_S = 60.0
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

    def __init__(self, totals: Totals, request: bytes, events: int, stamps: bool = True) -> None:
        self.totals = totals
        self.request = request
        self.expected = events  # content events a whole stream holds
        # Without stamps (the open-streams scenario) the body is not decoded, only its
        # end recognised: a thousand streams must not make this client the bottleneck.
        self.stamps = stamps
        self.transport: asyncio.Transport | None = None
        # Resolves with None for a stream read whole, else with what went wrong.
        self.done: asyncio.Future[str | None] | None = None
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
        self.stamped = 0  # content events of this stream seen so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not an asyncio.Transport subclass, but it is one.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish("connection lost")

    def send(self) -> asyncio.Future[str | None]:
        loop = asyncio.get_running_loop()
        self.reset()
        self.done = loop.create_future()
        self.first_event = loop.create_future()
        assert self.transport is not None  # connected
        self.sent_ns = time.monotonic_ns()
        self.transport.write(self.request)
        return self.done

    def finish(self, error: str | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(error)
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
                self.finish(f"answer {head[9:12].decode(errors='replace')}, not a 200 stream")
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
        """The light path: content events counted, the first one's arrival and the
        answer's end noted, nothing decoded."""
        tail = self.raw
        joined = tail + data
        stamps = joined.count(STAMP) - tail.count(STAMP)  # one cut across reads included
        if stamps:
            self.stamped += stamps
            self.totals.events += stamps
            if not self.got_first:
                self.first_content()
        self.raw = joined[-len(LAST_BYTES) :]
        if self.raw == LAST_BYTES:
            self.saw_done = True
            self.in_body = False
            self.finish(self.complete())

    def first_content(self) -> None:
        """The first content event arrived: the time to first token, as a client sees it
        (role-only events before it carry nothing to show)."""
        self.got_first = True
        self.totals.ttfb_ns.append(time.monotonic_ns() - self.sent_ns)
        if self.first_event is not None and not self.first_event.done():
            self.first_event.set_result(None)

    def complete(self) -> str | None:
        """None for a stream that ended with all its content events and ``[DONE]``."""
        if not self.saw_done:
            return "no [DONE]"
        if self.stamped != self.expected:
            return f"{self.stamped} content events, not {self.expected}"
        return None

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
            stamps = STAMP_RE.findall(complete)
            if stamps and not self.got_first:
                self.first_content()
            for stamp in stamps:
                totals.event_ns.append(now - int(stamp))
            self.stamped += len(stamps)
            totals.events += len(stamps)
            if b"data: [DONE]" in complete:
                self.saw_done = True
        if final:
            self.in_body = False
            self.finish(self.complete())


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
    host: str, port: int, totals: Totals, request: bytes, events: int, stamps: bool = True
) -> StreamClient | None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, client = await loop.create_connection(
                lambda: StreamClient(totals, request, events, stamps), host, port
            )
    except (OSError, TimeoutError) as exc:
        totals.error(f"connect: {type(exc).__name__}")
        return None
    return client


async def one_stream(
    client: StreamClient, totals: Totals, deadline: float, sent: asyncio.Future[str | None]
) -> bool:
    """The stream ``client`` has just sent (``sent``, from ``send()``); an error unless it
    is read whole by ``deadline``."""
    try:
        async with asyncio.timeout_at(deadline):
            error = await sent
    except TimeoutError:
        error = "not finished in time"
        if client.transport is not None:
            client.transport.close()
    totals.streams += 1
    if error is not None:
        totals.error(error)
    return error is None


async def repeat(
    host: str, port: int, request: bytes, events: int, connections: int, seconds: float
) -> Totals:
    """``connections`` connections sending streams back to back for ``seconds``."""
    totals = Totals()
    stop_at = time.monotonic() + seconds
    deadline = asyncio.get_running_loop().time() + seconds + STREAM_TIMEOUT_S

    async def worker() -> None:
        client = await connect(host, port, totals, request, events)
        while client is not None and time.monotonic() < stop_at:
            ok = await one_stream(client, totals, deadline, client.send())
            if not ok or client.transport is None:
                if client.transport is not None:
                    client.transport.close()  # in an unknown state after a failure
                client = await connect(host, port, totals, request, events)
        if client is not None and client.transport is not None:
            client.transport.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return totals


async def burst(host: str, port: int, request: bytes, events: int, count: int) -> Totals:
    """``count`` connections at once, one stream each; ``OPEN`` on stderr when all of
    them have their first event (the moment the runner samples memory)."""
    totals = Totals()
    clients = await asyncio.gather(
        *(connect(host, port, totals, request, events, stamps=False) for _ in range(count))
    )
    live = [c for c in clients if c is not None]
    deadline = asyncio.get_running_loop().time() + STREAM_TIMEOUT_S
    # Every request is written now, before anything waits: all of them are in flight.
    streams = [asyncio.ensure_future(one_stream(c, totals, deadline, c.send())) for c in live]
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
    parser.add_argument(
        "--events", type=int, required=True, help="content events a whole stream holds"
    )
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--burst", type=int, help="open this many streams at once instead")
    args = parser.parse_args()
    host, port, request = request_bytes(args.url, args.token, args.model)
    started = time.monotonic()
    if args.burst:
        totals = uvloop.run(burst(host, port, request, args.events, args.burst))
    else:
        totals = uvloop.run(
            repeat(host, port, request, args.events, args.connections, args.seconds)
        )
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
