"""The HTTP server under the app: what happens before a request reaches a middleware.

aiohttp answers a request its parser cannot read (a bad header byte, a header line over
8190 bytes, too many headers, garbage instead of HTTP) itself, before any middleware runs:
as a plain-text 400 with no request id, logged as a multi-line traceback that quotes the
offending bytes, a bearer token included. ``GatewayRequestHandler`` answers those in the
SPEC's JSON envelope instead (431 ``request_headers_too_large`` for oversize headers, 400
``invalid_http`` otherwise), with ``X-Request-ID``, and logs one JSON line that names the
kind of error and never a byte of the request.

It also bounds what aiohttp writes: a response whose write could wait on the client
(a large body, or a connection whose earlier answers the client has not taken yet: a
pipelining client that never reads) is written under a ``SendGuard``, and a client that
takes nothing of it for the request's ``SEND_TIMEOUT`` (a proxied answer: its provider's
idle limit), else ``server.send_timeout_seconds``, is dropped. Small answers to a client
that reads are written as before, with no timer.

``GatewayRunner`` is aiohttp's ``AppRunner`` serving with that handler; the CLI and the
tests both run the app through it (``lifecycle.serve``, ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest

from . import keys
from .client_connection import drop_connection
from .context import request_id_from
from .errors import GatewayError, HeadersTooLarge, InternalError, InvalidRequest
from .log import get_logger
from .response_headers import SERVER

log = get_logger("berry_proxy.http")

# aiohttp's own limits on a request head (its defaults), named for the error messages.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 128
TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message, a fixed text


def parser_error(status: int, exc: BaseException | None) -> GatewayError:
    """The envelope error for what aiohttp's request handler could not handle."""
    if status >= 500 or exc is None:
        return InternalError(
            "internal_error", "The gateway failed to handle this request; it was logged"
        )
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and exc.message == TOO_MANY_HEADERS
    ):
        return HeadersTooLarge(
            "request_headers_too_large",
            f"The request line or headers are too large (at most {MAX_LINE_BYTES} bytes "
            f"per line and {MAX_HEADERS} headers)",
        )
    if isinstance(exc, BadHttpMethod):
        return InvalidRequest("invalid_http", "The request does not start with an HTTP method")
    return InvalidRequest("invalid_http", "The request is not valid HTTP/1.1")


# Exceptions aiohttp's connection handler may meet that a client caused (a body it broke
# off or mis-encoded, a connection it dropped): logged as such, not as server errors.
CLIENT_CAUSED = (RequestPayloadError, ConnectionError, HttpProcessingError)


# aiohttp's writer sends without waiting while less than this is buffered (its LIMIT).
UNBLOCKED_WRITE_BYTES = 64 * 1024
DEFAULT_SEND_TIMEOUT_SECONDS = 60.0


class SendGuard:
    """Expires the enclosing ``asyncio.timeout(None)`` block when a transport's write
    buffer has not shrunk for ``gap`` seconds: the client takes nothing.

    The first check only notes the buffer's size (the write may have just filled it), so
    a client that never reads is dropped within two gaps.
    """

    __slots__ = ("_gap", "_handle", "_loop", "_size", "_timeout", "_transport")

    def __init__(self, timeout: asyncio.Timeout, transport: asyncio.BaseTransport, gap: float):
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._transport = transport
        self._gap = gap
        self._size: int | None = None
        self._handle = self._loop.call_later(gap, self._check)

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        size = _buffered(self._transport)
        if self._size is None or size < self._size:
            self._size = size
            self._handle = self._loop.call_later(self._gap, self._check)
        else:
            self._timeout.reschedule(self._loop.time())


def _buffered(transport: asyncio.BaseTransport) -> int:
    get_size = getattr(transport, "get_write_buffer_size", None)
    return int(get_size()) if get_size is not None else 0


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors in the SPEC envelope and
    bounding how long a client may leave an answer untaken."""

    __slots__ = ("_send_timeout",)

    def __init__(
        self, manager: web.Server, *, send_timeout: float = DEFAULT_SEND_TIMEOUT_SECONDS, **kw: Any
    ) -> None:
        super().__init__(manager, **kw)
        self._send_timeout = send_timeout

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # A plain method handing back aiohttp's own coroutine in the usual case: no extra
        # coroutine frame per response when there is nothing to guard.
        transport = self.transport
        if transport is None or (_buffered(transport) == 0 and _fits(resp)):
            return super().finish_response(request, resp, start_time)
        gap = request.get(keys.SEND_TIMEOUT, self._send_timeout)
        return self._finish_guarded(request, resp, start_time, transport, gap)

    async def _finish_guarded(
        self,
        request: BaseRequest,
        resp: web.StreamResponse,
        start_time: float | None,
        transport: asyncio.Transport,
        gap: float,
    ) -> tuple[web.StreamResponse, bool]:
        try:
            async with asyncio.timeout(None) as timeout:
                guard = SendGuard(timeout, transport, gap)
                try:
                    return await super().finish_response(request, resp, start_time)
                finally:
                    guard.cancel()
        except TimeoutError:
            if not timeout.expired():
                raise
        log.info("client_stalled", status=resp.status, send_timeout=gap)
        drop_connection(transport)
        return resp, True

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own error log: one JSON line naming the error's kind, never its text
        (which may quote request bytes); what a client caused is not an error of ours."""
        exc = kw.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else None
        if isinstance(exc, CLIENT_CAUSED):
            log.info("client_connection_error", error=kind)
        else:
            # A bug of ours: with its traceback (no frame locals: see log.py).
            log.error("http_server_error", error=kind, exc_info=exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        error = parser_error(status, exc)
        request_id = request_id_from(None)
        # The exception's text may quote the request's bytes: log only its kind.
        fields = {
            "request_id": request_id,
            "status": error.status,
            "error_code": error.code,
            "error": type(exc).__name__ if exc is not None else None,
        }
        if error.status >= 500:
            # An exception that got past the middleware: a bug of ours, with its traceback.
            log.error("request_unhandled", **fields, exc_info=exc)
        else:
            log.warning("request_unreadable", **fields)
        if request.writer.output_size > 0:
            raise ConnectionError("the response has started; the error cannot be sent")
        response = web.Response(
            body=error.body(),
            status=error.status,
            content_type="application/json",
            headers={"X-Request-ID": request_id, "Server": SERVER},
        )
        response.force_close()
        return response


def _fits(resp: web.StreamResponse) -> bool:
    """Will writing the rest of ``resp`` return at once, whatever the client does?"""
    if resp.prepared:
        return True  # streamed by its handler: only the end-of-body marker is left
    length = resp.content_length
    return length is not None and length <= UNBLOCKED_WRITE_BYTES


class GatewayServer(web.Server):
    """``web.Server`` whose connections are ``GatewayRequestHandler``s."""

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving through ``GatewayServer``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's start-up, then its Server
        # Same handler, factory and options (aiohttp keeps no public copy of them); the
        # connection class differs, and takes the send limit aiohttp's own would refuse.
        options = dict(server._kwargs)
        config = self.app[keys.GATEWAY].runtime.config  # the app has started: it has one
        options["send_timeout"] = config.server.send_timeout_seconds
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            **options,
        )
