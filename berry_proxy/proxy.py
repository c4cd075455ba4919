"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``.

For each request: validate the few fields the gateway must understand, resolve the model
and the user's permission, ask the router for an attempt order, then try backends in that
order until one answers. Nothing reaches the client until an attempt has succeeded (for a
stream: until its first event with content), so every failure before that point moves on
to the next backend invisibly.

Streams are copied as the upstream sends them, byte for byte, in blocks of whole events
(an event cut across two reads goes out once it is complete). After the commit point a
failure ends the stream with one ``data: {"error": ...}`` event and no ``[DONE]``. A client
that leaves cancels the handler; the upstream connection is then closed at once so the
provider stops generating.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import keys
from .auth import Access, access, resolve_model
from .config import DEFAULT_TOTAL_TIMEOUT_SECONDS, Config
from .context import RequestContext
from .errors import (
    FailureKind,
    InvalidRequest,
    ServiceUnavailable,
    UpstreamFailure,
    error_for_failures,
    failure_for_status,
    invalid_parameter,
    map_upstream_exception,
    missing_parameter,
    parse_retry_after,
    reraise_as_failure,
)
from .log import get_logger
from .pool import Backend, BackendPool, ProviderState
from .routing import Router
from .sse import (
    EventKind,
    EventSplitter,
    classify,
    error_event,
    is_done,
    may_carry_usage,
    split_events,
    usage_of,
    usage_position,
)
from .upstream import (
    Adapter,
    UpstreamResponse,
    forwardable_request_headers,
    passable_response_headers,
)

Clock = Callable[[], float]

error_log = get_logger("berry_proxy.errors")

# Events before the commit point are held back; past this size the stream commits anyway.
MAX_HELD_BYTES = 64 * 1024
_COMMITTING = frozenset({EventKind.CONTENT, EventKind.USAGE, EventKind.DONE})
STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    upstream_path: str  # relative to the provider's base URL
    required: str  # the field besides "model" that must be present
    streams: bool


CHAT = Endpoint("chat/completions", "messages", streams=True)
COMPLETIONS = Endpoint("completions", "prompt", streams=True)
EMBEDDINGS = Endpoint("embeddings", "input", streams=False)

# OpenAI's documented ranges for the sampling fields; checked before any upstream call.
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_POSITIVE_INTS = ("n", "max_tokens", "max_completion_tokens")


