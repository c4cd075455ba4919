"""Server-sent events as bytes (``sse.py``): splitting and classifying upstream events.

The proxy forwards events byte for byte, so the splitter must give back exactly the bytes
it was fed, cut at event boundaries wherever the network happened to cut the chunks; and
the classifier decides when a stream commits, so each kind of chunk must land in the
right class.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import orjson
import pytest

from berry_proxy.sse import (
    LARGE,
    EventKind,
    EventSplitter,
    EventTooLarge,
    classify,
    error_event,
    event_data,
    is_done,
    may_carry_usage,
    usage_of,
    usage_position,
    without_usage,
)


def event(payload: Any, ending: bytes = b"\n\n") -> bytes:
    return b"data: " + orjson.dumps(payload) + ending


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


USAGE = {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
STREAM = [
    event(chunk({"role": "assistant", "content": ""})),
    event(chunk({"content": "Hello"})),
    event(chunk({"content": " wörld ✓"})),  # multi-byte UTF-8 split across chunks too
    event(chunk({}, "stop")),
    event({"id": "chatcmpl-1", "choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]


# --------------------------------------------------------------------------------------
# EventSplitter
# --------------------------------------------------------------------------------------


def feed_all(splitter: EventSplitter, chunks: list[bytes]) -> list[bytes]:
    events: list[bytes] = []
    for piece in chunks:
        events.extend(splitter.feed(piece))
    return events


def test_events_split_byte_by_byte_come_back_whole() -> None:
    data = b"".join(STREAM)
    splitter = EventSplitter()
    events = feed_all(splitter, [data[i : i + 1] for i in range(len(data))])
    assert events == STREAM
    assert splitter.pending == b""


@pytest.mark.parametrize("size", [2, 3, 7, 13, 64])
def test_events_split_at_any_chunk_size(size: int) -> None:
    data = b"".join(STREAM)
    splitter = EventSplitter()
    events = feed_all(splitter, [data[i : i + size] for i in range(0, len(data), size)])
    assert events == STREAM
    assert b"".join(events) == data


def test_several_events_in_one_chunk() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"".join(STREAM)) == STREAM
    assert splitter.pending == b""


def test_crlf_event_endings() -> None:
    events = [e.replace(b"\n\n", b"\r\n\r\n") for e in STREAM]
    data = b"".join(events)
    assert EventSplitter().feed(data) == events
    splitter = EventSplitter()
    assert feed_all(splitter, [data[i : i + 1] for i in range(len(data))]) == events
    assert splitter.pending == b""


def test_cr_event_endings() -> None:
    events = [b"data: one\r\r", b"data: two\r\r"]
    assert EventSplitter().feed(b"".join(events)) == events


def test_mixed_endings_in_one_chunk_keep_order() -> None:
    events = [b"data: a\r\n\r\n", b"data: b\n\n", b": keep-alive\r\n\r\n", b"data: c\n\n"]
    assert EventSplitter().feed(b"".join(events)) == events


def test_multi_line_event_is_one_event() -> None:
    multi = b"event: message\nid: 7\ndata: first\ndata: second\n\n"
    assert EventSplitter().feed(multi + b"data: next\n\n") == [multi, b"data: next\n\n"]


def test_partial_event_stays_pending_until_it_ends() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a": 1}\n\ndata: {"b"') == [b'data: {"a": 1}\n\n']
    assert splitter.pending == b'data: {"b"'
    assert splitter.feed(b": 2}\n") == []
    assert splitter.pending == b'data: {"b": 2}\n'
    assert splitter.feed(b"\n") == [b'data: {"b": 2}\n\n']
    assert splitter.pending == b""


def test_empty_chunk_yields_nothing() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"") == []
    assert splitter.feed(b"data: x") == []
    assert splitter.feed(b"") == []
    assert splitter.pending == b"data: x"


# --------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        event(chunk({"role": "assistant", "content": ""})),
        event(chunk({"role": "assistant"})),
        event(chunk({})),
        event(chunk({"content": None})),
        event({"id": "chatcmpl-1", "choices": []}),
        event({"id": "chatcmpl-1", "choices": [], "usage": None}),
        b": keep-alive\n\n",
        b":\n\n",
        b"event: ping\n\n",
    ],
)
def test_preamble_events_do_not_commit(raw: bytes) -> None:
    assert classify(raw)[0] is EventKind.PREAMBLE


@pytest.mark.parametrize(
    "raw",
    [
        event(chunk({"content": "Hi"})),
        event(chunk({"role": "assistant", "content": "Hi"})),
        event(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function"}]})),
        event(chunk({"function_call": {"name": "f", "arguments": ""}})),
        event(chunk({"refusal": "I can't help with that"})),
        event(chunk({}, "stop")),
        event(chunk({}, "length")),
        event(chunk({}, "tool_calls")),
        # Legacy completions stream text rather than a delta.
        event({"object": "text_completion", "choices": [{"index": 0, "text": "Hi"}]}),
    ],
)
def test_content_events_commit(raw: bytes) -> None:
    kind, payload = classify(raw)
    assert kind is EventKind.CONTENT
    assert payload["choices"] == orjson.loads(raw.removeprefix(b"data: "))["choices"]


def test_usage_only_chunk() -> None:
    kind, payload = classify(event({"id": "chatcmpl-1", "choices": [], "usage": USAGE}))
    assert kind is EventKind.USAGE
    assert payload["usage"] == USAGE


@pytest.mark.parametrize("raw", [b"data: [DONE]\n\n", b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n"])
def test_done(raw: bytes) -> None:
    assert classify(raw) == (EventKind.DONE, None)
    assert is_done(raw)


@pytest.mark.parametrize(
    "raw",
    [b": [DONE]\n\n", event(chunk({"content": "[DONE]"})), b"data: DONE\n\n"],
)
def test_not_done(raw: bytes) -> None:
    assert not is_done(raw)


def test_error_event() -> None:
    raw = event({"error": {"message": "overloaded", "type": "server_error"}})
    kind, payload = classify(raw)
    assert kind is EventKind.ERROR
    assert payload["error"]["message"] == "overloaded"
    # A null error field is not an error.
    assert classify(event(chunk({"content": "x"}, error=None)))[0] is EventKind.CONTENT


@pytest.mark.parametrize(
    "raw",
    [b"data: {not json\n\n", b"data: <html>\n\n", b"data: [1, 2]\n\n", b'data: "text"\n\n'],
)
def test_invalid_events(raw: bytes) -> None:
    assert classify(raw) == (EventKind.INVALID, None)


def test_multi_line_data_is_joined_before_parsing() -> None:
    raw = b'data: {"choices": [{"delta":\ndata: {"content": "Hi"}}]}\n\n'
    assert event_data(raw) == b'{"choices": [{"delta":\n{"content": "Hi"}}]}'
    assert classify(raw)[0] is EventKind.CONTENT


def test_error_event_helper_is_one_parseable_error_event() -> None:
    error = {"error": {"type": "service_error", "code": "upstream_error", "message": "broke"}}
    raw = error_event(error)
    assert raw.endswith(b"\n\n")
    assert EventSplitter().feed(raw) == [raw]
    assert classify(raw) == (EventKind.ERROR, error)


# --------------------------------------------------------------------------------------
# may_carry_usage / usage_of
# --------------------------------------------------------------------------------------


def test_may_carry_usage() -> None:
    assert may_carry_usage(event({"choices": [], "usage": USAGE}))
    assert may_carry_usage(b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n')
    assert not may_carry_usage(event(chunk({"content": "Hi"})))
    assert not may_carry_usage(event(chunk({"content": "Hi"}, usage=None)))
    assert not may_carry_usage(b'data: {"choices": [], "usage": null}\n\n')
    assert not may_carry_usage(b"data: [DONE]\n\n")


def test_usage_of_usage_only_chunk() -> None:
    payload = {"choices": [], "usage": USAGE}
    assert usage_of(payload) == (11, 4, True)


def test_usage_of_chunk_with_choices_and_usage() -> None:
    payload = chunk({}, "stop", usage=USAGE)
    assert usage_of(payload) == (11, 4, False)


def test_usage_of_non_stream_completion() -> None:
    message = {"role": "assistant", "content": "Hi"}
    payload = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    assert usage_of(payload) == (11, 4, False)


@pytest.mark.parametrize(
    "choices",
    [
        [{"index": 0, "delta": {}, "finish_reason": None}],  # LiteLLM's usage chunk
        [{"index": 0, "delta": {"content": None, "role": None}, "logprobs": None}],
        [{"index": 0}, {"index": 1, "delta": {}}],
    ],
)
def test_usage_on_a_chunk_of_empty_choices_is_usage_only(choices: list[Any]) -> None:
    assert usage_of({"choices": choices, "usage": USAGE}) == (11, 4, True)


@pytest.mark.parametrize(
    "choices",
    [
        [{"index": 0, "delta": {"role": "assistant"}}],  # the first chunk: keeps its role
        [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        [{"index": 0, "delta": {"content": "x"}}],
        [{"index": 0, "text": "x"}],
        [{"index": 0, "delta": {}}, {"index": 1, "delta": {"tool_calls": [{"index": 0}]}}],
    ],
)
def test_usage_on_a_chunk_that_carries_something_is_not_usage_only(choices: list[Any]) -> None:
    assert usage_of({"choices": choices, "usage": USAGE}) == (11, 4, False)


@pytest.mark.parametrize(
    "payload",
    [None, [], "usage", {"choices": []}, {"usage": None}, {"usage": [1, 2]}],
)
def test_usage_of_without_usage(payload: Any) -> None:
    assert usage_of(payload) == (None, None, False)


def test_usage_of_ignores_non_integer_counts() -> None:
    payload = {"choices": [], "usage": {"prompt_tokens": "11", "completion_tokens": 4.5}}
    assert usage_of(payload) == (None, None, True)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_deltas_commit_the_stream(field: str) -> None:
    event = (
        b"data: "
        + orjson.dumps(
            {"choices": [{"index": 0, "delta": {field: "Let me think"}, "finish_reason": None}]}
        )
        + b"\n\n"
    )
    assert classify(event)[0] is EventKind.CONTENT


def test_feed_block_returns_complete_events_as_one_block() -> None:
    splitter = EventSplitter()
    first = b"data: 1\n\ndata: 2\n\n"
    assert splitter.feed_block(first) is first  # ends on a boundary: not copied
    assert splitter.feed_block(b"data: 3\n\nda") == b"data: 3\n\n"
    assert splitter.pending == b"da"
    assert splitter.feed_block(b"ta: 4") == b""
    assert splitter.feed_block(b"\n\n") == b"data: 4\n\n"
    assert splitter.feed_block(b"data: 5\r\n\r\ndata: 6\r\n") == b"data: 5\r\n\r\n"
    assert splitter.feed_block(b"\r\n") == b"data: 6\r\n\r\n"


def test_usage_object_is_found_in_a_block_of_null_usage_chunks() -> None:
    # OpenAI puts "usage": null in every chunk once include_usage is set.
    block = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    )
    assert may_carry_usage(block)
    assert not may_carry_usage(block.split(b"\n\n")[0])
    assert may_carry_usage(b'data: {"choices": [], "usage": {"prompt_tokens": 3}}\n\n')


# --------------------------------------------------------------------------------------
# Limits: an upstream that never ends an event
# --------------------------------------------------------------------------------------


def test_pending_bytes_without_a_boundary_are_capped() -> None:
    splitter = EventSplitter(max_pending=4096)
    splitter.push(b"data: " + b"x" * 4000)
    assert splitter.pop() is None  # under the cap: waits for the rest
    splitter.push(b"x" * 200)
    with pytest.raises(EventTooLarge):
        splitter.pop()


def test_the_cap_applies_to_blocks_too_and_complete_events_still_count() -> None:
    splitter = EventSplitter(max_pending=4096)
    assert splitter.feed_block(b"data: 1\n\n" + b"data: " + b"y" * 3000) == b"data: 1\n\n"
    with pytest.raises(EventTooLarge):
        splitter.feed_block(b"y" * 2000)


def test_many_complete_events_in_one_chunk_are_not_capped() -> None:
    events = [b"data: " + b"z" * 100 + b"\n\n" for _ in range(1000)]  # 100 KB in all
    splitter = EventSplitter(max_pending=4096)
    assert splitter.feed(b"".join(events)) == events


def test_splitting_an_unterminated_event_is_linear_in_its_size() -> None:
    """50 MB fed in 64 KiB chunks: each chunk is searched once, never the whole again."""
    chunk = b"q" * 65536
    splitter = EventSplitter(max_pending=64 * 1024 * 1024)
    started = time.process_time()
    for _ in range(800):
        splitter.push(chunk)
        assert splitter.pop() is None
    assert time.process_time() - started < 2.0  # quadratic copying would take minutes
    splitter.push(b"\n\n")
    assert len(splitter.pop() or b"") == 800 * 65536 + 2


def test_a_boundary_cut_across_chunks_after_a_long_search_is_found() -> None:
    for ending in (b"\n\n", b"\r\n\r\n"):
        splitter = EventSplitter()
        splitter.push(b"data: " + b"w" * 70000 + ending[:1])
        assert splitter.pop() is None
        splitter.push(ending[1:] + b"data: next" + ending)
        first = splitter.pop()
        assert first is not None
        assert first.endswith(ending)
        assert splitter.pop() == b"data: next" + ending


def test_a_block_of_many_small_crlf_events_splits_in_linear_time() -> None:
    """With "\\r" line endings every event is found by one leftmost search; searching for
    each ending on its own rescanned the block per event (352 KB took 11 s)."""
    event = b"data: {}\r\n\r\n"
    block = event * 32_000  # 384 KB, as one read of a fast upstream may deliver
    splitter = EventSplitter()
    started = time.process_time()
    assert splitter.feed_block(block) == block
    assert EventSplitter().feed(block) == [event] * 32_000
    assert time.process_time() - started < 1.0


def test_huge_members_are_not_built_into_objects() -> None:
    """A 1 MiB event of tiny objects is read in one pass, not as 300 000 dicts."""
    tiny = b"{}," * 350_000 + b"{}"
    for member, kind in ((b"choices", EventKind.CONTENT), (b"usage", EventKind.USAGE)):
        raw = b'data: {"' + member + b'": [' + tiny + b"]}\n\n"
        tracemalloc.start()
        try:
            found, payload = classify(raw)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert found is kind
        assert payload[member.decode()] is LARGE
        assert peak < 2 * len(raw)  # the event's own bytes, not its objects (~30 MB)
    # Nor is a large usage object accounted.
    raw = b'data: {"choices": [], "usage": {"pad": [' + tiny + b'], "prompt_tokens": 3}}\n\n'
    assert usage_of(classify(raw)[1])[:2] == (None, None)


def test_the_pending_check_before_the_commit_counts_only_the_unfinished_tail() -> None:
    """Whole events not taken yet are fine however many; an unfinished event over the cap
    is not, even when it came in the same read as the committing event."""
    splitter = EventSplitter(max_pending=1024)
    splitter.push(b"data: 1\n\n" + b"data: 2\n\n" * 500)
    assert splitter.pop() == b"data: 1\n\n"
    splitter.check_pending()  # 4.5 KB pending, all of it whole events
    splitter.push(b"data: " + b"t" * 2000)
    with pytest.raises(EventTooLarge):
        splitter.check_pending()
    crlf = EventSplitter(max_pending=1024)
    crlf.push(b"data: 1\r\n\r\n" * 200 + b"data: " + b"t" * 2000)
    assert crlf.pop() == b"data: 1\r\n\r\n"
    with pytest.raises(EventTooLarge):
        crlf.check_pending()


def test_a_small_event_with_a_number_out_of_range_is_judged_as_a_large_one_is() -> None:
    """orjson cannot hold 1e400; the event is still JSON, and its content commits."""
    raw = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"x":1e400}]}\n\n'
    assert classify(raw)[0] is EventKind.CONTENT


def test_usage_is_removed_from_a_chunk_with_choices_and_everything_else_kept() -> None:
    raw = (
        b'id: 7\ndata: {"id":"c1","choices":[{"index":0,"delta":{"content":"x  y"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"cost":0.1},"z":[1, 2]}\n\n'
    )
    out = without_usage(raw)
    assert out == (
        b'id: 7\ndata: {"id":"c1","choices":[{"index":0,"delta":{"content":"x  y"},'
        b'"finish_reason":"stop"}],"z":[1, 2]}\n\n'
    )


@pytest.mark.parametrize("raw", [b"data: [1, 2]\n\n", b": comment\n\n", b'data: {"a":1}\n\n'])
def test_without_usage_leaves_an_event_without_it_as_it_is(raw: bytes) -> None:
    assert without_usage(raw) is raw


@pytest.mark.parametrize(
    ("data", "position"),
    [
        (b'{"usage":{"prompt_tokens":1}}', 1),
        (b'{"usage": {"prompt_tokens":1}}', 1),
        (b'{"usage" : {"prompt_tokens":1}}', 1),
        (b'{"usage" :{}, "x": 1}', 1),
        (b'{"usage":null,"usage" : {}}', 14),
        (b'{"usage" : null}', -1),
        (b'{"usage":null}', -1),
    ],
)
def test_usage_position_finds_every_spelling_of_a_usage_object(data: bytes, position: int) -> None:
    assert usage_position(data) == position


def test_usage_of_ignores_counts_no_counter_can_hold() -> None:
    """An upstream reporting 10**23 tokens: no usage (the access line's JSON and the
    counters hold 64 bits), not a failure of the answer."""
    huge = {"usage": {"prompt_tokens": 10**23, "completion_tokens": 4}, "choices": []}
    assert usage_of(huge) == (None, 4, True)
    assert usage_of({"usage": {"prompt_tokens": True, "completion_tokens": 2**63 - 1}})[:2] == (
        None,
        2**63 - 1,
    )
