"""Views of routing state: ``/admin/*`` (admin token) and ``/smart-ai/*`` (status access).

Every weight here comes from ``Router.breakdowns`` (the one formula the router draws
with), every health and breaker state from the same pool objects routing reads. Providers
appear by config id only: no API key, no upstream URL.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aiohttp import web

from . import __version__, keys
from .auth import Access, access
from .config import ModelConfig
from .errors import NotFound
from .pool import Backend, Stats
from .routing import Router
from .status import iso_or_none, iso_timestamp, json_response
from .weights import WeightBreakdown


def _weights(router: Router, model: ModelConfig) -> list[tuple[Backend, WeightBreakdown]]:
    backends = router.pool.backends[model.id]
    return list(zip(backends, router.breakdowns(model, backends), strict=True))


@access(Access.ADMIN)
async def model_weights(request: web.Request) -> web.Response:
    router = request[keys.RUNTIME].router
    models: dict[str, Any] = {}
    for model in request[keys.RUNTIME].config.models.values():
        models[model.name] = {
            "strategy": model.strategy,
            "enabled": model.enabled,
            "backends": [
                {
                    "provider": b.provider.id,
                    "model": b.config.model,
                    "weight": b.config.weight,
                    "effective_weight": w.effective_weight,
                    "priority": b.config.priority,
                    "enabled": b.usable,
                    "healthy": b.healthy,
                    "circuit_breaker_state": b.breaker_state.value,
                    "tags": list(b.config.tags),
                    "billing_mode": b.config.billing_mode,
                }
                for b, w in _weights(router, model)
            ],
        }
    return json_response({"models": models, "timestamp": _now(request)})


@access(Access.ADMIN)
async def backend_health(request: web.Request) -> web.Response:
    pool = request[keys.RUNTIME].pool
    backends = [
        {
            "provider": b.provider.id,
            "model": b.config.model,
            "public_model": b.model.name,
            "healthy": b.healthy,
            "circuit_breaker_state": b.breaker_state.value,
            # The two breakers behind it: connection-level (the provider's) and the
            # upstream model's own (5xx and malformed answers).
            "provider_circuit_breaker_state": b.provider.breaker.state.value,
            "model_circuit_breaker_state": b.breaker.state.value,
            "consecutive_failures": b.stats.consecutive_failures,
            "total_requests": b.stats.total_requests,
            "failed_requests": b.stats.failed_requests,
            "last_check": iso_or_none(b.provider.last_check),
            "last_error": b.stats.last_error or b.provider.probe_error,
            "last_success": iso_or_none(b.stats.last_success),
            "last_failure": iso_or_none(b.stats.last_failure),
        }
        for b in pool.all_backends()
    ]
    return json_response({"backends": backends, "timestamp": _now(request)})


def stats_view(stats: Stats) -> dict[str, Any]:
    return {
        "total_requests": stats.total_requests,
        "successful_requests": stats.successful_requests,
        "failed_requests": stats.failed_requests,
        "success_rate": stats.success_rate,
        "average_latency_ms": stats.average_latency_ms,
    }


@access(Access.ADMIN)
async def system_stats(request: web.Request) -> web.Response:
    gateway = request.app[keys.GATEWAY]
    runtime = request[keys.RUNTIME]
    pool, config, metrics = runtime.pool, runtime.config, gateway.metrics
    now = pool.wall_clock()
    payload = {
        "version": __version__,
        "uptime_seconds": max(0.0, now - gateway.started_at),
        "config_generation": runtime.generation,
        "config_reloads": {
            result: metrics.config_reloads.get((result,), 0) for result in ("success", "failed")
        },
        "draining": gateway.drain.draining,
        "in_flight": metrics.proxied_in_flight,
        "total_requests": metrics.proxied_requests,
        "models": {m.name: stats_view(pool.model_stats[m.id]) for m in config.models.values()},
        "providers": {
            pid: {
                "in_flight": p.in_flight,
                "max_connections": p.config.max_connections,
                "waiting": p.waiting,
                "saturations": p.saturations,
            }
            for pid, p in pool.providers.items()
        },
        "timestamp": iso_timestamp(now),
    }
    return json_response(payload)


@access(Access.ADMIN)
async def rate_limits(request: web.Request) -> web.Response:
    """``/admin/rate-limits``: the store, and where each limited user's limits stand now
    (read without spending), with the requests each limit refused."""
    limiter = request[keys.RUNTIME].limiter
    refused = request[keys.RUNTIME].pool.metrics.rate_limited
    users: dict[str, Any] = {}
    for user_id, limits in limiter.limits.items():
        view = await limiter.store.current().peek(limits)
        for name, standing in view.items():
            standing["refused"] = refused.get((user_id, name), 0)
        users[user_id] = view
    metrics = request[keys.RUNTIME].pool.metrics
    store = {
        **limiter.store.status(),
        "errors": metrics.rate_limit_store_errors,
    }
    return json_response({"store": store, "users": users})


def _smart_ai_backends(router: Router, model: ModelConfig) -> list[dict[str, Any]]:
    return [
        {
            "provider": b.provider.id,
            "model": b.config.model,
            "weight": w.weight,
            "confidence": w.confidence,
            "health_factor": w.health_factor,
            "latency_factor": w.latency_factor,
            "error_factor": w.error_factor,
            "stability_bonus": w.stability_bonus,
            "effective_weight": w.effective_weight,
            "healthy": b.healthy,
            "circuit_breaker_state": b.breaker_state.value,
            "latency_ewma_ms": (
                None if b.stats.latency_ewma is None else b.stats.latency_ewma * 1000
            ),
        }
        for b, w in _weights(router, model)
    ]


@access(Access.STATUS)
async def smart_ai_weights(request: web.Request) -> web.Response:
    router = request[keys.RUNTIME].router
    config = request[keys.RUNTIME].config
    models = {
        m.name: {"backends": _smart_ai_backends(router, m)}
        for m in config.models.values()
        if m.strategy == "smart_ai"
    }
    payload = {
        "models": models,
        "settings": asdict(config.settings.smart_ai),
        "timestamp": _now(request),
    }
    return json_response(payload)


@access(Access.STATUS)
async def smart_ai_model_weights(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    config = request[keys.RUNTIME].config
    model = config.find_model(name)
    if model is None:
        raise NotFound(
            "model_not_found", f"The model '{name}' does not exist", details={"model": name}
        )
    payload = {
        "model": model.name,
        "strategy": model.strategy,
        "backends": _smart_ai_backends(request[keys.RUNTIME].router, model),
        "timestamp": _now(request),
    }
    return json_response(payload)


def _now(request: web.Request) -> str:
    return iso_timestamp(request[keys.RUNTIME].pool.wall_clock())
