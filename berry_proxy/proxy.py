"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``: the handler (also
behind their aliases without ``/v1`` and their Azure-style deployment paths).

For each request: read the body (bounded, ``request_body``), validate the few fields the
gateway must understand (``openai_request``), resolve the model and the user's
permission, ask the router for an attempt order, then try backends in that order
(``failover``) until one answers. Each attempt is one ``Exchange`` (breaker admission and
connection slot, held for its whole life) served by ``unary`` or by a ``StreamRelay``;
``Outcomes`` records what each did. Nothing reaches the client until an attempt has
succeeded (for a stream: until its first event with content), so every failure before
that point moves on to the next backend invisibly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from . import keys
from .auth import Access, access, resolve_model
from .config import Config, ModelConfig
from .context import RequestContext
from .drain import Drain, draining_error
from .errors import UpstreamFailure
from .exchange import Attempt, Exchange
from .failover import Failover
from .openai_request import (
    Body,
    Endpoint,
    OpenAIRequest,
    max_tokens_of,
    parse_request,
    upstream_body,
)
from .outcomes import Outcomes
from .pool import Backend, BackendPool
from .ratelimit import RateLimiter, estimate_tokens
from .relay import StreamRelay
from .request_body import read_body
from .routing import Router
from .unary import unary
from .upstream import Adapter, forwardable_request_headers

Clock = Callable[[], float]

# After validating a body this large, the handler yields to the loop (``Proxy._parse``).
LARGE_BODY_BYTES = 1024 * 1024


