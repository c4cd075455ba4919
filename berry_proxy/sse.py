"""Server-sent events as bytes: split a stream into events without re-encoding them.

The proxy forwards each upstream event byte for byte; it only needs to know where events
end, and, for a few events, what they say (does this one carry content? is it the final
usage chunk? ``[DONE]``?). Parsing is done only where a decision needs it.
"""

from __future__ import annotations

import enum
from typing import Any

import orjson

DONE_DATA = b"[DONE]"
_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventSplitter:
    """Feed raw chunks, get back the complete events (each with its blank-line ending)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        # Almost every server ends events with "\n\n"; the slower search for the other
        # endings is needed only when the data holds a "\r" at all.
        find = _next_boundary if b"\r" in data else _next_lf_boundary
        while True:
            end, width = find(data, start)
            if end < 0:
                break
            events.append(data[start : end + width])
            start = end + width
        self._buffer = data[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has not ended yet."""
        return self._buffer


def _next_lf_boundary(data: bytes, start: int) -> tuple[int, int]:
    return data.find(b"\n\n", start), 2


def _next_boundary(data: bytes, start: int) -> tuple[int, int]:
    best, width = data.find(b"\n\n", start), 2
    for boundary in _BOUNDARIES[1:]:
        found = data.find(boundary, start)
        if found >= 0 and (best < 0 or found < best):
            best, width = found, len(boundary)
    return best, width


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of an event, or None for a comment-only event."""
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


def classify(event: bytes) -> tuple[EventKind, Any]:
    """What an event means for the commit decision, with its parsed payload."""
    data = event_data(event)
    if data is None:
        return EventKind.PREAMBLE, None
    if data == DONE_DATA:
        return EventKind.DONE, None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return EventKind.INVALID, None
    if not isinstance(payload, dict):
        return EventKind.INVALID, None
    if payload.get("error") is not None:
        return EventKind.ERROR, payload
    choices = payload.get("choices")
    if not choices:
        return (EventKind.USAGE if payload.get("usage") else EventKind.PREAMBLE), payload
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") is not None or choice.get("text"):
            return EventKind.CONTENT, payload
        delta = choice.get("delta")
        # Anything besides the role commits: content, tool calls, refusals, and the
        # reasoning fields of DeepSeek/vLLM ("reasoning_content") or Ollama ("reasoning").
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return EventKind.CONTENT, payload
    return EventKind.PREAMBLE, payload


def may_carry_usage(event: bytes) -> bool:
    """Cheap pre-check before parsing: only a chunk with a non-null usage matters."""
    return b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event


def usage_of(payload: Any) -> tuple[int | None, int | None, bool]:
    """(prompt tokens, completion tokens, usage-only chunk?) of a parsed chunk."""
    if not isinstance(payload, dict):
        return None, None, False
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None, None, False
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (
        prompt if isinstance(prompt, int) else None,
        completion if isinstance(completion, int) else None,
        not payload.get("choices"),
    )


def error_event(error: dict[str, Any]) -> bytes:
    """The one event that tells a client the stream broke (no ``[DONE]`` follows)."""
    return b"data: " + orjson.dumps(error) + b"\n\n"
