"""A stream relay: one attempt's SSE stream, from the upstream to the client.

``StreamRelay`` owns everything one streamed attempt needs: the upstream response, the
event splitter, the events held back before the commit point, the client response, and
the one ``Watchdog`` deadline that bounds its reads and writes.

1. **Open** (nothing sent yet): send the request, then read events until the first one
   that carries content, tool calls, reasoning or a finish reason. Events before it
   (role-only, empty, comments) are held, at most ``MAX_HELD_BYTES``. Any failure here
   raises ``UpstreamFailure`` and the proxy tries the next backend: the client never
   knows. A non-200 answer is either a failure or a caller error passed through as is.
2. **Commit**: the client's 200 and headers go out with the held events.
3. **Copy**: blocks of whole events, as they arrive, byte for byte (``stream_filter``
   decides what of each block is sent). A failure now ends the stream with one
   ``data: {"error": ...}`` event and no ``[DONE]``.

Time: the first-byte limit until the upstream's first bytes, then the idle limit between
any two reads (an SSE comment is a read: a model that only sends ``: keep-alive`` while it
thinks is alive), and the same idle limit for a client that stops reading (then the
client connection is dropped: ``abort_reason: client_stalled``, and the slot is freed).
Before the commit the request's deadline caps it all; after it, an explicit
``total_timeout_seconds`` does. A client that leaves cancels the handler; the upstream
connection is closed at once so the provider stops generating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.http import HttpVersion11

from .client_connection import drop_connection
from .context import RequestContext
from .deadline import Phase, Watchdog
from .drain import Drain, draining_error
from .errors import FailureKind, UpstreamFailure, transport_failure, upstream_errors
from .exchange import Attempt, Exchange
from .log import get_logger
from .openai_request import Endpoint
from .outcomes import Outcomes
from .response_headers import STREAM_HEADERS, own_headers, served_by
from .sse import EventKind, EventSplitter, EventTooLarge, classify, error_event
from .stream_filter import StreamEnd, forwardable
from .unary import MAX_ERROR_BODY_BYTES
from .upstream import UpstreamResponse, passable_response_headers

Clock = Callable[[], float]
_T = TypeVar("_T")

error_log = get_logger("berry_proxy.errors")

# Events before the commit point are held back; past this size the stream commits anyway.
MAX_HELD_BYTES = 64 * 1024
# When the drain runs out, a client has this long to take its stream's error event.
DRAIN_WRITE_SECONDS = 1.0
_COMMITTING = frozenset({EventKind.CONTENT, EventKind.USAGE, EventKind.DONE})
_CLIENT, _UPSTREAM, _DONE = Phase.CLIENT, Phase.UPSTREAM, StreamEnd.DONE
_TIMEOUT_MESSAGES = {
    Phase.FIRST_BYTE: "upstream sent nothing within the first-byte timeout",
    Phase.UPSTREAM: "upstream went idle for longer than the idle timeout",
    Phase.DEADLINE: "upstream stream ran past its deadline",
    Phase.CLIENT: "the client stopped reading",
}


class StreamRelay:
    __slots__ = (
        "answered_at",
        "attempt",
        "clock",
        "ctx",
        "drain",
        "end",
        "endpoint",
        "error_sent",
        "exchange",
        "held",
        "outcomes",
        "request",
        "response",
        "splitter",
        "started",
        "upstream",
        "watchdog",
    )

    def __init__(
        self,
        request: web.Request,
        ctx: RequestContext,
        endpoint: Endpoint,
        attempt: Attempt,
        exchange: Exchange,
        outcomes: Outcomes,
        clock: Clock,
        drain: Drain,
    ) -> None:
        self.request = request
        self.ctx = ctx
        self.endpoint = endpoint
        self.attempt = attempt
        self.exchange = exchange
        self.outcomes = outcomes
        self.clock = clock
        self.drain = drain
        self.splitter = EventSplitter(attempt.backend.provider.config.max_event_bytes)
        self.held: list[bytes] = []
        self.upstream: UpstreamResponse | None = None
        self.response: web.StreamResponse | None = None
        self.watchdog = Watchdog()
        self.started = 0.0  # when the attempt began (clock seconds)
        self.answered_at: float | None = None  # when the answer became final (TTFT)
        self.end = StreamEnd.BROKEN
        self.error_sent = False  # the one error event has gone out (or is going)

    async def run(self) -> web.StreamResponse:
        """Relay the stream; raises ``UpstreamFailure`` for a failure before the commit.

        One frame from here down to each read and write: every time the stream resumes,
        it resumes through each frame of the chain (see ``middlewares.gateway``).
        """
        started = self.started = self.clock()
        try:
            try:
                async with asyncio.timeout(None) as timeout:
                    self._arm(timeout)
                    watched = self.drain.watched
                    self.drain.watch(self.watchdog)  # a drain that runs out ends it
                    try:
                        passed = await self._open()
                        if passed is not None:
                            return passed
                        if await self._commit():
                            await self._copy()
                    finally:
                        self.watchdog.cancel()
                        watched.discard(self.watchdog)
            except TimeoutError:
                if not timeout.expired():
                    raise
                await self._timed_out()
            except Exception:
                if self.watchdog.expired is Phase.DRAIN:
                    # The drain ran out as this attempt failed: not a failure to fail
                    # over from (this instance stops), nor one to charge the backend.
                    await self._drained()
                elif self.response is None or not self.response.prepared:
                    raise
                else:
                    await self._internal_error()
            self._record_end()
            assert self.response is not None  # noqa: S101  # committed, or raised above
            return self.response
        except asyncio.CancelledError:
            self.ctx.abort_reason = "client_disconnected"
            if self.response is not None and self.response.prepared:
                self.outcomes.abandoned(self.exchange)
            raise
        finally:
            if self.answered_at is None:
                # A failed attempt: its time is upstream time, not gateway overhead.
                self.ctx.upstream_seconds += self.clock() - started
            upstream = self.upstream
            if upstream is not None:
                # release() keeps a fully read connection for reuse and closes any other.
                if self.end is StreamEnd.DONE:
                    upstream.release()
                else:
                    upstream.abort()

    def _arm(self, timeout: asyncio.Timeout) -> None:
        """The first-byte limit now, and the request's deadline over all before the commit."""
        config = self.attempt.backend.provider.config
        remaining = self.attempt.deadline - self.clock()
        self.watchdog.start(
            timeout,
            min(config.first_byte_timeout_seconds, remaining),
            asyncio.get_running_loop().time() + remaining,
            Phase.FIRST_BYTE,
        )

    async def _internal_error(self) -> None:
        """A bug of ours after the commit: the status line is gone, so the client must
        still learn from one error event that the answer is incomplete."""
        error_log.exception("stream_internal_error", request_id=self.ctx.request_id)
        self.ctx.abort_reason = "internal_error"
        await self._send_error_event_bounded("internal_error", "The gateway failed while streaming")

    # ----------------------------------------------------------------------------------
    # 1. Open: up to the commit point
    # ----------------------------------------------------------------------------------

    async def _open(self) -> web.Response | None:
        """Read up to the commit point; a caller error comes back as the response to give."""
        attempt = self.attempt
        backend = attempt.backend
        config = backend.provider.config
        with upstream_errors("first byte"):
            upstream = self.upstream = await attempt.adapter.send(
                self.endpoint.upstream_path,
                backend.config.model,
                attempt.body,
                attempt.headers,
                backend.model.name,
            )
        if upstream.status != 200:
            return await self._pass_through(upstream)
        if not upstream.content_type.startswith("text/event-stream"):
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream did not answer with an event stream"
            )
        watchdog = self.watchdog
        splitter, held = self.splitter, self.held
        held_bytes = 0
        phase = "first byte"
        while True:
            with upstream_errors(phase):
                chunk = await upstream.read_chunk()
            if not chunk:
                raise UpstreamFailure(
                    FailureKind.PROTOCOL, "upstream ended the stream before any content"
                )
            if phase == "first byte":
                # The first-byte limit is met by any bytes; from now on, the idle gap.
                phase = "stream"
                watchdog.limit(config.idle_timeout_seconds, watchdog.hard, Phase.UPSTREAM)
            else:
                watchdog.progress()
            arrived_at = self.clock()
            splitter.push(chunk)
            while (event := self._guarded(splitter.pop)) is not None:
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
                    # Events that arrived with the committing one stay in the splitter;
                    # the copy loop sends them right after these. Too much of an
                    # unfinished one among them fails over now, before anything is sent.
                    self._guarded(splitter.check_pending)
                    self._answered(arrived_at)
                    return None

    async def _pass_through(self, upstream: UpstreamResponse) -> web.Response:
        """A non-200 answer before any event: a failure, or a caller error (4xx) that goes
        back to the client as it is."""
        failure = upstream.failure()
        if failure is not None:
            raise failure  # its body is not read; the connection is closed
        with upstream_errors("response"):
            body = await upstream.read(MAX_ERROR_BODY_BYTES)
        self.end = StreamEnd.DONE
        answered_at = self.clock()
        self._answered(answered_at)
        self.outcomes.passed_through(self.exchange)
        redact = self.attempt.adapter.redact
        if redact:
            body = redact(body)
        headers = passable_response_headers(upstream.headers)
        headers.update(served_by(self.ctx, self.attempt.backend, answered_at))
        return web.Response(body=body, status=upstream.status, headers=headers)

    @staticmethod
    def _guarded(step: Callable[[], _T]) -> _T:
        """``step()``, with too much of an unfinished event meaning a protocol failure."""
        try:
            return step()
        except EventTooLarge as exc:
            raise UpstreamFailure(FailureKind.PROTOCOL, f"upstream sent {exc}") from None

    def _answered(self, at: float) -> None:
        """The answer became final at ``at``: until then the gateway waited upstream."""
        self.answered_at = at
        self.ctx.upstream_seconds += at - self.started

    # ----------------------------------------------------------------------------------
    # 2. Commit and 3. copy
    # ----------------------------------------------------------------------------------

    async def _commit(self) -> bool:
        """Send the client's status line and headers; False if the client has left."""
        attempt, ctx = self.attempt, self.ctx
        backend = attempt.backend
        config = backend.provider.config
        # Content is flowing: a trial has proven the provider; let others back in now.
        self.outcomes.proven(self.exchange)
        loop = asyncio.get_running_loop()
        total = config.total_timeout_seconds
        self.watchdog.limit(
            config.idle_timeout_seconds,
            None if total is None else loop.time() + total,
            Phase.CLIENT,
        )
        # All headers at once: this response is prepared here, so the middleware cannot
        # add X-Request-ID and the rest to it later.
        headers = {**STREAM_HEADERS, **own_headers(ctx), **served_by(ctx, backend, self.clock())}
        response = self.response = web.StreamResponse(status=200, headers=headers)
        if self.request.version < HttpVersion11:
            # No chunked encoding before HTTP/1.1: only the closed connection can tell the
            # client where the stream ends (aiohttp would keep an HTTP/1.0 keep-alive
            # connection open, and the client would wait for more forever).
            response.force_close()
        try:
            await response.prepare(self.request)
        except ConnectionResetError:
            self._client_gone()
            return False
        # Its status is sent: a stream the client then leaves was still a 200.
        ctx.status = 200
        return True

    async def _copy(self) -> None:
        """Copy the stream to the committed client response until it ends."""
        attempt, ctx, watchdog = self.attempt, self.ctx, self.watchdog
        response = self.response
        assert response is not None  # noqa: S101  # committed
        splitter, upstream, redact = self.splitter, self.upstream, attempt.adapter.redact
        assert upstream is not None  # noqa: S101  # opened
        add_usage = attempt.add_usage
        try:
            pending = b"".join(self.held) + splitter.take_block()
        except EventTooLarge as exc:
            await self._break(UpstreamFailure(FailureKind.PROTOCOL, f"upstream sent {exc}"))
            return
        self.held = []
        # Per event, every name below is a local: a module global or an enum member
        # (EnumType's __getattr__ hook makes each member lookup a slow path) costs more.
        client, reading, done = _CLIENT, _UPSTREAM, _DONE
        read_chunk, write = upstream.read_chunk, response.write
        while True:
            out, end = forwardable(ctx, pending, add_usage)
            if out:
                if redact:
                    out = redact(out)
                watchdog.phase = client
                try:
                    if end is None:
                        await write(out)
                    else:
                        # The last bytes: one write with the end-of-body marker.
                        await response.write_eof(out)
                except ConnectionResetError:
                    self._client_gone()
                    return
                watchdog.progress()
            if end is not None:
                if end is done:
                    self.end = end
                    return
                # BROKEN: the upstream's own error event went out: it is the one error event.
                self.end = end
                self._failed(UpstreamFailure(FailureKind.SERVER, "upstream reported an error"))
                return
            watchdog.phase = reading
            try:
                chunk = await read_chunk()
            except Exception as exc:  # as ``upstream_errors("stream")``, without its cost
                failure = (
                    exc if isinstance(exc, UpstreamFailure) else transport_failure(exc, "stream")
                )
                if failure is None:
                    raise
                await self._break(failure.detach())
                return
            if not chunk:
                await self._break(
                    UpstreamFailure(FailureKind.NETWORK, "upstream ended the stream early")
                )
                return
            watchdog.progress()
            try:
                pending = splitter.feed_block(chunk)
            except EventTooLarge as exc:
                await self._break(UpstreamFailure(FailureKind.PROTOCOL, f"upstream sent {exc}"))
                return

    # ----------------------------------------------------------------------------------
    # Endings
    # ----------------------------------------------------------------------------------

    def _client_gone(self) -> None:
        self.ctx.abort_reason = "client_disconnected"
        self.end = StreamEnd.CLIENT_GONE

    def _failed(self, failure: UpstreamFailure) -> None:
        self.ctx.abort_reason = "upstream_" + failure.kind.value
        self.outcomes.failed(self.exchange, failure)

    async def _break(self, failure: UpstreamFailure) -> None:
        """End a committed stream with one error event (and no ``[DONE]``)."""
        self._failed(failure)
        code = "upstream_timeout" if failure.kind is FailureKind.TIMEOUT else "upstream_error"
        self.end = await self._send_error_event(
            code, f"The upstream stream broke: {failure.message}"
        )

    async def _timed_out(self) -> None:
        """The watchdog expired: fail over before the commit, else end the stream."""
        expired = self.watchdog.expired or Phase.DEADLINE
        if expired is Phase.DRAIN:
            await self._drained()
            return
        message = _TIMEOUT_MESSAGES[expired]
        if self.response is None:
            raise UpstreamFailure(FailureKind.TIMEOUT, message)
        writing = expired is Phase.CLIENT or (
            expired is Phase.DEADLINE and self.watchdog.phase is Phase.CLIENT
        )
        if writing or self.error_sent:
            # The client stopped reading, or had not taken the last write by the total
            # limit (perhaps the one error event, already recorded): not the provider's
            # doing, and nothing more can be written to it.
            self._drop_client()
            return
        failure = UpstreamFailure(FailureKind.TIMEOUT, message)
        self._failed(failure)
        await self._send_error_event_bounded(
            "upstream_timeout", f"The upstream stream broke: {message}"
        )

    async def _drained(self) -> None:
        """The gateway's drain ran out: 503 ``draining`` before the commit (no other
        backend is tried: this instance is stopping), else one ``draining`` error event."""
        self.ctx.abort_reason = "draining"
        self.outcomes.drained(self.exchange)
        if self.response is None:
            raise draining_error()
        if self.error_sent:
            self.end = StreamEnd.DRAINED
            return
        await self._send_error_event_bounded(
            "draining", "The gateway is shutting down; the stream was ended", DRAIN_WRITE_SECONDS
        )
        if self.end is StreamEnd.BROKEN:
            self.end = StreamEnd.DRAINED

    async def _send_error_event_bounded(
        self, code: str, message: str, limit: float | None = None
    ) -> None:
        """The one error event, outside the watchdog's block: bounded by the idle limit on
        its own (or ``limit``), so a client that stopped reading cannot hold the attempt's
        slot."""
        idle = self.attempt.backend.provider.config.idle_timeout_seconds
        try:
            async with asyncio.timeout(idle if limit is None else limit):
                self.end = await self._send_error_event(code, message)
        except TimeoutError:
            self._drop_client()

    def _drop_client(self) -> None:
        """The client stopped reading: drop its connection and whatever waits for it."""
        self.ctx.abort_reason = "client_stalled"
        self.end = StreamEnd.CLIENT_GONE
        transport = self.request.transport
        if transport is not None:
            drop_connection(transport)

    async def _send_error_event(self, code: str, message: str) -> StreamEnd:
        assert self.response is not None  # noqa: S101  # committed
        event = error_event(
            {"error": {"type": "service_error", "code": code, "message": message, "param": None}}
        )
        self.error_sent = True  # the stream's one error event, even if its write stalls
        self.watchdog.phase = Phase.CLIENT
        try:
            await self.response.write(event)
        except ConnectionResetError:
            self._client_gone()
            return StreamEnd.CLIENT_GONE
        return StreamEnd.BROKEN

    def _record_end(self) -> None:
        """A committed stream ended: what it says about the backend and the model."""
        end, backend = self.end, self.attempt.backend
        latency = (self.answered_at or self.clock()) - self.started
        if end is StreamEnd.DONE:
            self.outcomes.served(self.exchange, latency)
        elif end is StreamEnd.CLIENT_GONE:
            self.outcomes.abandoned(self.exchange)
        if end is not StreamEnd.CLIENT_GONE and end is not StreamEnd.DRAINED:
            self.outcomes.model_outcome(backend.model.id, ok=end is StreamEnd.DONE, latency=latency)
