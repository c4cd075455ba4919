"""The request chain, outermost first: request context -> CORS -> error shaping -> auth.

All three run in one middleware (``gateway_middleware``), each concern in its own function:
- the request context gives every request its id and timing, and the access log line is
  written when it ends (also when the client left early);
- CORS (``cors``): a preflight is answered here, before auth; every other answer gets the
  policy's headers (a streamed one through ``response_headers.own_headers``);
- ``shape_error`` turns every exception into the SPEC's JSON error envelope, including
  aiohttp's own 404/405/413, and hides tracebacks behind a logged 500;
- ``authorize`` enforces the ``Access`` level the matched handler declares (every route
  declares one: ``app.py`` refuses to start otherwise, and an undeclared handler here
  would be refused, not served).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from . import keys
from .auth import Access, declared_access, require_admin
from .context import RequestContext, request_id_from
from .cors import is_preflight
from .errors import (
    AuthenticationFailed,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
)
from .log import ACCESS_LOG, get_logger
from .metrics import Metrics
from .response_headers import own_headers

if TYPE_CHECKING:
    from .runtime import Gateway, Runtime


error_log = get_logger("berry_proxy.errors")


def gateway_middleware(gateway: Gateway) -> Middleware:
    """The app's one middleware, bound to its ``Gateway`` (no app lookups per request)."""
    clock = gateway.clock
    metrics = gateway.metrics

    @web.middleware
    async def chain(request: web.Request, handler: Handler) -> web.StreamResponse:
        """The whole chain in one coroutine frame: request context -> error shaping ->
        auth.

        One middleware calling a plain function per concern, rather than three
        middlewares: every time a handler resumes, it resumes through each frame of the
        chain, and the chain's depth showed up in the per-request CPU cost (bench/). The
        runtime taken here serves the request to its end, whatever a reload does.
        """
        runtime = gateway.runtime
        ctx = RequestContext(request_id_from(request.headers.get("X-Request-ID")), clock())
        # The route template, never the raw path: a bounded label for logs and metrics.
        resource = request.match_info.route.resource
        ctx.route = resource.canonical if resource is not None else "unmatched"
        request[keys.REQUEST_CONTEXT] = ctx
        request[keys.RUNTIME] = runtime
        cors = runtime.cors
        metrics.request_started(ctx.route)
        drop = False
        try:
            try:
                response: web.StreamResponse
                if cors is not None and (allowed := _preflight_methods(request)):
                    response = cors.preflight(request, allowed)  # no token, nothing upstream
                else:
                    level = access_level(request, runtime)
                    if cors is not None:
                        ctx.cors = cors.answer_headers(
                            request.headers.get("Origin"), public=level is Access.PUBLIC
                        )
                    authorize(request, ctx, level, metrics, runtime)
                    response = await handler(request)
            except Exception as exc:
                response = shape_error(exc, request, ctx)
                drop = isinstance(exc, GatewayError) and exc.drop_connection
            ctx.status = response.status
            if not response.prepared:
                # Every response carries its request id and the rest. A handler that
                # prepares (streams) a response itself sends them (relay.py).
                response.headers.update(own_headers(ctx))
                if drop:
                    await send_and_drop(request, response)
            return response
        except asyncio.CancelledError:
            ctx.abort_reason = ctx.abort_reason or "client_disconnected"
            raise
        finally:
            now = clock()
            metrics.request_ended(ctx, now - ctx.started)
            ACCESS_LOG.write(ctx.log_fields(now))

    return chain


async def send_and_drop(request: web.Request, response: web.StreamResponse) -> None:
    """Write ``response``, then close the connection without reading from it again.

    aiohttp would otherwise keep reading (and discarding) the rest of the request body for
    up to ten seconds, from a client that has stopped sending it, or re-raise the body's
    decoding error while doing so. The answer is flushed before the socket closes.
    """
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        pass  # it left first: nothing to send it
    request.protocol.force_close()


def _preflight_methods(request: web.Request) -> tuple[str, ...]:
    """For a CORS preflight to a path the gateway serves, the methods the path allows (an
    ``OPTIONS`` to a served path matches as a 405 that lists them); else ()."""
    if not is_preflight(request):
        return ()
    exc = request.match_info.http_exception
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return tuple(exc.allowed_methods)
    return ()


def error_response(error: GatewayError) -> web.Response:
    response = web.Response(
        body=error.body(),
        status=error.status,
        content_type="application/json",
        headers=error.headers,
    )
    if error.close_connection:
        response.force_close()
    return response


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        return NotFound(
            "not_found", "No such endpoint; see GET /v1/models and POST /v1/chat/completions"
        )
    if exc.status == 405:
        allow = exc.headers.get("Allow", "")
        return MethodNotAllowed(
            "method_not_allowed",
            f"Method {request.method} is not allowed here",
            headers={"Allow": allow} if allow else None,
        )
    if exc.status == 413:
        limit = request[keys.RUNTIME].config.server.max_body_bytes
        return RequestTooLarge(
            "request_too_large",
            f"The request body is larger than the limit of {limit} bytes",
            details={"max_body_bytes": limit},
        )
    error = InvalidRequest("invalid_request", exc.reason)
    error.status = exc.status
    return error


def shape_error(exc: Exception, request: web.Request, ctx: RequestContext) -> web.Response:
    """The SPEC's JSON envelope for any exception; a traceback only reaches the log."""
    if isinstance(exc, GatewayError):
        error = exc
    elif isinstance(exc, web.HTTPException) and exc.status >= 400:
        error = _from_http_exception(exc, request)
    elif isinstance(exc, web.HTTPException):
        raise exc  # redirects and other non-errors keep aiohttp's handling
    else:
        error_log.exception("internal_error", request_id=ctx.request_id, route=ctx.route)
        error = InternalError(
            "internal_error",
            "The gateway failed to handle this request; it was logged",
            details={"request_id": ctx.request_id},
        )
    ctx.error_code = error.code
    response = error_response(error)
    if ctx.attempts:
        # A failed chat request says how many upstream attempts it made, as a served one.
        response.headers["X-Berry-Attempts"] = str(ctx.attempts)
    return response


def access_level(request: web.Request, runtime: Runtime) -> Access | None:
    """Who may call the matched handler (``STATUS`` resolved by ``server.public_status``);
    None when no route matched (aiohttp's 404/405 handler raises, for anyone)."""
    match_info = request.match_info
    if match_info.http_exception is not None:
        return None
    level = declared_access(match_info.handler)
    if level is Access.STATUS:
        public = runtime.config.server.public_status
        level = Access.PUBLIC if public else Access.ADMIN
    return level


def authorize(
    request: web.Request,
    ctx: RequestContext,
    level: Access | None,
    metrics: Metrics,
    runtime: Runtime,
) -> None:
    """Enforce the ``Access`` level the matched handler declares (401/403 otherwise)."""
    if level is None or level is Access.PUBLIC:
        return
    headers = request.headers
    try:
        user = runtime.authenticator.authenticate(
            headers.get("Authorization"), headers.get("api-key")
        )
    except AuthenticationFailed as failure:
        metrics.auth_failed(failure.code)
        raise
    metrics.authenticated()
    ctx.user = user.id
    if level is Access.ADMIN:
        require_admin(user)
    request[keys.USER] = user
