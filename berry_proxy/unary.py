"""A non-streaming answer: one upstream response, read whole, checked, passed back.

Bounds: the exchange (send, headers, body) within the provider's total timeout and the
request's deadline; the body within ``max_response_bytes`` after decompression, or
``MAX_ERROR_BODY_BYTES`` for a caller error passed through. Past either limit the attempt
is a ``TOO_LARGE`` failure: another backend is tried, this one is not tried again, and no
breaker is charged (the request may well be what made the answer huge). A failure's body
(5xx, 429, 401/403, a redirect) is never read: the status says all, and a hostile upstream
must not make each attempt hold ``max_response_bytes``. A 200 that is not JSON is a protocol failure
(the next backend may do better); it is checked by ``msgspec`` down to the top level
without building the document, so a huge answer costs one pass over its bytes, and only
a small ``usage`` member is decoded. The provider's own secrets are redacted from the body.

The answer is written by aiohttp once the connection slot is given back;
``server.GatewayRequestHandler`` drops a client that takes nothing of it for the
provider's idle limit (set here as the request's ``SEND_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import msgspec
from aiohttp import web

from . import keys
from .config import DEFAULT_TOTAL_TIMEOUT_SECONDS
from .context import RequestContext
from .deadline import Phase, Watchdog
from .drain import Drain, draining_error
from .errors import FailureKind, UpstreamFailure, upstream_errors
from .exchange import Attempt, Exchange
from .openai_request import Endpoint
from .outcomes import Outcomes
from .response_headers import served_by
from .sse import MAX_READ_MEMBER_BYTES, usage_of
from .upstream import UpstreamResponse, passable_response_headers

Clock = Callable[[], float]

# A caller error's body (passed through as it is) is at most this large; a larger one is
# not an error message but a broken answer (a TOO_LARGE failure).
MAX_ERROR_BODY_BYTES = 1024 * 1024

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
    drain: Drain,
) -> web.Response:
    backend = attempt.backend
    config = backend.provider.config
    total = config.total_timeout_seconds or DEFAULT_TOTAL_TIMEOUT_SECONDS
    started = clock()
    # Only a hard limit (no gap): a watchdog so that a drain that runs out can end it too.
    watchdog = Watchdog()
    watched = drain.watched
    try:
        with upstream_errors("response"):
            async with asyncio.timeout(None) as timeout:
                limit = asyncio.get_running_loop().time() + min(total, attempt.deadline - started)
                watchdog.start(timeout, math.inf, limit, Phase.DEADLINE)
                drain.watch(watchdog)
                try:
                    upstream, data = await _fetch(attempt, endpoint)
                finally:
                    watchdog.cancel()
                    watched.discard(watchdog)
    except UpstreamFailure:
        if watchdog.expired is not Phase.DRAIN:
            raise
        # Not the upstream's failure, and no other backend is tried: this instance stops.
        ctx.abort_reason = "draining"
        outcomes.drained(exchange)
        raise draining_error() from None
    finally:
        latency = clock() - started
        ctx.upstream_seconds += latency

    status = upstream.status
    ok = 200 <= status < 300
    if ok:
        prompt, completion = _usage(data)
        ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
        outcomes.served(exchange, latency)
        outcomes.model_outcome(backend.model.id, ok=True, latency=latency)
    else:
        outcomes.passed_through(exchange)
    if attempt.adapter.redact:
        data = attempt.adapter.redact(data)
    headers = passable_response_headers(upstream.headers)
    headers.update(served_by(ctx, backend, clock()))
    request[keys.SEND_TIMEOUT] = config.idle_timeout_seconds
    # What the client gets, known now: the handler's unwinding (the rate limiter's
    # settlement) must not wait for the middleware to learn it.
    ctx.status = status
    return web.Response(body=data, status=status, headers=headers)


async def _fetch(attempt: Attempt, endpoint: Endpoint) -> tuple[UpstreamResponse, bytes]:
    """Send the attempt and read its whole answer; the connection is closed unless it was
    read to its end (a failure's body is never read)."""
    backend = attempt.backend
    upstream = await attempt.adapter.send(
        endpoint.upstream_path,
        backend.config.model,
        attempt.body,
        attempt.headers,
        backend.model.name,
    )
    try:
        failure = upstream.failure()
        if failure is not None:
            raise failure
        ok = 200 <= upstream.status < 300
        limit = backend.provider.config.max_response_bytes if ok else MAX_ERROR_BODY_BYTES
        return upstream, await upstream.read(limit)
    except BaseException:
        upstream.abort()
        raise


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
    raw = document.get("usage")
    if raw is None or len(raw) > MAX_READ_MEMBER_BYTES:
        return None, None  # none, or too large to be a real one: not built into objects
    try:
        usage = _VALUE.decode(raw)
    except msgspec.DecodeError:  # e.g. a number out of range
        return None, None
    prompt, completion, _ = usage_of({"usage": usage})
    return prompt, completion
