"""Property tests of the stream copy: any events, cut into chunks anywhere, come out right.

The copy loop works on blocks of events and looks inside only where a mark is
(``[DONE]``, an ``"error"`` key, a usage object); these tests check it against the plain
per-event definition of what must reach the client, for random streams and random chunk
boundaries, with both line endings.
"""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from berry_proxy.context import RequestContext
from berry_proxy.sse import EventSplitter
from berry_proxy.stream_filter import StreamEnd, forwardable


def _event(payload: object, ending: bytes) -> bytes:
    return b"data: " + orjson.dumps(payload) + ending


def content(text: str, ending: bytes) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}, ending)


def usage_only(prompt: int, completion: int, ending: bytes) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return _event({"choices": [], "usage": usage}, ending)


def error(ending: bytes) -> bytes:
    return _event({"error": {"message": "overloaded", "type": "server_error"}}, ending)


# Texts that contain the marks' own words, to tempt substring checks into mistakes.
texts = st.sampled_from(["hi", '"error"', "[DONE]", '"usage":{', "usage", "\\n\\n", "ok"])
kinds = st.sampled_from(["content", "comment", "usage", "error", "done"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[tuple[str, bytes]], bytes]:
    ending = draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
    events: list[tuple[str, bytes]] = []
    for kind in draw(st.lists(kinds, max_size=12)):
        if kind == "content":
            events.append((kind, content(draw(texts), ending)))
        elif kind == "comment":
            events.append((kind, b": keep-alive" + ending))
        elif kind == "usage":
            prompt, completion = draw(st.integers(0, 9999)), draw(st.integers(0, 9999))
            events.append((kind, usage_only(prompt, completion, ending)))
        elif kind == "error":
            events.append((kind, error(ending)))
        else:
            events.append((kind, b"data: [DONE]" + ending))
    return events, ending


def expected(events: list[tuple[str, bytes]], add_usage: bool) -> tuple[bytes, StreamEnd | None]:
    """The per-event definition: stop after [DONE] or an error; drop usage we asked for."""
    out = b""
    for kind, event in events:
        if kind == "usage" and add_usage:
            continue
        out += event
        if kind == "done":
            return out, StreamEnd.DONE
        if kind == "error":
            return out, StreamEnd.BROKEN
    return out, None


def copy(chunks: list[bytes], add_usage: bool) -> tuple[bytes, StreamEnd | None, RequestContext]:
    ctx = RequestContext("req_test", 0.0)
    splitter = EventSplitter()
    out = b""
    for chunk in chunks:
        sent, end = forwardable(ctx, splitter.feed_block(chunk), add_usage)
        out += sent
        if end is not None:
            return out, end, ctx
    return out, None, ctx


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({min(p, len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=300, deadline=None)
@given(streams(), st.lists(st.integers(0, 4000), max_size=8), st.booleans())
def test_copy_matches_the_per_event_definition(
    stream: tuple[list[tuple[str, bytes]], bytes], points: list[int], add_usage: bool
) -> None:
    events, _ = stream
    data = b"".join(event for _, event in events)
    out, end, ctx = copy(cut(data, points), add_usage)
    want, want_end = expected(events, add_usage)
    assert (out, end) == (want, want_end)
    # The usage the gateway learns is the last usage object before the stream ended.
    seen_usage = [e for k, e in events[: len(events)] if k == "usage"]
    if seen_usage and want_end is None:
        last = orjson.loads(seen_usage[-1].split(b"data: ", 1)[1])["usage"]
        assert (ctx.prompt_tokens, ctx.completion_tokens) == (
            last["prompt_tokens"],
            last["completion_tokens"],
        )
