"""The middleware chain, outermost first: request context -> error shaping -> auth.

- ``request_context`` gives every request its id and timing, and writes the access log
  line when it ends (also when the client left early);
- ``error_shaping`` turns every exception into the SPEC's JSON error envelope, including
  aiohttp's own 404/405/413, and hides tracebacks behind a logged 500;
- ``authentication`` enforces the ``Access`` level the matched handler declares.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from . import keys
from .auth import Access, access_of, require_admin
from .context import RequestContext, request_id_from
from .errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
)
from .log import get_logger

access_log = get_logger("berry_proxy.access")
error_log = get_logger("berry_proxy.errors")


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    clock = request.app[keys.CLOCK]
    ctx = RequestContext(request_id_from(request.headers.get("X-Request-ID")), clock())
    # The route template, never the raw path: a bounded label for logs and metrics.
    resource = request.match_info.route.resource
    ctx.route = resource.canonical if resource is not None else "unmatched"
    request[keys.REQUEST_CONTEXT] = ctx
    try:
        response = await handler(request)
        ctx.status = response.status
        return response
    except asyncio.CancelledError:
        ctx.abort_reason = ctx.abort_reason or "client_disconnected"
        raise
    finally:
        access_log.info("request", **ctx.log_fields(clock()))


async def add_request_id(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every response, streamed or not, carries its request id."""
    ctx = request.get(keys.REQUEST_CONTEXT)
    if ctx is not None:
        response.headers["X-Request-ID"] = ctx.request_id


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        body=error.body(),
        status=error.status,
        content_type="application/json",
        headers=error.headers,
    )


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
        limit = request.app[keys.CONFIG].server.max_body_bytes
        return RequestTooLarge(
            "request_too_large",
            f"The request body is larger than the limit of {limit} bytes",
            details={"max_body_bytes": limit},
        )
    error = InvalidRequest("invalid_request", exc.reason)
    error.status = exc.status
    return error


@web.middleware
async def error_shaping(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[keys.REQUEST_CONTEXT]
    try:
        return await handler(request)
    except GatewayError as error:
        ctx.error_code = error.code
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = _from_http_exception(exc, request)
        ctx.error_code = mapped.code
        return error_response(mapped)
    except Exception:
        error_log.exception("internal_error", request_id=ctx.request_id, route=ctx.route)
        ctx.error_code = "internal_error"
        return error_response(
            InternalError(
                "internal_error",
                "The gateway failed to handle this request; it was logged",
                details={"request_id": ctx.request_id},
            )
        )


@web.middleware
async def authentication(request: web.Request, handler: Handler) -> web.StreamResponse:
    level = access_of(request.match_info.handler)
    if level is Access.STATUS:
        public = request.app[keys.CONFIG].server.public_status
        level = Access.PUBLIC if public else Access.ADMIN
    if level is not Access.PUBLIC:
        user = request.app[keys.AUTHENTICATOR].authenticate(request.headers.get("Authorization"))
        request[keys.REQUEST_CONTEXT].user = user.id
        if level is Access.ADMIN:
            require_admin(user)
        request[keys.USER] = user
    return await handler(request)


MIDDLEWARES: list[Any] = [request_context, error_shaping, authentication]
