"""Read-only views: health, model lists.

They read the same runtime state the router uses (``BackendPool``), so what they show is
what routing does. None of them exposes an API key or an upstream URL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from . import __version__, keys
from .auth import Access, access, visible_models
from .config import ModelConfig
from .errors import NotFound
from .pool import BackendPool

# OpenAI's model objects carry a creation time; the gateway's models have none, so every
# model reports this fixed one (the original's), which keeps responses stable.
MODEL_CREATED = 1677610602


def iso_timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_or_none(seconds: float | None) -> str | None:
    return None if seconds is None else iso_timestamp(seconds)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


def _provider_health(pool: BackendPool) -> dict[str, Any]:
    return {
        pid: {
            "healthy": state.healthy,
            "last_check": iso_or_none(state.last_check),
            "error": state.error,
            "circuit_breaker_state": state.breaker.state.value,
        }
        for pid, state in pool.providers.items()
    }


def _model_health(pool: BackendPool, model: ModelConfig) -> dict[str, Any]:
    backends = pool.backends[model.id]
    healthy = sum(1 for b in backends if b.healthy)
    return {"available": healthy > 0, "healthy_backends": healthy, "total_backends": len(backends)}


def _degraded(pool: BackendPool, model: ModelConfig) -> bool:
    """Some backend the config wants serving is not healthy (a disabled one is not down)."""
    return any(b.usable and not b.healthy for b in pool.backends[model.id])


@access(Access.STATUS)
async def health(request: web.Request) -> web.Response:
    config = request[keys.RUNTIME].config
    pool = request[keys.RUNTIME].pool
    enabled = [m for m in config.models.values() if m.enabled]
    models = {m.name: _model_health(pool, m) for m in enabled}
    if request.app[keys.GATEWAY].drain.draining:
        status = "draining"  # shutting down: a load balancer should send elsewhere
    elif any(not m["available"] for m in models.values()):
        status = "unhealthy"
    elif any(_degraded(pool, m) for m in enabled):
        status = "degraded"
    else:
        status = "healthy"
    payload = {
        "status": status,
        "timestamp": iso_timestamp(pool.wall_clock()),
        "version": __version__,
        "providers": _provider_health(pool),
        "models": models,
    }
    return json_response(payload, 503 if status in ("unhealthy", "draining") else 200)


@access(Access.PUBLIC)
async def v1_health(request: web.Request) -> web.Response:
    now = request[keys.RUNTIME].pool.wall_clock()
    return json_response({"status": "ok", "timestamp": iso_timestamp(now)})


def _openai_model(model: ModelConfig) -> dict[str, Any]:
    return {
        "id": model.name,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "berry-api",
        "permission": [],
        "root": model.name,
        "parent": None,
    }


@access(Access.USER)
async def v1_models(request: web.Request) -> web.Response:
    models = visible_models(request[keys.RUNTIME].config, request[keys.USER])
    return json_response({"object": "list", "data": [_openai_model(m) for m in models]})


@access(Access.USER)
async def v1_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    config = request[keys.RUNTIME].config
    model = config.find_model(name)
    if model is None or not model.enabled or not request[keys.USER].may_use(model.id):
        raise NotFound(
            "model_not_found",
            f"The model '{name}' does not exist or you do not have access to it",
            param="model",
            details={"model": name},
        )
    return json_response(_openai_model(model))


@access(Access.USER)
async def models_overview(request: web.Request) -> web.Response:
    config = request[keys.RUNTIME].config
    pool = request[keys.RUNTIME].pool
    models = []
    for model in config.models.values():
        models.append(
            {
                "name": model.name,
                "enabled": model.enabled,
                "strategy": model.strategy,
                "backends": [
                    {
                        "provider": b.provider.id,
                        "model": b.config.model,
                        "weight": b.config.weight,
                        "priority": b.config.priority,
                        "enabled": b.config.enabled,
                        "healthy": b.healthy,
                    }
                    for b in pool.backends[model.id]
                ],
            }
        )
    return json_response({"models": models})
