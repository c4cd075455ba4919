"""A non-streaming answer: one upstream response, read whole, checked, passed back.

Bounds: the exchange (send, headers, body) within the provider's total timeout and the
request's deadline; the body within ``max_response_bytes`` after decompression. A 200 that
is not JSON is a protocol failure (the next backend may do better); it is checked by
``msgspec`` down to the top level without building the document, so a huge answer costs
one pass over its bytes. The provider's own secrets are redacted from the body.

Writing the answer: a body that fits the socket's buffers is left to aiohttp; a larger
one is written here, where a client that stops reading is cut off after the provider's
idle limit (``abort_reason: client_stalled``) instead of holding its buffer forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
from aiohttp import web

from .config import DEFAULT_TOTAL_TIMEOUT_SECONDS
from .context import RequestContext
from .errors import FailureKind, UpstreamFailure, upstream_errors
from .exchange import Attempt, Exchange
from .openai_request import Endpoint
from .outcomes import Outcomes
from .response_headers import served_by
from .sse import usage_of
from .upstream import UpstreamResponse, passable_response_headers

Clock = Callable[[], float]

# aiohttp writes without waiting while its buffer holds less than this (its writer's
# LIMIT): a smaller answer cannot stall on a client that does not read.
UNBLOCKED_WRITE_BYTES = 64 * 1024

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_VALUE = msgspec.json.Decoder()


async def unary(
    request: web.Request,
    ctx: RequestContext,
    endpoint: Endpoint,
    attempt: Attempt,
    exchange: Exchange,
    outcomes: Outcomes,
    clock: Clock,
) -> web.Response:
    backend = attempt.backend
    config = backend.provider.config
    total = config.total_timeout_seconds or DEFAULT_TOTAL_TIMEOUT_SECONDS
    started = clock()
    upstream: UpstreamResponse | None = None
    finished = False
    try:
        with upstream_errors("response"):
            async with asyncio.timeout(min(total, attempt.deadline - started)):
                upstream = await attempt.adapter.send(
                    endpoint.upstream_path, backend.config.model, attempt.body, attempt.headers
                )
                data = await upstream.read(config.max_response_bytes)
        finished = True
    finally:
        latency = clock() - started
        ctx.upstream_seconds += latency
        if upstream is not None and not finished:
            upstream.abort()

    assert upstream is not None  # noqa: S101  # read, or raised above
    failure = upstream.failure()
    if failure is not None:
        raise failure
    if 200 <= upstream.status < 300:
        prompt, completion = _usage(data)
        ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
        outcomes.served(exchange, latency)
        outcomes.model_outcome(backend.model.id, ok=True, latency=latency)
    if attempt.adapter.redact:
        data = attempt.adapter.redact(data)
    headers = passable_response_headers(upstream.headers)
    headers.update(served_by(ctx, backend, clock()))
    response = web.Response(body=data, status=upstream.status, headers=headers)
    if len(data) > UNBLOCKED_WRITE_BYTES:
        await _write_bounded(request, ctx, response, config.idle_timeout_seconds)
    return response


def _usage(data: bytes) -> tuple[int | None, int | None]:
    """Token usage of a 2xx answer; raises PROTOCOL when the answer is not JSON."""
    try:
        document = _TOP_LEVEL.decode(data)
    except msgspec.ValidationError:
        return None, None  # JSON, but not an object: nothing to account
    except (msgspec.DecodeError, RecursionError):
        raise UpstreamFailure(
            FailureKind.PROTOCOL, "upstream answered 200 with a body that is not JSON"
        ) from None
    if "usage" not in document:
        return None, None
    try:
        usage = _VALUE.decode(document["usage"])
    except (msgspec.DecodeError, RecursionError):  # pragma: no cover - validated above
        return None, None
    prompt, completion, _ = usage_of({"usage": usage})
    return prompt, completion


async def _write_bounded(
    request: web.Request, ctx: RequestContext, response: web.Response, idle: float
) -> None:
    """Send ``response`` now, giving up on a client that reads nothing for ``idle`` s."""
    try:
        await response.prepare(request)
        async with asyncio.timeout(idle):
            await response.write_eof()
    except TimeoutError:
        ctx.abort_reason = "client_stalled"
        transport = request.transport
        if transport is not None:
            transport.abort()  # drop what is buffered for it, and the connection
    except ConnectionResetError:
        ctx.abort_reason = "client_disconnected"
