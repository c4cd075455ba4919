"""Server-sent events as bytes: split a stream into events without re-encoding them.

The proxy forwards each upstream event byte for byte; it only needs to know where events
end, and, for a few events, what they say (does this one carry content? is it the final
usage chunk? ``[DONE]``?). Parsing is done only where a decision needs it.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import msgspec
import orjson

DONE_DATA = b"[DONE]"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventTooLarge(Exception):
    """More than the allowed bytes arrived without an event boundary."""


# Longest boundary minus one: where a boundary cut across two chunks may begin.
_BOUNDARY_TAIL = {False: 1, True: 3}


class EventSplitter:
    """Feed raw chunks; take complete events one by one, or all of them as one block.

    Before the commit point the proxy looks at events one at a time (``pop``); after it, it
    forwards whole blocks (``take_block``) and looks inside only when a block holds
    something to act on. Events keep their exact bytes, blank-line ending included.

    Linear in what it is fed: bytes not yet taken accumulate in one ``bytearray`` (never
    ``rest + chunk``), and each search for a boundary starts where the previous one gave
    up. A chunk that arrives when nothing is pending and ends on a boundary is handed back
    as it is, without a copy. More than ``max_pending`` bytes without a boundary raise
    ``EventTooLarge``: an upstream that never ends an event must not fill memory.
    """

    __slots__ = ("_buffer", "_carriage_returns", "_position", "_searched", "max_pending")

    def __init__(self, max_pending: int = 1024 * 1024) -> None:
        self._buffer: bytes | bytearray = b""
        self._position = 0  # start of the first event not yet taken
        self._searched = 0  # no boundary starts before this offset (from _position)
        self._carriage_returns = False
        self.max_pending = max_pending

    def push(self, chunk: bytes) -> None:
        if self._position >= len(self._buffer):
            self._buffer, self._position, self._searched = chunk, 0, 0
        else:
            buffer = self._buffer
            if isinstance(buffer, bytes):
                buffer = bytearray(memoryview(buffer)[self._position :])
            elif self._position:
                del buffer[: self._position]  # O(1): bytearray drops a prefix in place
            self._position = 0
            buffer += chunk
            self._buffer = buffer
        # Almost every server ends events with "\n\n"; the slower search for the other
        # endings is needed only once the data holds a "\r" at all.
        if not self._carriage_returns and b"\r" in chunk:
            self._carriage_returns = True

    def _find(self) -> tuple[int, int]:
        """The next boundary at or after the search point: (offset, width), or (-1, 0)."""
        data = self._buffer
        start = self._position + self._searched
        if self._carriage_returns:
            end, width = _next_boundary(data, start)
        else:
            end, width = data.find(b"\n\n", start), 2
        if end < 0:
            self._gave_up()
        return end, width

    def _gave_up(self) -> None:
        """No boundary in what is pending: search only the new bytes next time."""
        pending = len(self._buffer) - self._position
        if pending > self.max_pending:
            raise EventTooLarge(f"more than {self.max_pending} bytes without an event boundary")
        self._searched = max(0, pending - _BOUNDARY_TAIL[self._carriage_returns])

    def _slice(self, start: int, end: int) -> bytes:
        buffer = self._buffer
        if isinstance(buffer, bytes):
            return buffer if start == 0 and end == len(buffer) else buffer[start:end]
        return bytes(memoryview(buffer)[start:end])

    def pop(self) -> bytes | None:
        """The next complete event, or None until more data arrives."""
        end, width = self._find()
        if end < 0:
            return None
        start = self._position
        self._position, self._searched = end + width, 0
        return self._slice(start, end + width)

    def take_block(self) -> bytes:
        """Every complete event not yet taken, as one block (often the chunk itself)."""
        if self._carriage_returns:
            events = []
            while (event := self.pop()) is not None:
                events.append(event)
            return b"".join(events)
        data, start = self._buffer, self._position
        end = data.rfind(b"\n\n", start + self._searched)
        if end < 0:
            self._gave_up()
            return b""
        end += 2
        self._position = end
        # Nothing after the last boundary holds another: search only new bytes next time.
        self._searched = max(0, len(data) - end - 1)
        self.check_pending()
        return self._slice(start, end)

    def check_pending(self) -> None:
        """Raise ``EventTooLarge`` if the unfinished event at the end of what is pending is
        over the cap (whole events not taken yet do not count)."""
        data, start = self._buffer, self._position
        if len(data) - start <= self.max_pending:
            return
        last = start  # where the unfinished tail begins
        for boundary in _BOUNDARIES if self._carriage_returns else _BOUNDARIES[:1]:
            found = data.rfind(boundary, start)
            if found >= 0:
                last = max(last, found + len(boundary))
        if len(data) - last > self.max_pending:
            raise EventTooLarge(f"more than {self.max_pending} bytes without an event boundary")

    def feed(self, chunk: bytes) -> list[bytes]:
        """Push ``chunk`` and take every complete event."""
        self.push(chunk)
        events = []
        while (event := self.pop()) is not None:
            events.append(event)
        return events

    def feed_block(self, chunk: bytes) -> bytes:
        """Push ``chunk`` and take every complete event as one block."""
        if (
            self._position >= len(self._buffer)
            and chunk.endswith(b"\n\n")
            and not self._carriage_returns
            and b"\r" not in chunk
        ):
            # The usual chunk of a model's stream: whole events, nothing pending before
            # it. It is the block as it is, and nothing is left pending (so nothing can be
            # too large: ``take_block`` would say the same, at a dozen more steps).
            self._buffer, self._position, self._searched = b"", 0, 0
            return chunk
        self.push(chunk)
        return self.take_block()

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not ended yet (and of events not yet taken)."""
        return bytes(self._buffer[self._position :])


