"""``create_app(config)``: the aiohttp application, its middlewares, routes and lifecycle.

Everything derived from the config lives in the ``Runtime`` the app's ``Gateway`` holds
(``runtime.py``), so a reload swaps it whole. The app also carries what aiohttp's
connection handler must enforce for it (``handler_args``, fixed until a restart): idle
keep-alive connections, and connections whose request headers have not all arrived, are
closed after ``server.keepalive_timeout_seconds``; its own errors are logged through the
redacting bridge of ``log.py``. Serve it with ``server.GatewayRunner``, which also
answers those errors in the SPEC envelope and drops clients that take nothing of an
answer for ``server.send_timeout_seconds`` (any aiohttp runner serves it, without those
two).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from . import keys, metrics_views, operations, routing_views, status
from .auth import declared_access
from .config import Config
from .metrics import registry_for
from .middlewares import gateway_middleware
from .notify import Notifier
from .openai_request import CHAT, COMPLETIONS, EMBEDDINGS
from .pool import BackendPool
from .proxy import handler
from .request_body import defer_continue
from .routing import Router
from .runtime import Gateway


def create_app(
    config: Config,
    *,
    config_path: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    health_checks: bool = True,
    notifier: Notifier | None = None,
) -> web.Application:
    """The gateway for ``config``; ``config_path`` is the file a reload reads again.

    Clocks and randomness are injectable so tests can drive time and draws;
    ``health_checks=False`` leaves the background prober off (tests then call
    ``app[keys.GATEWAY].runtime.prober.probe_once()`` themselves). ``notifier`` tells
    systemd about reloads (``serve`` passes the process's).
    """
    server = config.server
    gateway = Gateway(
        config,
        config_path=config_path,
        clock=clock,
        wall_clock=wall_clock,
        rng=rng,
        health_checks=health_checks,
        notifier=notifier,
    )
    app = web.Application(
        middlewares=[gateway_middleware(gateway)],
        client_max_size=server.max_body_bytes,
        handler_args={
            "keepalive_timeout": server.keepalive_timeout_seconds,
            "logger": logging.getLogger("berry_proxy.http"),
        },
    )
    app[keys.GATEWAY] = gateway

    def current() -> tuple[BackendPool, Router]:
        runtime = gateway.runtime
        return runtime.pool, runtime.router

    app[keys.METRICS_REGISTRY] = registry_for(gateway.metrics, current)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifetime)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    """Every route, each with the expect handler that defers ``100 Continue``; refuses
    (``UndeclaredAccess``) a handler that does not declare who may call it."""
    routes: list[tuple[str, str, Handler]] = []
    for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS):
        serve = handler(endpoint)
        path = endpoint.upstream_path
        routes.append(("POST", f"/v1/{path}", serve))
        # For SDKs and tools configured with a base URL without /v1.
        routes.append(("POST", f"/{path}", serve))
        # Azure OpenAI SDKs (azure_endpoint= the gateway): the deployment is the model.
        routes.append(
            (
                "POST",
                f"/openai/deployments/{{deployment}}/{path}",
                handler(endpoint, deployment_in_path=True),
            )
        )
    routes += [
        ("GET", "/v1/models", status.v1_models),
        ("GET", "/openai/models", status.v1_models),
        # Model ids may contain "/" (e.g. meta-llama/Llama-3.1-8B).
        ("GET", "/v1/models/{model:.+}", status.v1_model),
        ("GET", "/v1/health", status.v1_health),
        ("GET", "/models", status.models_overview),
        ("GET", "/health", status.health),
        ("GET", "/metrics", metrics_views.metrics_json),
        ("GET", "/prometheus", metrics_views.prometheus),
        ("GET", "/", metrics_views.status_page),
        ("GET", "/admin/model-weights", routing_views.model_weights),
        ("GET", "/admin/backend-health", routing_views.backend_health),
        ("GET", "/admin/system-stats", routing_views.system_stats),
        ("GET", "/admin/rate-limits", routing_views.rate_limits),
        ("POST", "/admin/reload", operations.reload),
        ("GET", "/smart-ai/weights", routing_views.smart_ai_weights),
        ("GET", "/smart-ai/models/{model:.+}/weights", routing_views.smart_ai_model_weights),
    ]
    for method, path, route_handler in routes:
        declared_access(route_handler)
        app.router.add_route(method, path, route_handler, expect_handler=defer_continue)
