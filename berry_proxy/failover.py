"""The attempt budget and order of one request: what to try next, when to stop. Pure.

``Failover`` is iterated by the proxy: it yields the next backend to try, and the proxy
tells it what each attempt did (``sent``, ``failed``). The rules (SPEC §2 "Failover",
§5 "Attempts" and "Breaker evidence"):

- every planned backend once, in the router's order;
- then up to ``max_internal_retries`` more passes over the backends whose last failure
  was transient (a dropped connection, a malformed answer, a 5xx); never after a 429, a
  rejected key or a timeout, which an immediate retry would not change (or would spend
  the deadline on);
- a 5xx is retried on the same backend at most once: a request the upstream answers 500
  again and again is most likely the request's own fault, and must not hammer it;
- at most ``settings.max_retries`` attempts sent in total, at most a provider's own
  ``max_retries`` against it, none once the request's deadline has passed.

An attempt that never left (its breaker refused it, or no connection slot freed in time)
is not an attempt sent: ``X-Berry-Attempts`` and ``details.attempts`` count only those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from .config import Settings
from .errors import FailureKind, GatewayError, UpstreamFailure, error_for_failures
from .pool import Backend

Clock = Callable[[], float]

# Failures worth repeating on the same backend once every other has been tried.
RETRY_SAME_BACKEND = frozenset({FailureKind.NETWORK, FailureKind.SERVER, FailureKind.PROTOCOL})
# Attempts a 5xx allows on one backend within one request (the first plus one retry).
MAX_SERVER_ERROR_TRIES = 2


class Failover:
    __slots__ = (
        "_last_failure",
        "_per_provider",
        "_tries",
        "attempts",
        "clock",
        "deadline",
        "failures",
        "plan",
        "settings",
    )

    def __init__(
        self, plan: Sequence[Backend], settings: Settings, deadline: float, clock: Clock
    ) -> None:
        self.plan = plan
        self.settings = settings
        self.deadline = deadline
        self.clock = clock
        self.attempts = 0  # attempts sent
        self.failures: list[UpstreamFailure] = []
        self._last_failure: dict[Backend, FailureKind] = {}
        self._tries: dict[Backend, int] = {}
        self._per_provider: dict[str, int] = {}

    def __iter__(self) -> Iterator[Backend]:
        """The next backend to try, until the order or the budget runs out."""
        for backend in self._order():
            if self.attempts >= self.settings.max_retries or self.clock() >= self.deadline:
                return
            cap = backend.provider.config.max_retries
            if cap is not None and self._per_provider.get(backend.provider.id, 0) >= cap:
                continue
            yield backend

    def _order(self) -> Iterator[Backend]:
        yield from self.plan
        for _ in range(self.settings.max_internal_retries):
            again = [b for b in self.plan if self._worth_again(b)]
            if not again:
                return
            yield from again

    def _worth_again(self, backend: Backend) -> bool:
        kind = self._last_failure.get(backend)
        if kind not in RETRY_SAME_BACKEND:
            return False
        return kind is not FailureKind.SERVER or self._tries.get(backend, 0) < (
            MAX_SERVER_ERROR_TRIES
        )

    def sent(self, backend: Backend) -> None:
        """An attempt on ``backend`` went out (it holds a connection slot)."""
        self.attempts += 1
        self._tries[backend] = self._tries.get(backend, 0) + 1
        pid = backend.provider.id
        self._per_provider[pid] = self._per_provider.get(pid, 0) + 1

    def failed(self, backend: Backend, failure: UpstreamFailure) -> None:
        """The attempt on ``backend`` failed (detached: it keeps no frames alive)."""
        self.failures.append(failure.detach())
        self._last_failure[backend] = failure.kind

    def final_error(self, no_backend: Callable[[], GatewayError]) -> GatewayError:
        """The client's error once no attempt succeeded.

        ``no_backend`` builds the answer for "nothing could even be tried" (every planned
        backend refused at the last moment, e.g. breakers tripped by concurrent requests).
        """
        failures = self.failures
        if not failures:
            if self.clock() < self.deadline:
                return no_backend()
            failures = [
                UpstreamFailure(FailureKind.TIMEOUT, "request deadline passed before an attempt")
            ]
        return error_for_failures(failures, attempts=self.attempts)
