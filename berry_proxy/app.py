"""``create_app(config)``: the aiohttp application, its middlewares, routes and lifecycle.

The app also carries what aiohttp's connection handler must enforce for it
(``handler_args``): idle keep-alive connections, and connections whose request headers
have not all arrived, are closed after ``server.keepalive_timeout_seconds``; its own
errors are logged through the redacting bridge of ``log.py``. Serve it with
``server.GatewayRunner``, which also answers those errors in the SPEC envelope and drops
clients that take nothing of an answer for ``server.send_timeout_seconds`` (any aiohttp
runner serves it, without those two).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from . import keys, metrics_views, routing_views, status
from .auth import Authenticator, declared_access
from .config import Config, RateLimitStoreConfig
from .cors import policy_for
from .health import HealthProber
from .metrics import Metrics, registry_for
from .middlewares import MIDDLEWARES
from .mock import MockAdapter
from .openai_request import CHAT, COMPLETIONS, EMBEDDINGS
from .pool import BackendPool
from .proxy import Proxy, handler
from .ratelimit import MemoryStore, RateLimiter, Store
from .ratelimit_redis import RedisStore
from .request_body import defer_continue
from .routing import Router
from .upstream import Adapter, AzureAdapter, OpenAIAdapter


def build_adapters(config: Config, session: aiohttp.ClientSession) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {}
    for pid, provider in config.providers.items():
        if provider.type == "azure":
            adapters[pid] = AzureAdapter(provider, session)
        elif provider.type == "mock":
            adapters[pid] = MockAdapter(provider)
        else:
            adapters[pid] = OpenAIAdapter(provider, session)
    return adapters


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    health_checks: bool = True,
) -> web.Application:
    """The gateway for ``config``.

    Clocks and randomness are injectable so tests can drive time and draws;
    ``health_checks=False`` leaves the background prober off (tests then call
    ``app[keys.PROBER].probe_once()`` themselves).
    """
    server = config.server
    app = web.Application(
        middlewares=MIDDLEWARES,
        client_max_size=server.max_body_bytes,
        handler_args={
            "keepalive_timeout": server.keepalive_timeout_seconds,
            "logger": logging.getLogger("berry_proxy.http"),
        },
    )
    pool = BackendPool(config, clock, wall_clock)
    app[keys.CONFIG] = config
    app[keys.CLOCK] = clock
    app[keys.STARTED_AT] = wall_clock()
    app[keys.POOL] = pool
    app[keys.AUTHENTICATOR] = Authenticator(config.users)
    app[keys.CORS] = policy_for(server.cors_allow_origins)
    router = Router(pool, rng)
    app[keys.ROUTER] = router
    app[keys.METRICS_REGISTRY] = registry_for(pool, router)
    store = build_store(config.rate_limit_store, clock, pool.metrics)
    limiter = RateLimiter(config.users, store, pool.metrics.rate_limit_refused)
    app[keys.LIMITER] = limiter

    async def upstream_session(app: web.Application) -> AsyncIterator[None]:
        # One session for every provider: pooled keep-alive connections. Per-provider
        # concurrency is bounded by the pool's slots, so the connector itself is unbounded.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
            raise_for_status=False,
        )
        app[keys.CLIENT_SESSION] = session
        adapters = build_adapters(config, session)
        app[keys.PROXY] = Proxy(config, pool, router, adapters, clock, limiter)
        await store.start()
        jitter_rng = random.Random(router.rng.getrandbits(64))  # noqa: S311  # not cryptography
        prober = HealthProber(pool, adapters, config.settings, jitter_rng)
        app[keys.PROBER] = prober
        probing = (
            asyncio.create_task(prober.run_forever(), name="health-prober")
            if health_checks
            else None
        )
        yield
        if probing is not None:
            probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probing
        await limiter.close()
        await session.close()

    app.cleanup_ctx.append(upstream_session)
    add_routes(app)
    return app


def build_store(
    config: RateLimitStoreConfig, clock: Callable[[], float], metrics: Metrics
) -> Store:
    """The rate-limit store ``rate_limit_store.backend`` names."""
    if config.backend == "redis":
        return RedisStore(config, clock, metrics)
    return MemoryStore(clock)


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
        ("GET", "/smart-ai/weights", routing_views.smart_ai_weights),
        ("GET", "/smart-ai/models/{model:.+}/weights", routing_views.smart_ai_model_weights),
    ]
    for method, path, route_handler in routes:
        declared_access(route_handler)
        app.router.add_route(method, path, route_handler, expect_handler=defer_continue)
