"""``POST /admin/reload``: the same reload as SIGHUP, for an operator's script.

It answers what the reload changed (200, with the new ``config_generation``), or every
validation error of the file (400 ``invalid_config``; the old config keeps serving), or
503 ``draining`` when the gateway began stopping meanwhile, or 500 ``reload_failed`` when
a valid file could not be applied (a bug, logged; the old config keeps serving). The
request body is not read: the gateway reloads the file it was started with, never a
config sent over the network.
"""

from __future__ import annotations

from aiohttp import web

from . import keys
from .auth import Access, access
from .drain import draining_error
from .errors import InternalError, InvalidRequest
from .status import json_response


@access(Access.ADMIN)
async def reload(request: web.Request) -> web.Response:
    gateway = request.app[keys.GATEWAY]
    if gateway.drain.draining:
        raise draining_error()
    result = await gateway.reload()
    if result.ok:
        return json_response(result.view())
    if result.failure == "stopping":
        raise draining_error()
    if result.failure == "internal":
        raise InternalError(
            "reload_failed",
            "The config file is valid but could not be applied; it was logged, and the "
            "current config keeps serving",
            details={"config_generation": result.generation},
        )
    raise InvalidRequest(
        "invalid_config",
        f"The config file has {len(result.errors)} error(s); the current config keeps serving",
        details={"config_generation": result.generation, "errors": result.errors},
    )
