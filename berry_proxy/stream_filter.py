"""What of an upstream stream reaches the client, decided block by block.

A block is a run of complete SSE events as the upstream sent them. It goes out untouched
unless it holds a mark: ``[DONE]`` (the stream is done; nothing after it is sent), an
upstream error event (forwarded as the stream's one error event; nothing after it), or a
usage object (its token counts are noted). When the gateway asked for usage and the client
did not, the usage never reaches the client: a chunk that carries nothing else is dropped
(OpenAI's usage chunk has no choices, LiteLLM's has one empty choice), and a chunk that
also carries content is sent re-encoded without its ``usage`` member.
"""

from __future__ import annotations

import enum

from .context import RequestContext
from .sse import (
    EventKind,
    classify,
    is_done,
    may_carry_usage,
    split_events,
    usage_of,
    usage_position,
    without_usage,
)


class StreamEnd(enum.Enum):
    """How a committed stream ended."""

    DONE = "done"  # the upstream finished with [DONE]
    BROKEN = "broken"  # the upstream failed; the client got one error event
    CLIENT_GONE = "client_gone"  # the client left; not the provider's fault
    DRAINED = "drained"  # the gateway's drain ran out (drain.py); nobody's fault


def forwardable(
    ctx: RequestContext, block: bytes, add_usage: bool
) -> tuple[bytes, StreamEnd | None]:
    """The bytes to send for a block of complete events, and how the stream ended.

    Notes the token usage, and removes it when the client did not ask for it (the
    gateway did, to learn the usage). Stops after ``[DONE]`` or after an
    error event from the upstream; nothing after them is sent.

    Only events holding a mark (``[DONE]``, an ``"error"`` key, a usage object) are
    looked at; the bytes between them go out as slices of the block. Nearly every
    block has no mark and costs two substring searches and a test (OpenAI's chunks carry
    ``"usage":null`` once usage is asked for: those cost the usage search too).
    """
    done = block.find(b"[DONE]")
    error = block.find(b'"error"')
    usage = usage_position(block) if b'"usage"' in block else -1
    if done < 0 and error < 0 and usage < 0:
        return block, None  # nearly every block: no mark, whatever its line endings
    if b"\r" in block:
        return forwardable_events(ctx, split_events(block), add_usage)
    out: list[bytes] = []
    position = 0
    end: StreamEnd | None = None
    while end is None:
        # A kind not found stays not found; one already passed is searched again.
        if 0 <= done < position:
            done = block.find(b"[DONE]", position)
        if 0 <= error < position:
            error = block.find(b'"error"', position)
        if 0 <= usage < position:
            usage = usage_position(block, position)
        mark = min(m if m >= 0 else len(block) for m in (done, error, usage))
        if mark == len(block):
            out.append(block[position:])
            break
        start = block.rfind(b"\n\n", position, mark)
        start = position if start < 0 else start + 2
        stop = block.find(b"\n\n", mark)
        stop = len(block) if stop < 0 else stop + 2
        out.append(block[position:start])
        keep, end = marked_event(ctx, block[start:stop], add_usage)
        if keep:
            out.append(keep)
        position = stop
    return b"".join(out), end


def forwardable_events(
    ctx: RequestContext, events: list[bytes], add_usage: bool
) -> tuple[bytes, StreamEnd | None]:
    """``_forwardable`` one event at a time, for any line endings."""
    out: list[bytes] = []
    end: StreamEnd | None = None
    for event in events:
        keep, end = marked_event(ctx, event, add_usage)
        out.append(keep)
        if end is not None:
            break
    return b"".join(out), end


def marked_event(
    ctx: RequestContext, event: bytes, add_usage: bool
) -> tuple[bytes, StreamEnd | None]:
    """What to send of one event that may end the stream or carry usage."""
    if is_done(event):
        return event, StreamEnd.DONE
    if b'"error"' in event and classify(event)[0] is EventKind.ERROR:
        return event, StreamEnd.BROKEN
    if may_carry_usage(event):
        _, payload = classify(event)
        prompt, completion, usage_only = usage_of(payload)
        if prompt is not None:
            ctx.prompt_tokens = prompt
        if completion is not None:
            ctx.completion_tokens = completion
        if add_usage:
            # The gateway asked for usage the client did not: it never reaches the client.
            return (b"" if usage_only else without_usage(event)), None
    return event, None