# The leftmost event boundary of any of the three line endings, in one pass. (Searching
# for each ending on its own would rescan the rest of the buffer, for every event, for
# the endings a stream does not use: quadratic in a block of many small events.)
_ANY_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _next_boundary(data: bytes | bytearray, start: int) -> tuple[int, int]:
    found = _ANY_BOUNDARY.search(data, start)
    if found is None:
        return -1, 0
    return found.start(), found.end() - found.start()


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of an event, or None for a comment-only event."""
    # The usual event is one "data: ..." line: slice it without splitting lines.
    if event.startswith(b"data: ") and event.count(b"\n") == 2 and event.endswith(b"\n\n"):
        return event[6:-2]
    parts = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def is_done(event: bytes) -> bool:
    return event_data(event) == DONE_DATA if b"[DONE]" in event else False


class EventKind(enum.Enum):
    CONTENT = "content"  # commits the response: text, tool calls or a finish reason
    PREAMBLE = "preamble"  # role-only or empty chunk, comment, keep-alive
    USAGE = "usage"  # the final usage-only chunk ("choices": [])
    DONE = "done"
    ERROR = "error"  # the upstream reported an error inside the stream
    INVALID = "invalid"  # not JSON


# An event is decoded only to its top level, and of that only the members the gateway
# reads, each when it is at most this large: a hostile 1 MiB event of tiny objects costs
# one pass over its bytes, never a million Python objects.
MAX_READ_MEMBER_BYTES = 64 * 1024
_READ_MEMBERS = ("error", "choices", "usage")
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_VALUE = msgspec.json.Decoder()


class _Large:
    """Stands for a member too large to decode (see ``MAX_READ_MEMBER_BYTES``)."""

    def __repr__(self) -> str:
        return "<too large to read>"


LARGE = _Large()


def read_members(data: bytes) -> dict[str, Any] | None:
    """The members of a JSON object the gateway reads (``error``, ``choices``, ``usage``),
    decoded, or ``LARGE``; None when ``data`` is not a JSON object.

    An event no larger than ``MAX_READ_MEMBER_BYTES`` (nearly all of them) is decoded
    whole, in one call: whatever it holds, it cannot cost much. Any other event, or one
    orjson cannot decode whole, is decoded to its top level and then member by member.
    """
    if len(data) <= MAX_READ_MEMBER_BYTES:
        try:
            whole = orjson.loads(data)
        except orjson.JSONDecodeError:
            # Perhaps valid JSON orjson cannot hold (a number such as 1e400): judged
            # member by member below, as a large event is.
            pass
        else:
            return whole if isinstance(whole, dict) else None
    try:
        members = _TOP_LEVEL.decode(data)
    except (msgspec.DecodeError, RecursionError):  # ValidationError: JSON, not an object
        return None
    payload: dict[str, Any] = {}
    for name in _READ_MEMBERS:
        raw = members.get(name)
        if raw is None:
            continue
        if len(raw) > MAX_READ_MEMBER_BYTES:
            payload[name] = LARGE
            continue
        try:
            payload[name] = _VALUE.decode(raw)
        except msgspec.DecodeError:  # e.g. a number out of range: not a usable value
            payload[name] = LARGE
    return payload


def classify(event: bytes) -> tuple[EventKind, Any]:
    """What an event means for the commit decision, with the members read of it."""
    data = event_data(event)
    if data is None:
        return EventKind.PREAMBLE, None
    if data == DONE_DATA:
        return EventKind.DONE, None
    payload = read_members(data)
    if payload is None:
        return EventKind.INVALID, None
    if payload.get("error") is not None:
        return EventKind.ERROR, payload
    choices = payload.get("choices")
    if not choices:
        return (EventKind.USAGE if payload.get("usage") else EventKind.PREAMBLE), payload
    if carries_content(choices):
        return EventKind.CONTENT, payload
    return EventKind.PREAMBLE, payload


def carries_content(choices: Any) -> bool:
    """Does a chunk's ``choices`` carry anything a client reads: text, a delta besides
    the role (content, tool calls, refusals, and the reasoning fields of DeepSeek/vLLM
    ``reasoning_content`` or Ollama ``reasoning``) or a finish reason?"""
    if choices is LARGE:
        return True  # 64 KiB of choices is not a role-only preamble
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") is not None or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


def carries_nothing(choices: Any) -> bool:
    """Is every choice empty: nothing but its ``index``, null or empty members, and a
    delta with no value at all (not even the role)? LiteLLM puts its usage on such a
    chunk."""
    if not choices:
        return True
    if choices is LARGE or not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            return False
        for name, value in choice.items():
            if name == "index" or not value:
                continue
            if name == "delta" and isinstance(value, dict) and not any(value.values()):
                continue
            return False  # text, a message, a role, a finish reason, logprobs...
    return True


def usage_position(data: bytes, start: int = 0) -> int:
    """Where the first usage object in ``data`` is, or -1 (``"usage": null`` is none).

    Two substring searches find the spellings JSON encoders write; a third, which finds
    nothing in nearly every block, catches a space before the colon.
    """
    position = data.find(b'"usage":{', start)
    spaced = data.find(b'"usage": {', start)
    if spaced >= 0 and (position < 0 or spaced < position):
        position = spaced
    if data.find(b'"usage" ', start) >= 0:
        odd = _odd_usage_position(data, start)
        if odd >= 0 and (position < 0 or odd < position):
            position = odd
    return position


_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


def _odd_usage_position(data: bytes, start: int) -> int:
    position = data.find(b'"usage" ', start)
    while position >= 0:
        if _USAGE_OBJECT.match(data, position):
            return position
        position = data.find(b'"usage" ', position + 1)
    return -1


def may_carry_usage(data: bytes) -> bool:
    """Cheap pre-check before parsing: does an event (or a block of them) hold a usage
    object? ``"usage": null``, which OpenAI puts in every chunk, does not count."""
    return usage_position(data) >= 0


def split_events(block: bytes) -> list[bytes]:
    """The events of a block that holds only complete events."""
    return EventSplitter().feed(block)


def usage_of(payload: Any) -> tuple[int | None, int | None, bool]:
    """(prompt tokens, completion tokens, usage-only chunk?) of a parsed chunk.

    A chunk is usage-only when it carries nothing else: no choices (OpenAI's usage chunk)
    or only empty ones (LiteLLM's).
    """
    if not isinstance(payload, dict):
        return None, None, False
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None, None, False
    return (
        _token_count(usage.get("prompt_tokens")),
        _token_count(usage.get("completion_tokens")),
        carries_nothing(payload.get("choices")),
    )


# A token count the gateway believes: an integer a 64-bit counter (and the access line's
# JSON) can hold. An upstream's 10**23 is no usage at all, not a reason to fail.
MAX_TOKEN_COUNT = 2**63 - 1


def _token_count(value: Any) -> int | None:
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and -MAX_TOKEN_COUNT <= value <= MAX_TOKEN_COUNT
    ):
        return value
    return None


_ENCODER = msgspec.json.Encoder()


def without_usage(event: bytes) -> bytes:
    """``event`` with its payload's top-level ``usage`` member removed; every other member
    is written back as the raw bytes the upstream sent, and so are the event's other
    lines (``id:``, ``event:``). An event whose data is not a JSON object is returned
    as it is."""
    data = event_data(event)
    if data is None:
        return event
    try:
        members = _TOP_LEVEL.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return event
    if members.pop("usage", None) is None:
        return event
    # The one data line where the first was; the other fields (id:, event:) kept as sent.
    lines: list[bytes] = []
    placed = False
    for line in event.splitlines():
        if line.startswith(b"data:"):
            if not placed:
                lines.append(b"data: " + _ENCODER.encode(members))
                placed = True
        elif line:
            lines.append(line)
    lines.append(b"\n")
    return b"\n".join(lines)


def error_event(error: dict[str, Any]) -> bytes:
    """The one event that tells a client the stream broke (no ``[DONE]`` follows)."""
    return b"data: " + orjson.dumps(error) + b"\n\n"
