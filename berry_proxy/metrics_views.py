"""``/metrics`` (the seed's JSON), ``/prometheus`` (the text exposition) and ``/`` (the
status page): what an operator and a scraper read.

``/metrics`` reads the same runtime state as the router and ``/health``: the pool's
per-provider and per-model statistics, and the counts of ``metrics.Metrics``.
``/prometheus`` renders the app's registry (``metrics.registry_for``) in the format the
scraper's ``Accept`` asks for: OpenMetrics, or the classic text format 0.0.4. ``/`` is one
self-contained HTML file shipped in the package (``static/status.html``) that refreshes
itself from the JSON views.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from . import keys
from .auth import Access, access
from .pool import Stats
from .status import iso_or_none, iso_timestamp, json_response

STATUS_PAGE = resources.files(__package__).joinpath("static/status.html")


def _stats(stats: Stats) -> dict[str, Any]:
    rate = stats.success_rate
    latency = stats.average_latency_ms
    return {
        "total_requests": stats.total_requests,
        "successful_requests": stats.successful_requests,
        "failed_requests": stats.failed_requests,
        "success_rate": None if rate is None else round(rate, 4),
        "average_latency_ms": None if latency is None else round(latency, 3),
    }


@access(Access.STATUS)
async def metrics_json(request: web.Request) -> web.Response:
    config = request[keys.RUNTIME].config
    pool = request[keys.RUNTIME].pool
    metrics = pool.metrics
    now = pool.wall_clock()
    providers = {
        pid: {
            "healthy": state.healthy,
            **_stats(state.stats),
            "last_success": iso_or_none(state.stats.last_success),
            "last_failure": iso_or_none(state.stats.last_failure),
            "circuit_breaker_state": state.breaker.state.value,
        }
        for pid, state in pool.providers.items()
    }
    models = {m.name: _stats(pool.model_stats[m.id]) for m in config.models.values()}
    usage = metrics.selections_by_strategy()
    auth_total = metrics.auth_total
    payload = {
        "timestamp": iso_timestamp(now),
        "uptime_seconds": round(now - request.app[keys.GATEWAY].started_at, 3),
        "providers": providers,
        "models": models,
        "load_balancer": {"total_selections": sum(usage.values()), "strategy_usage": usage},
        "authentication": {
            "total_requests": auth_total,
            "successful_authentications": metrics.auth_successes,
            "failed_authentications": auth_total - metrics.auth_successes,
            "success_rate": round(metrics.auth_successes / auth_total, 4) if auth_total else None,
        },
    }
    return json_response(payload)


@access(Access.STATUS)
async def prometheus(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[keys.METRICS_REGISTRY])
    response = web.Response(body=body)
    # The exposition's exact content type (with its version), not aiohttp's rewrite of it.
    response.headers["Content-Type"] = content_type
    return response


@access(Access.STATUS)
async def status_page(request: web.Request) -> web.Response:
    response = web.Response(body=STATUS_PAGE.read_bytes(), content_type="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response