def parse_request(raw: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """The request body as a dict, or a 400 naming the first bad field."""
    if not raw.strip():
        raise InvalidRequest("invalid_json", "The request body must be a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("invalid_json", f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_json", "The request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise missing_parameter("model")
    if not isinstance(model, str) or not model:
        raise invalid_parameter("model", "must be a non-empty string")
    required = body.get(endpoint.required)
    if required is None:
        raise missing_parameter(endpoint.required)
    if endpoint is CHAT:
        if not isinstance(required, list) or not required:
            raise invalid_parameter("messages", "must be a non-empty array of messages")
    elif not isinstance(required, str | list):
        raise invalid_parameter(endpoint.required, "must be a string or an array")
    for name, (low, high) in _RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_parameter(name, "must be a number")
        if not low <= value <= high:
            raise invalid_parameter(name, f"must be between {low:g} and {high:g}")
    for name in _POSITIVE_INTS:
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise invalid_parameter(name, "must be a positive integer")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_parameter("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_parameter("stream_options", "must be an object")
    return body


def wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def upstream_body(raw: bytes, body: dict[str, Any], backend_model: str, add_usage: bool) -> bytes:
    """The client's request for this backend: only ``model`` (and usage opt-in) rewritten."""
    if body["model"] == backend_model and not add_usage:
        return raw
    rewritten = dict(body, model=backend_model)
    if add_usage:
        options = body.get("stream_options") or {}
        rewritten["stream_options"] = {**options, "include_usage": True}
    try:
        return orjson.dumps(rewritten)
    except orjson.JSONEncodeError:
        # orjson reads deeper nesting than it writes (1024 vs 254 levels); the standard
        # library writes whatever was read.
        return json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(slots=True)
class Attempt:
    """One try of one backend."""

    backend: Backend
    adapter: Adapter
    body: bytes
    headers: dict[str, str]
    deadline: float  # monotonic; the request's overall deadline
    add_usage: bool  # we asked for usage the client did not: drop the usage-only chunk


class StreamEnd(enum.Enum):
    """How a committed stream ended."""

    DONE = "done"  # the upstream finished with [DONE]
    BROKEN = "broken"  # the upstream failed; the client got one error event
    CLIENT_GONE = "client_gone"  # the client left; not the provider's fault


class Proxy:
    def __init__(
        self,
        config: Config,
        pool: BackendPool,
        router: Router,
        adapters: Mapping[str, Adapter],
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.pool = pool
        self.router = router
        self.adapters = adapters
        self.clock = clock

    async def handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        ctx = request[keys.REQUEST_CONTEXT]
        user = request[keys.USER]
        raw = await request.read()
        body = parse_request(raw, endpoint)
        model = resolve_model(self.config, user, body["model"])
        ctx.model = model.id
        stream = endpoint.streams and body.get("stream") is True
        ctx.stream = stream

        plan = self.router.plan(model, user)
        if not plan:
            total = len(self.pool.backends[model.id])
            raise ServiceUnavailable(
                "no_healthy_backends",
                "No healthy backends available for the requested model",
                details={"model": model.name, "total_backends": total, "healthy_backends": 0},
                headers={"Retry-After": "1"},
            )

        settings = self.config.settings
        deadline = ctx.started + settings.request_timeout_seconds
        headers = forwardable_request_headers(request.headers)
        headers["Content-Type"] = "application/json"
        headers["X-Request-ID"] = ctx.request_id
        add_usage = stream and not wants_usage(body)
        bodies: dict[str, bytes] = {}  # backend model -> rewritten body, built once each
        failures: list[UpstreamFailure] = []
        per_provider: dict[str, int] = {}
        for backend in plan:
            if len(failures) >= settings.max_retries or self.clock() >= deadline:
                break
            provider = backend.provider.config
            tried = per_provider.get(provider.id, 0)
            if provider.max_retries is not None and tried >= provider.max_retries:
                continue
            per_provider[provider.id] = tried + 1
            ctx.attempts += 1
            backend_model = backend.config.model
            upstream_request = bodies.get(backend_model)
            if upstream_request is None:
                upstream_request = bodies[backend_model] = upstream_body(
                    raw, body, backend_model, add_usage
                )
            attempt = Attempt(
                backend=backend,
                adapter=self.adapters[provider.id],
                body=upstream_request,
                headers=dict(headers),
                deadline=deadline,
                add_usage=add_usage,
            )
            try:
                if stream:
                    return await self._stream(request, ctx, endpoint, attempt)
                return await self._unary(ctx, endpoint, attempt)
            except UpstreamFailure as failure:
                failures.append(failure)
                ctx.failures.append(f"{provider.id}: {failure.kind.value}")
                if failure.kind is not FailureKind.SATURATED:
                    self.pool.record_failure(backend, failure)
        if not failures:
            failures.append(
                UpstreamFailure(FailureKind.TIMEOUT, "request deadline passed before an attempt")
            )
        self.pool.record_model_outcome(model.id, ok=False, latency=0.0)
        raise error_for_failures(failures)

    # ----------------------------------------------------------------------------------
    # Non-streaming
    # ----------------------------------------------------------------------------------

    async def _unary(
        self, ctx: RequestContext, endpoint: Endpoint, attempt: Attempt
    ) -> web.Response:
        backend = attempt.backend
        provider = backend.provider
        total = provider.config.total_timeout_seconds or DEFAULT_TOTAL_TIMEOUT_SECONDS
        await self._acquire(provider)
        started = self.clock()
        upstream: UpstreamResponse | None = None
        finished = False
        try:
            try:
                async with asyncio.timeout(min(total, attempt.deadline - started)):
                    upstream = await attempt.adapter.send(
                        endpoint.upstream_path, backend.config.model, attempt.body, attempt.headers
                    )
                    data = await upstream.read()
            except Exception as exc:
                reraise_as_failure(exc, "response")
            finished = True
        finally:
            provider.slots.release()
            latency = self.clock() - started
            ctx.upstream_seconds += latency
            if upstream is not None and not finished:
                upstream.abort()

        status = upstream.status
        self._check_status(status, upstream)
        if 200 <= status < 300:
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamFailure(
                    FailureKind.PROTOCOL, "upstream answered 200 with a body that is not JSON"
                ) from None
            prompt, completion, _ = usage_of(payload)
            ctx.prompt_tokens, ctx.completion_tokens = prompt, completion
            self.pool.record_success(backend, latency)
            self.pool.record_model_outcome(backend.model.id, ok=True, latency=latency)
        headers = passable_response_headers(upstream.headers)
        headers.update(self._served_by(ctx, backend))
        return web.Response(body=data, status=status, headers=headers)

    def _check_status(self, status: int, upstream: UpstreamResponse) -> None:
        """Raise the failure an upstream status means; caller errors pass through."""
        if 300 <= status < 400:
            # Following or forwarding a redirect could leak the upstream URL.
            raise UpstreamFailure(
                FailureKind.PROTOCOL,
                f"upstream answered with a redirect (HTTP {status})",
                status=status,
            )
        failure = failure_for_status(status, parse_retry_after(upstream.headers.get("Retry-After")))
        if failure is not None:
            raise failure

    async def _acquire(self, provider: ProviderState) -> None:
        """Take one of the provider's connection slots, waiting at most its connect timeout.

        Running out of slots is the gateway's own limit (``max_connections``), not a sign
        of a sick provider: the failure is SATURATED and never counts against it.
        """
        if not provider.slots.locked():
            await provider.slots.acquire()
            return
        try:
            async with asyncio.timeout(provider.config.connect_timeout_seconds):
                await provider.slots.acquire()
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.SATURATED, "every connection to the provider is busy"
            ) from None

    def _served_by(self, ctx: RequestContext, backend: Backend) -> dict[str, str]:
        ctx.provider = backend.provider.id
        ctx.backend_model = backend.config.model
        now = self.clock()
        overhead = ctx.commit(now)
        ctx.time_to_first_byte = now - ctx.started
        return {
            "X-Request-ID": ctx.request_id,
            "X-Berry-Provider": backend.provider.id,
            "X-Berry-Backend-Model": backend.config.model,
            "X-Berry-Attempts": str(ctx.attempts),
            "X-Berry-Overhead-Ms": f"{overhead * 1000:.3f}",
        }

    # ----------------------------------------------------------------------------------
    # Streaming
    # ----------------------------------------------------------------------------------

    async def _stream(
        self,
        request: web.Request,
        ctx: RequestContext,
        endpoint: Endpoint,
        attempt: Attempt,
    ) -> web.StreamResponse:
        backend = attempt.backend
        provider = backend.provider
        await self._acquire(provider)
        started = self.clock()
        upstream: UpstreamResponse | None = None
        answered_at: float | None = None  # when the upstream's answer became final
        end = StreamEnd.BROKEN
        try:
            upstream, held, answered_at, splitter = await self._open_stream(
                endpoint, attempt, started
            )
            ctx.upstream_seconds += answered_at - started
            if isinstance(held, bytes):
                # A caller error (4xx) answered before any event: pass it through as is.
                end = StreamEnd.DONE
                headers = passable_response_headers(upstream.headers)
                headers.update(self._served_by(ctx, backend))
                return web.Response(body=held, status=upstream.status, headers=headers)
            # All headers at once: this response is prepared here, so the request-id
            # middleware cannot add X-Request-ID to it later (_served_by includes it).
            response = web.StreamResponse(
                status=200, headers={**STREAM_HEADERS, **self._served_by(ctx, backend)}
            )
            try:
                end = await self._copy(request, ctx, upstream, response, held, splitter, attempt)
            except Exception:
                if not response.prepared:
                    raise
                # A bug of ours after the commit: the status line is gone, so the client
                # must still learn from one error event that the answer is incomplete.
                error_log.exception("stream_internal_error", request_id=ctx.request_id)
                ctx.abort_reason = "internal_error"
                end = await self._send_error_event(
                    ctx, response, "internal_error", "The gateway failed while streaming"
                )
            latency = answered_at - started
            if end is StreamEnd.DONE:
                self.pool.record_success(backend, latency)
            if end is not StreamEnd.CLIENT_GONE:
                self.pool.record_model_outcome(
                    backend.model.id, ok=end is StreamEnd.DONE, latency=latency
                )
            return response
        except asyncio.CancelledError:
            ctx.abort_reason = "client_disconnected"
            raise
        finally:
            provider.slots.release()
            if answered_at is None:
                # A failed attempt: its time is upstream time, not gateway overhead.
                ctx.upstream_seconds += self.clock() - started
            if upstream is not None:
                # release() keeps a fully read connection for reuse and closes any other.
                if end is StreamEnd.DONE:
                    upstream.release()
                else:
                    upstream.abort()

    async def _open_stream(
        self, endpoint: Endpoint, attempt: Attempt, started: float
    ) -> tuple[UpstreamResponse, bytes | list[bytes], float, EventSplitter]:
        """Send the request and read up to the commit point.

        Returns the upstream response; then either the body of a pass-through error
        (bytes) or the held events up to the committing one; the time the committing event
        arrived (the time to first token); and the splitter holding what came after it.
        Raises ``UpstreamFailure`` for anything worth failing over.
        """
        backend = attempt.backend
        config = backend.provider.config
        first_byte = min(config.first_byte_timeout_seconds, attempt.deadline - started)
        upstream: UpstreamResponse | None = None
        try:
            try:
                async with asyncio.timeout(first_byte):
                    upstream = await attempt.adapter.send(
                        endpoint.upstream_path, backend.config.model, attempt.body, attempt.headers
                    )
                    splitter = EventSplitter()
                    if upstream.status != 200:
                        body = await upstream.read()
                        self._check_status(upstream.status, upstream)
                        return upstream, body, self.clock(), splitter
                    if not upstream.content_type.startswith("text/event-stream"):
                        raise UpstreamFailure(
                            FailureKind.PROTOCOL, "upstream did not answer with an event stream"
                        )
                    held: list[bytes] = []
                    held_bytes = 0
                    while True:
                        chunk = await upstream.read_chunk()
                        if not chunk:
                            raise UpstreamFailure(
                                FailureKind.PROTOCOL,
                                "upstream ended the stream before any content",
                            )
                        arrived_at = self.clock()
                        splitter.push(chunk)
                        while (event := splitter.pop()) is not None:
                            kind, _ = classify(event)
                            if kind is EventKind.INVALID:
                                raise UpstreamFailure(
                                    FailureKind.PROTOCOL, "upstream sent an event that is not JSON"
                                )
                            if kind is EventKind.ERROR:
                                raise UpstreamFailure(
                                    FailureKind.SERVER, "upstream reported an error in the stream"
                                )
                            held.append(event)
                            held_bytes += len(event)
                            if kind in _COMMITTING or held_bytes > MAX_HELD_BYTES:
                                # Events that arrived with the committing one stay in the
                                # splitter; the copy loop sends them right after these.
                                return upstream, held, arrived_at, splitter
            except Exception as exc:
                reraise_as_failure(exc, "first byte")
        except BaseException:
            if upstream is not None:
                upstream.abort()
            raise

    async def _copy(
        self,
        request: web.Request,
        ctx: RequestContext,
        upstream: UpstreamResponse,
        response: web.StreamResponse,
        held: list[bytes],
        splitter: EventSplitter,
        attempt: Attempt,
    ) -> StreamEnd:
        """Commit the response and copy the stream until it ends."""
        config = attempt.backend.provider.config
        idle = config.idle_timeout_seconds
        stream_deadline = (
            self.clock() + config.total_timeout_seconds
            if config.total_timeout_seconds is not None
            else None
        )
        pending = b"".join(held) + splitter.take_block()
        try:
            await response.prepare(request)
        except ConnectionResetError:
            ctx.abort_reason = "client_disconnected"
            return StreamEnd.CLIENT_GONE
        while True:
            out, end = self._forwardable(ctx, pending, attempt.add_usage)
            if out:
                try:
                    if end is None:
                        await response.write(out)
                    else:
                        # The last bytes: one write with the end-of-body marker (and the
                        # headers, when the whole stream came in one block).
                        await response.write_eof(out)
                except ConnectionResetError:
                    ctx.abort_reason = "client_disconnected"
                    return StreamEnd.CLIENT_GONE
            if end is StreamEnd.DONE:
                return end
            if end is StreamEnd.BROKEN:
                # The upstream's own error event went out: it is the one error event.
                self._record_broken(
                    ctx,
                    attempt,
                    UpstreamFailure(FailureKind.SERVER, "upstream reported an error mid-stream"),
                )
                return end
            timeout = idle
            if stream_deadline is not None:
                timeout = min(timeout, stream_deadline - self.clock())
            try:
                async with asyncio.timeout(timeout):
                    chunk = await upstream.read_chunk()
            except Exception as exc:
                failure = map_upstream_exception(exc, "stream")
                if failure is None:
                    raise
                return await self._break_stream(ctx, response, attempt, failure)
            if not chunk:
                failure = UpstreamFailure(FailureKind.NETWORK, "upstream ended the stream early")
                return await self._break_stream(ctx, response, attempt, failure)
            pending = splitter.feed_block(chunk)

    def _forwardable(
        self, ctx: RequestContext, block: bytes, add_usage: bool
    ) -> tuple[bytes, StreamEnd | None]:
        """The bytes to send for a block of complete events, and how the stream ended.

        Notes the token usage, and drops the usage-only chunk when the client did not ask
        for it (the gateway did, to learn the usage). Stops after ``[DONE]`` or after an
        error event from the upstream; nothing after them is sent.

        Only events holding a mark (``[DONE]``, an ``"error"`` key, a usage object) are
        looked at; the bytes between them go out as slices of the block. Nearly every
        block has no mark and costs three substring scans.
        """
        if b"\r" in block:
            return self._forwardable_events(ctx, split_events(block), add_usage)
        done = block.find(b"[DONE]")
        error = block.find(b'"error"')
        usage = usage_position(block)
        if done < 0 and error < 0 and usage < 0:
            return block, None
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
            keep, end = self._marked_event(ctx, block[start:stop], add_usage)
            if keep:
                out.append(keep)
            position = stop
        return b"".join(out), end

    def _forwardable_events(
        self, ctx: RequestContext, events: list[bytes], add_usage: bool
    ) -> tuple[bytes, StreamEnd | None]:
        """``_forwardable`` one event at a time, for any line endings."""
        out: list[bytes] = []
        end: StreamEnd | None = None
        for event in events:
            keep, end = self._marked_event(ctx, event, add_usage)
            out.append(keep)
            if end is not None:
                break
        return b"".join(out), end

    def _marked_event(
        self, ctx: RequestContext, event: bytes, add_usage: bool
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
            if usage_only and add_usage:
                return b"", None
        return event, None

    def _record_broken(
        self, ctx: RequestContext, attempt: Attempt, failure: UpstreamFailure
    ) -> None:
        ctx.abort_reason = "upstream_" + failure.kind.value
        ctx.failures.append(f"{attempt.backend.provider.id}: {failure.kind.value}")
        self.pool.record_failure(attempt.backend, failure)

    async def _break_stream(
        self,
        ctx: RequestContext,
        response: web.StreamResponse,
        attempt: Attempt,
        failure: UpstreamFailure,
    ) -> StreamEnd:
        """End a committed stream with one error event (and no ``[DONE]``)."""
        self._record_broken(ctx, attempt, failure)
        code = "upstream_timeout" if failure.kind is FailureKind.TIMEOUT else "upstream_error"
        return await self._send_error_event(
            ctx, response, code, f"The upstream stream broke: {failure.message}"
        )

    async def _send_error_event(
        self, ctx: RequestContext, response: web.StreamResponse, code: str, message: str
    ) -> StreamEnd:
        event = error_event(
            {"error": {"type": "service_error", "code": code, "message": message, "param": None}}
        )
        try:
            await response.write(event)
        except ConnectionResetError:
            ctx.abort_reason = "client_disconnected"
            return StreamEnd.CLIENT_GONE
        return StreamEnd.BROKEN


def handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler serving ``endpoint`` through the app's proxy."""

    @access(Access.USER)
    async def handle(request: web.Request) -> web.StreamResponse:
        proxy: Proxy = request.app[keys.PROXY]
        return await proxy.handle(request, endpoint)

    handle.__name__ = "handle_" + endpoint.upstream_path.replace("/", "_")
    return handle