class Proxy:
    def __init__(
        self,
        config: Config,
        pool: BackendPool,
        router: Router,
        adapters: Mapping[str, Adapter],
        clock: Clock = time.monotonic,
        limiter: RateLimiter | None = None,
        drain: Drain | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.router = router
        self.adapters = adapters
        self.clock = clock
        self.limiter = limiter
        self.drain = drain or Drain()

    @staticmethod
    async def _parse(raw: Body, endpoint: Endpoint, deployment: str | None) -> OpenAIRequest:
        """``parse_request``; after a large body, a turn for everyone else.

        Validating a body is one pass over it that holds the event loop (~120 ms for a
        32 MiB body of tiny objects; msgspec keeps the GIL, so a thread would not help).
        After a large one the handler yields before rebuilding the body for upstream, so
        those two passes never block the loop back to back.
        """
        body = parse_request(raw, endpoint, deployment)
        if len(raw) >= LARGE_BODY_BYTES:
            await asyncio.sleep(0)
        return body

    async def handle(
        self, request: web.Request, endpoint: Endpoint, deployment: str | None = None
    ) -> web.StreamResponse:
        """Serve ``endpoint``; ``deployment`` is the model an Azure-style path names."""
        if self.drain.draining:
            raise draining_error()
        metrics = self.pool.metrics
        metrics.proxied_requests += 1
        metrics.proxied_in_flight += 1
        try:
            return await self._handle(request, endpoint, deployment)
        finally:
            metrics.proxied_in_flight -= 1

    async def _handle(
        self, request: web.Request, endpoint: Endpoint, deployment: str | None
    ) -> web.StreamResponse:
        ctx = request[keys.REQUEST_CONTEXT]
        user = request[keys.USER]
        server = self.config.server
        raw = await read_body(request, server.max_body_bytes, server.body_timeout_seconds)
        body = await self._parse(raw, endpoint, deployment)
        model = resolve_model(self.config, user, body.model)
        ctx.model = model.id
        ctx.stream = body.stream
        limiter = self.limiter
        limits = None if limiter is None else limiter.limits_of(user.id)
        admission = None  # a user without limits pays nothing more
        if limits is not None:
            # The rate-limit step, before routing (a refused request moves no router
            # state): only now is the estimate of a request's tokens known.
            assert limiter is not None  # noqa: S101  # limits come from it
            completion = 0 if not endpoint.streams else max_tokens_of(body)  # embeddings
            admission = await limiter.admit(limits, estimate_tokens(len(raw), completion))
            ctx.rate_limit_headers = admission.headers
        try:
            # 503 at once when no backend may be tried (a reservation is then refunded).
            plan = self.router.plan(model, user, body.stream)
            return await self._forward(request, ctx, endpoint, body, model, plan)
        finally:
            if admission is not None:
                assert limiter is not None  # noqa: S101  # it admitted the request
                limiter.finish(admission, used_tokens(ctx))

    async def _forward(
        self,
        request: web.Request,
        ctx: RequestContext,
        endpoint: Endpoint,
        body: OpenAIRequest,
        model: ModelConfig,
        plan: list[Backend],
    ) -> web.StreamResponse:
        """Try the plan's backends in turn until one answers (failing over)."""
        settings = self.config.settings
        clock = self.clock
        deadline = ctx.started + settings.request_timeout_seconds
        failover = Failover(plan, settings, deadline, clock)
        outcomes = Outcomes(self.pool, ctx)
        headers = forwardable_request_headers(request.headers)
        headers["Content-Type"] = "application/json"
        headers["X-Request-ID"] = ctx.request_id
        add_usage = body.stream and not body.wants_usage
        bodies: dict[str, Body] = {}  # backend model -> rewritten body, built once each
        metrics = self.pool.metrics
        failed_before: str | None = None  # the kind of the last failed attempt
        drain = self.drain
        for backend in failover:
            if drain.expired:
                # The drain ran out (perhaps while this request waited for a connection
                # slot): no new attempt, whatever is left of the budget.
                ctx.abort_reason = "draining"  # as an attempt the drain ended says
                raise draining_error()
            backend_model = backend.config.model
            upstream_request = bodies.get(backend_model)
            if upstream_request is None:
                upstream_request = bodies[backend_model] = upstream_body(
                    body, backend_model, add_usage
                )
            attempt = Attempt(
                backend=backend,
                adapter=self.adapters[backend.provider.id],
                body=upstream_request,
                headers=dict(headers),
                deadline=deadline,
                add_usage=add_usage,
            )
            # Nothing runs between taking the breakers' admission and entering the
            # exchange that gives it back: no exception can leak a half-open trial.
            exchange = Exchange.begin(self.pool, backend, deadline)
            if exchange is None:
                continue  # a breaker opened meanwhile, or another request holds the trial
            try:
                async with exchange:
                    failover.sent(backend)
                    ctx.attempts = failover.attempts
                    metrics.selected(model.id, model.strategy, backend.provider.id)
                    if failed_before is not None:
                        metrics.failed_over(model.id, failed_before)
                    if body.stream:
                        relay = StreamRelay(
                            request, ctx, endpoint, attempt, exchange, outcomes, clock, self.drain
                        )
                        return await relay.run()
                    return await unary(
                        request, ctx, endpoint, attempt, exchange, outcomes, clock, self.drain
                    )
            except UpstreamFailure as failure:
                failover.failed(backend, failure)
                outcomes.failed(exchange, failure)
                failed_before = failure.kind.value
        outcomes.model_outcome(model.id, ok=False, latency=0.0)
        raise failover.final_error(lambda: self.router.no_healthy_backends(model, plan))


def used_tokens(ctx: RequestContext) -> int | None:
    """The tokens a finished request used, to settle its reservation.

    The upstream's usage when it reported one. Else None (keep the estimate) when an
    answer was served without usage, or when the client left after an attempt was sent
    (the upstream may be generating anyway); else 0, a refund: nothing was served (every
    attempt failed, no backend could be tried).
    """
    if ctx.prompt_tokens is not None or ctx.completion_tokens is not None:
        return max(0, ctx.prompt_tokens or 0) + max(0, ctx.completion_tokens or 0)
    if ctx.status == 200 or (ctx.attempts and ctx.abort_reason == "client_disconnected"):
        return None
    return 0


def handler(
    endpoint: Endpoint, *, deployment_in_path: bool = False
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler serving ``endpoint`` through the proxy of the request's runtime.

    With ``deployment_in_path`` the route's ``{deployment}`` names the model, as on Azure
    OpenAI (``/openai/deployments/{deployment}/chat/completions``).
    """

    @access(Access.USER)
    async def handle(request: web.Request) -> web.StreamResponse:
        proxy = request[keys.RUNTIME].proxy
        deployment = request.match_info["deployment"] if deployment_in_path else None
        return await proxy.handle(request, endpoint, deployment)

    prefix = "handle_deployment_" if deployment_in_path else "handle_"
    handle.__name__ = prefix + endpoint.upstream_path.replace("/", "_")
    return handle
