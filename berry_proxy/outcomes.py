"""What a finished attempt records, in one place per request.

The unary path and the stream relay report what happened (served, failed, the trial
proved the backend, the model was or was not served); ``Outcomes`` turns that into the
pool's statistics, breakers and SmartAI confidence, and into the request's log fields.
It carries the request's ``Evidence``, so one request charges a breaker at most once.
This is where the next issues' per-request accounting (metrics, token usage for rate
limits) hooks in.
"""

from __future__ import annotations

from .context import RequestContext
from .errors import FailureKind, UpstreamFailure
from .exchange import Exchange
from .pool import BackendPool, Evidence


class Outcomes:
    __slots__ = ("_counted", "ctx", "evidence", "pool")

    def __init__(self, pool: BackendPool, ctx: RequestContext) -> None:
        self.pool = pool
        self.ctx = ctx
        self.evidence = Evidence()
        self._counted: Exchange | None = None  # the attempt whose outcome is counted

    def _count(self, exchange: Exchange, outcome: str) -> None:
        """One ``berry_upstream_requests_total`` sample per attempt: the first outcome
        reported (a broken stream whose client then left is a failure, not also gone)."""
        if self._counted is exchange:
            return
        self._counted = exchange
        backend = exchange.backend
        self.pool.metrics.attempted(
            backend.provider.id, backend.model.id, outcome, exchange.elapsed()
        )

    def served(self, exchange: Exchange, latency: float) -> None:
        """The attempt's answer reached the client whole (a stream: up to ``[DONE]``)."""
        self.pool.record_success(exchange.backend, latency, exchange.admission, self.ctx.stream)
        self._count(exchange, "success")

    def passed_through(self, exchange: Exchange) -> None:
        """The attempt's answer was the caller's error (4xx): nobody's failure."""
        self._count(exchange, "client_error")

    def proven(self, exchange: Exchange) -> None:
        """A stream reached its first content: a trial attempt has proven its backend."""
        self.pool.confirm_trial(exchange.backend, exchange.admission)

    def abandoned(self, exchange: Exchange) -> None:
        """The client left (or stopped reading) during a committed stream."""
        self._count(exchange, "client_gone")

    def drained(self, exchange: Exchange) -> None:
        """The gateway's drain ran out during the attempt: nobody's failure."""
        self._count(exchange, "drained")

    def failed(self, exchange: Exchange, failure: UpstreamFailure) -> None:
        """The attempt failed; saturation (the gateway's own limit) blames no one."""
        backend = exchange.backend
        self.ctx.failures.append(f"{backend.provider.id}: {failure.kind.value}")
        if failure.kind is not FailureKind.SATURATED:  # else nothing was sent
            self.pool.record_failure(
                backend, failure, exchange.admission, self.evidence, self.ctx.stream
            )
            self._count(exchange, failure.kind.value)

    def model_outcome(self, model_id: str, ok: bool, latency: float) -> None:
        self.pool.record_model_outcome(model_id, ok=ok, latency=latency)
