"""Every typed application and request key, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .config import UserConfig
    from .context import RequestContext
    from .runtime import Gateway, Runtime

# Annotations (not evaluated at run time) carry the types, so this module imports none of
# the modules that use it.
# The process-lifetime state, and through it the current runtime (runtime.py).
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")
# The app's Prometheus registry (metrics.registry_for).
METRICS_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")

# The runtime (config and all derived from it) this request is served by, taken when it
# arrived: a reload meanwhile does not change it.
RUNTIME: web.RequestKey[Runtime] = web.RequestKey("runtime")
REQUEST_CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("request_context")
USER: web.RequestKey[UserConfig] = web.RequestKey("user")
# Seconds a client may take nothing of this request's answer before it is dropped, when
# not the server's send_timeout_seconds (a proxied answer: its provider's idle limit).
SEND_TIMEOUT: web.RequestKey[float] = web.RequestKey("send_timeout")
