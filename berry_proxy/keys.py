"""Every typed application and request key, in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .auth import Authenticator
    from .config import Config, UserConfig
    from .context import RequestContext
    from .cors import CorsPolicy
    from .health import HealthProber
    from .pool import BackendPool
    from .proxy import Proxy
    from .ratelimit import RateLimiter
    from .routing import Router

# Annotations (not evaluated at run time) carry the types, so this module imports none of
# the modules that use it.
CONFIG: web.AppKey[Config] = web.AppKey("config")
AUTHENTICATOR: web.AppKey[Authenticator] = web.AppKey("authenticator")
POOL: web.AppKey[BackendPool] = web.AppKey("pool")
PROXY: web.AppKey[Proxy] = web.AppKey("proxy")
ROUTER: web.AppKey[Router] = web.AppKey("router")
LIMITER: web.AppKey[RateLimiter] = web.AppKey("limiter")
PROBER: web.AppKey[HealthProber] = web.AppKey("prober")
CLIENT_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("client_session")
# The app's Prometheus registry (metrics.registry_for).
METRICS_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")
# None when CORS is off (``server.cors_allow_origins: []``).
CORS: web.AppKey[CorsPolicy | None] = web.AppKey("cors")
# Monotonic seconds; injected so tests can drive time.
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
# Wall-clock seconds when the app was built, for uptime.
STARTED_AT: web.AppKey[float] = web.AppKey("started_at")

REQUEST_CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("request_context")
USER: web.RequestKey[UserConfig] = web.RequestKey("user")
# Seconds a client may take nothing of this request's answer before it is dropped, when
# not the server's send_timeout_seconds (a proxied answer: its provider's idle limit).
SEND_TIMEOUT: web.RequestKey[float] = web.RequestKey("send_timeout")
