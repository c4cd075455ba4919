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
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import orjson
from aiohttp import web

from . import keys
from .auth import Access, access, resolve_model
from .breaker import Ticket
from .config import DEFAULT_TOTAL_TIMEOUT_SECONDS, Config, ModelConfig
from .context import RequestContext
from .errors import (
    FailureKind,
    GatewayError,
    UpstreamFailure,
    error_for_failures,
    failure_for_status,
    map_upstream_exception,
    parse_retry_after,
    reraise_as_failure,
)
from .log import get_logger
from .openai_request import Endpoint, parse_request, upstream_body, wants_usage
from .pool import Backend, BackendPool, ProviderState
from .routing import Router
from .sse import (
    EventKind,
    EventSplitter,
    classify,
    error_event,
    usage_of,
)
from .stream_filter import StreamEnd, forwardable
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


@dataclass(slots=True)
class Attempt:
    """One try of one backend."""

    backend: Backend
    adapter: Adapter
    body: bytes
    headers: dict[str, str]
    deadline: float  # monotonic; the request's overall deadline
    add_usage: bool  # we asked for usage the client did not: drop the usage-only chunk
    ticket: Ticket  # the breaker's admission of this attempt


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
        pool = self.pool
        pool.total_requests += 1
        pool.in_flight += 1
        try:
            return await self._handle(request, endpoint)
        finally:
            pool.in_flight -= 1

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        ctx = request[keys.REQUEST_CONTEXT]
        user = request[keys.USER]
        raw = await request.read()
        body = parse_request(raw, endpoint)
        model = resolve_model(self.config, user, body["model"])
        ctx.model = model.id
        stream = endpoint.streams and body.get("stream") is True
        ctx.stream = stream
        plan = self.router.plan(model, user)  # 503 at once when no backend may be tried

        settings = self.config.settings
        deadline = ctx.started + settings.request_timeout_seconds
        headers = forwardable_request_headers(request.headers)
        headers["Content-Type"] = "application/json"
        headers["X-Request-ID"] = ctx.request_id
        add_usage = stream and not wants_usage(body)
        bodies: dict[str, bytes] = {}  # backend model -> rewritten body, built once each
        failures: list[UpstreamFailure] = []
        last_failure: dict[Backend, FailureKind] = {}
        per_provider: dict[str, int] = {}
        for backend in attempt_order(plan, last_failure, settings.max_internal_retries):
            if len(failures) >= settings.max_retries or self.clock() >= deadline:
                break
            provider = backend.provider.config
            tried = per_provider.get(provider.id, 0)
            if provider.max_retries is not None and tried >= provider.max_retries:
                continue
            ticket = self.pool.begin(backend)
            if ticket is None:
                continue  # its breaker opened meanwhile, or another request holds the trial
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
                ticket=ticket,
            )
            try:
                if stream:
                    return await self._stream(request, ctx, endpoint, attempt)
                return await self._unary(ctx, endpoint, attempt)
            except UpstreamFailure as failure:
                failures.append(failure)
                last_failure[backend] = failure.kind
                ctx.failures.append(f"{provider.id}: {failure.kind.value}")
                if failure.kind is not FailureKind.SATURATED:
                    self.pool.record_failure(backend, failure, ticket)
            finally:
                self.pool.end(backend, ticket)
        self.pool.record_model_outcome(model.id, ok=False, latency=0.0)
        raise self._all_failed(model, plan, failures, deadline)

    def _all_failed(
        self,
        model: ModelConfig,
        plan: Sequence[Backend],
        failures: list[UpstreamFailure],
        deadline: float,
    ) -> GatewayError:
        """The client's error when no attempt succeeded."""
        if not failures:
            if self.clock() < deadline:
                # Every planned backend refused at the last moment (breakers tripped by
                # concurrent requests): the same answer as when planning finds none.
                return self.router.no_healthy_backends(model, plan)
            failures.append(
                UpstreamFailure(FailureKind.TIMEOUT, "request deadline passed before an attempt")
            )
        return error_for_failures(failures)

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
            self.pool.record_success(backend, latency, attempt.ticket)
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
            # Content is flowing: a trial has proven the provider; let others back in now.
            self.pool.confirm_trial(backend, attempt.ticket)
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
                self.pool.record_success(backend, latency, attempt.ticket)
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
            out, end = forwardable(ctx, pending, attempt.add_usage)
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

    def _record_broken(
        self, ctx: RequestContext, attempt: Attempt, failure: UpstreamFailure
    ) -> None:
        ctx.abort_reason = "upstream_" + failure.kind.value
        ctx.failures.append(f"{attempt.backend.provider.id}: {failure.kind.value}")
        self.pool.record_failure(attempt.backend, failure, attempt.ticket)

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


# Failures worth repeating on the same backend once every other has been tried: the next
# try may well succeed. A 429 or a rejected key will not change on an immediate retry; a
# timeout would spend the request's deadline waiting again.
RETRY_SAME_BACKEND = frozenset({FailureKind.NETWORK, FailureKind.SERVER, FailureKind.PROTOCOL})


def attempt_order(
    plan: Sequence[Backend], last_failure: Mapping[Backend, FailureKind], rounds: int
) -> Iterator[Backend]:
    """Each planned backend once; then up to ``rounds`` more passes over those that failed
    transiently (``max_internal_retries``). ``last_failure`` is filled in by the caller as
    attempts fail, so each pass sees the latest outcomes.
    """
    yield from plan
    for _ in range(rounds):
        again = [b for b in plan if last_failure.get(b) in RETRY_SAME_BACKEND]
        if not again:
            return
        yield from again


def handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler serving ``endpoint`` through the app's proxy."""

    @access(Access.USER)
    async def handle(request: web.Request) -> web.StreamResponse:
        proxy: Proxy = request.app[keys.PROXY]
        return await proxy.handle(request, endpoint)

    handle.__name__ = "handle_" + endpoint.upstream_path.replace("/", "_")
    return handle
