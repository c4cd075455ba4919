"""The headers berry-proxy puts on its own responses.

``Server`` names the product without a version (no "Python/3.11 aiohttp/3.14" for a
scanner to match against known bugs). Proxied answers say who served them and what the
gateway's own share of the wait was (``served_by``).
"""

from __future__ import annotations

from .context import RequestContext
from .pool import Backend

SERVER = "berry-proxy"

STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "Server": SERVER,
}


def own_headers(ctx: RequestContext) -> dict[str, str]:
    """The headers every answer carries: ``X-Request-ID``, ``Server``, the CORS and the
    ``x-ratelimit-*`` headers. The middleware adds them to each response it sees before
    it is prepared; a handler that prepares (streams) its response sends them itself."""
    headers = {"X-Request-ID": ctx.request_id, "Server": SERVER}
    if ctx.cors is not None:
        headers.update(ctx.cors)
    if ctx.rate_limit_headers is not None:
        headers.update(ctx.rate_limit_headers)
    return headers


def served_by(ctx: RequestContext, backend: Backend, now: float) -> dict[str, str]:
    """The headers of an answer from ``backend``, committed at ``now`` (monotonic): who
    served it, after how many attempts, and the gateway's own share of the wait.

    Fixes the request's overhead and time to first byte as of the commit.
    """
    ctx.provider = backend.provider.id
    ctx.backend_model = backend.config.model
    overhead = ctx.commit(now)
    ctx.time_to_first_byte = now - ctx.started
    return {
        "X-Berry-Provider": backend.provider.id,
        "X-Berry-Backend-Model": backend.config.model,
        "X-Berry-Attempts": str(ctx.attempts),
        "X-Berry-Overhead-Ms": f"{overhead * 1000:.3f}",
    }
