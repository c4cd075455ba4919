"""Per-user rate limits (SPEC §1 ``users.<id>.rate_limit``, §5 "Rate limits").

Every request and token limit is a GCRA (generic cell rate algorithm, the token bucket
written as one number per limit): a limit of ``L`` per window ``W`` lets a user spend up to
``L`` at once and then refills at ``L / W``, continuously, so no window edge ever admits a
second burst. Its state is the "theoretical arrival time" ``tat``: the moment the user's
bucket is full again. A request costing ``c`` (1 for a request limit, the estimated tokens
for ``tokens_per_minute``) is admitted when ``max(tat, now) + c * W / L - now <= W``.
``gcra`` below is that formula; the Redis store's script (``ratelimit_redis``) is the same
formula in Lua, checked against this one by the tests.

A request passes every limit of its user or none: one decision checks them all and spends
on all only when each admits it. ``tokens_per_minute`` reserves an estimate (prompt bytes
÷ 4 + ``max_tokens``, or 1024 when absent) and ``settle`` corrects it with the usage the
upstream reported. ``max_concurrent`` is a lease per request, returned when it ends.

``RateLimiter`` is what the proxy calls; the stores (``MemoryStore`` here, ``RedisStore``
in ``ratelimit_redis``) keep the state behind one interface.
"""

from __future__ import annotations

import abc
import asyncio
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config_model import RateLimitConfig, UserConfig
from .errors import RateLimited

REQUEST_WINDOWS = (
    ("requests_per_minute", 60.0),
    ("requests_per_hour", 3600.0),
    ("requests_per_day", 86400.0),
)
TOKENS_PER_MINUTE = "tokens_per_minute"
MAX_CONCURRENT = "max_concurrent"
# Tokens reserved for the completion when the request names no max_tokens.
DEFAULT_COMPLETION_TOKENS = 1024
# How long a concurrency lease lives in a shared store if its instance dies holding it
# (a live instance always returns it): past any request's total time limit.
LEASE_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit of one user: ``limit`` per ``window`` seconds."""

    name: str  # requests_per_minute, ..., tokens_per_minute
    limit: int
    window: float
    interval: float  # seconds one unit takes to refill: window / limit
    tokens: bool  # costs the request's tokens (else 1 per request)
    limit_text: str  # the limit as its header writes it, written once

    @classmethod
    def of(cls, name: str, limit: int, window: float) -> Rule:
        return cls(name, limit, window, window / limit, name == TOKENS_PER_MINUTE, str(limit))


@dataclass(frozen=True, slots=True)
class UserLimits:
    """A user's limits, built once per config. ``rules``: the request limits, then the
    token limit (last) when there is one."""

    user: str
    rules: tuple[Rule, ...]
    tokens: Rule | None
    max_concurrent: int | None


def limits_for(user: UserConfig) -> UserLimits | None:
    """The user's limits, or None when none is configured (the user then pays nothing)."""
    config: RateLimitConfig | None = user.rate_limit
    if config is None:
        return None
    rules = [
        Rule.of(name, value, window)
        for name, window in REQUEST_WINDOWS
        if (value := getattr(config, name)) is not None
    ]
    tpm = config.tokens_per_minute
    tokens = Rule.of(TOKENS_PER_MINUTE, tpm, 60.0) if tpm is not None else None
    if tokens is not None:
        rules.append(tokens)
    if not rules and config.max_concurrent is None:
        return None
    return UserLimits(user.id, tuple(rules), tokens, config.max_concurrent)


# Where one limit stands after a decision, for the ``x-ratelimit-*`` headers: (the rule,
# units remaining, seconds until the bucket is full again). A plain tuple: one is built
# per limit per request.
RuleState = tuple[Rule, int, float]


class Decision:
    """A store's answer: admitted (and spent on every rule, ``states`` in rule order), or
    refused by ``refused_by`` (then ``retry_after`` says when it would be admitted)."""

    __slots__ = ("refused_by", "retry_after", "states")

    def __init__(
        self,
        states: tuple[RuleState, ...],
        refused_by: Rule | None = None,
        retry_after: float = 0.0,
    ) -> None:
        self.states = states
        self.refused_by = refused_by
        self.retry_after = retry_after


NO_RULES = Decision(())  # the decision for a user limited by max_concurrent alone


def gcra(tat: float, now: float, rule: Rule, cost: float) -> tuple[bool, float, int, float]:
    """One limit's decision: (admitted, the new tat, units remaining, seconds).

    Admitted, the seconds are those until the bucket is full again (``reset``); refused,
    those until ``cost`` fits, and the tat is unchanged.
    """
    interval, window = rule.interval, rule.window
    start = tat if tat > now else now
    new_tat = start + cost * interval
    used = new_tat - now
    if used - window > 1e-9:
        left = int((window - (start - now)) / interval)  # both >= 0: int() is floor
        return False, tat, left, used - window
    return True, new_tat, int((window - used) / interval + 1e-9), used


def settled_tat(tat: float, now: float, rule: Rule, delta: float) -> float:
    """The tat after correcting a reservation by ``delta`` units (negative: a refund)."""
    settled = (tat if tat > now else now) + delta * rule.interval
    return settled if settled > now else now


class StoreUnavailable(Exception):
    """A shared store did not answer; the request is decided again by ``current()``."""


class Store(abc.ABC):
    """Where the limiters' state lives (one instance's memory, or Redis for many)."""

    name: str

    @abc.abstractmethod
    async def decide(self, limits: UserLimits, tokens: int) -> Decision:
        """Check every rule; spend on all of them only if each admits the request."""

    @abc.abstractmethod
    async def settle(self, limits: UserLimits, delta_tokens: int) -> None:
        """Correct the token reservation by ``delta_tokens`` (negative: a refund)."""

    @abc.abstractmethod
    async def acquire(self, limits: UserLimits, lease: str) -> bool:
        """Take one of the user's ``max_concurrent`` slots; False when all are taken."""

    @abc.abstractmethod
    async def release(self, limits: UserLimits, lease: str) -> None:
        """Give a slot back."""

    @abc.abstractmethod
    async def peek(self, limits: UserLimits) -> dict[str, Any]:
        """Where the user's limits stand, spending nothing (the admin view)."""

    def current(self) -> Store:
        """The store a new request's decision uses: this one, unless it stands in for
        another (the Redis store while Redis is down). An admission keeps it to the end."""
        return self

    def status(self) -> dict[str, Any]:
        """The store itself, for the admin view."""
        return {"backend": self.name}

    async def start(self) -> None:  # noqa: B027  # most stores have nothing to open
        """Open connections (at app start-up)."""

    async def close(self) -> None:  # noqa: B027  # most stores hold nothing to close
        """Stop background work and close connections."""


class MemoryStore(Store):
    """The embedded store: one instance's limits, in two dictionaries."""

    name = "memory"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        # Per user, one tat per rule, in the order of ``UserLimits.rules``.
        self.tats: dict[str, list[float]] = {}
        self.leases: dict[str, set[str]] = {}

    async def decide(self, limits: UserLimits, tokens: int) -> Decision:
        return self.decide_now(limits, tokens)

    def decide_now(self, limits: UserLimits, tokens: int) -> Decision:
        """``decide`` without awaiting: nothing can run between the checks and the spend."""
        now, rules = self.clock(), limits.rules
        tats = self.tats.get(limits.user)
        if tats is None:
            tats = self.tats[limits.user] = [0.0] * len(rules)  # long past: a full bucket
        spent: list[float] = []
        states: list[RuleState] = []
        for rule, tat in zip(rules, tats, strict=False):  # as long: built together
            admitted, new_tat, remaining, seconds = gcra(
                tat, now, rule, tokens if rule.tokens else 1
            )
            if not admitted:
                return Decision((), rule, seconds)
            spent.append(new_tat)
            states.append((rule, remaining, seconds))
        tats[:] = spent
        return Decision(tuple(states))

    async def settle(self, limits: UserLimits, delta_tokens: int) -> None:
        self.settle_now(limits, delta_tokens)

    def settle_now(self, limits: UserLimits, delta_tokens: int) -> None:
        rule, tats = limits.tokens, self.tats.get(limits.user)
        if rule is None or not delta_tokens or tats is None:
            return
        tats[-1] = settled_tat(tats[-1], self.clock(), rule, delta_tokens)  # tokens: last

    async def acquire(self, limits: UserLimits, lease: str) -> bool:
        return self.acquire_now(limits, lease)

    def acquire_now(self, limits: UserLimits, lease: str) -> bool:
        held = self.leases.setdefault(limits.user, set())
        if limits.max_concurrent is not None and len(held) >= limits.max_concurrent:
            return False
        held.add(lease)
        return True

    async def release(self, limits: UserLimits, lease: str) -> None:
        self.release_now(limits, lease)

    def release_now(self, limits: UserLimits, lease: str) -> None:
        held = self.leases.get(limits.user)
        if held is not None:
            held.discard(lease)
            if not held:
                del self.leases[limits.user]

    async def peek(self, limits: UserLimits) -> dict[str, Any]:
        now = self.clock()
        tats = self.tats.get(limits.user) or [0.0] * len(limits.rules)
        view: dict[str, Any] = {}
        for rule, tat in zip(limits.rules, tats, strict=True):
            view[rule.name] = rule_view(rule, tat, now)
        if limits.max_concurrent is not None:
            view[MAX_CONCURRENT] = {
                "limit": limits.max_concurrent,
                "in_use": len(self.leases.get(limits.user, ())),
            }
        return view


def rule_view(rule: Rule, tat: float, now: float) -> dict[str, Any]:
    """One limit's standing, spending nothing."""
    used = max(0.0, tat - now)
    return {
        "limit": rule.limit,
        "remaining": max(0, math.floor((rule.window - used) / rule.interval + 1e-9)),
        "reset_seconds": round(used, 3),
    }


# ------------------------------------------------------------------------------ limiter


class Admission:
    """What one admitted request holds until it ends: its lease and its reservation."""

    __slots__ = ("headers", "lease", "limits", "reserved", "store")

    def __init__(
        self,
        limits: UserLimits,
        store: Store,
        reserved: int,
        lease: str | None,
        headers: dict[str, str],
    ) -> None:
        self.limits = limits
        self.store = store
        self.reserved = reserved
        self.lease = lease
        self.headers = headers


class RateLimiter:
    """Admits or refuses each proxied request of a limited user (429 ``RateLimited``)."""

    def __init__(
        self,
        users: Mapping[str, UserConfig],
        store: Store,
        on_refused: Callable[[str, str], None],
        settling: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self.store = store
        self.limits = {uid: lim for uid, user in users.items() if (lim := limits_for(user))}
        self._on_refused = on_refused  # (user, limit name): the metrics' count
        # Settlements on their way to a shared store: one set for the limiters of every
        # reload of the config (they share the store), so close() waits for them all.
        self.settling: set[asyncio.Task[None]] = set() if settling is None else settling

    def limits_of(self, user: str) -> UserLimits | None:
        return self.limits.get(user)

    async def admit(self, limits: UserLimits, estimate: int) -> Admission:
        """Take a concurrency lease and spend on every rate limit, or raise 429.

        A shared store that fails mid-decision has switched itself to its stand-in
        (``current()``), which decides instead: a store outage is never the client's error.
        The memory store decides without awaiting anything (this runs on every request of
        a limited user).
        """
        store = self.store.current()
        if isinstance(store, MemoryStore):
            return self._admit_now(store, limits, estimate)
        try:
            return await self._admit(store, limits, estimate)
        except StoreUnavailable:
            fallback = self.store.current()
            if isinstance(fallback, MemoryStore):
                return self._admit_now(fallback, limits, estimate)
            return await self._admit(fallback, limits, estimate)

    def _admit_now(self, store: MemoryStore, limits: UserLimits, estimate: int) -> Admission:
        lease: str | None = None
        if limits.max_concurrent is not None:
            lease = secrets.token_hex(8)
            if not store.acquire_now(limits, lease):
                raise self._too_many(limits)
        tokens = estimate if limits.tokens is not None else 0
        decision = store.decide_now(limits, tokens) if limits.rules else NO_RULES
        if decision.refused_by is not None:
            if lease is not None:
                store.release_now(limits, lease)
            raise self._refused(limits, decision, tokens)
        return Admission(limits, store, tokens, lease, response_headers(decision.states))

    async def _admit(self, store: Store, limits: UserLimits, estimate: int) -> Admission:
        lease: str | None = None
        if limits.max_concurrent is not None:
            lease = secrets.token_hex(8)
            if not await store.acquire(limits, lease):
                raise self._too_many(limits)
        tokens = estimate if limits.tokens is not None else 0
        try:
            decision = await store.decide(limits, tokens) if limits.rules else NO_RULES
        except BaseException:
            if lease is not None:
                await store.release(limits, lease)
            raise
        if decision.refused_by is not None:
            if lease is not None:
                await store.release(limits, lease)
            raise self._refused(limits, decision, tokens)
        return Admission(limits, store, tokens, lease, response_headers(decision.states))

    def _too_many(self, limits: UserLimits) -> RateLimited:
        self._on_refused(limits.user, MAX_CONCURRENT)
        return too_many_concurrent(limits.max_concurrent or 0)

    def _refused(self, limits: UserLimits, decision: Decision, tokens: int) -> RateLimited:
        assert decision.refused_by is not None  # noqa: S101  # only refusals come here
        self._on_refused(limits.user, decision.refused_by.name)
        return over_limit(decision, tokens)

    def finish(self, admission: Admission, used_tokens: int | None) -> None:
        """The request ended: settle its tokens (None keeps the estimate) and return its
        lease, to the store that admitted it. A shared store is told in the background:
        the answer is complete and must not wait on Redis's round trip to leave."""
        store, limits = admission.store, admission.limits
        delta = 0
        if limits.tokens is not None and used_tokens is not None:
            delta = used_tokens - admission.reserved
        if isinstance(store, MemoryStore):
            store.settle_now(limits, delta)
            if admission.lease is not None:
                store.release_now(limits, admission.lease)
            return
        if not delta and admission.lease is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._finish_shared(store, limits, delta, admission.lease)
        )
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    @staticmethod
    async def _finish_shared(
        store: Store, limits: UserLimits, delta: int, lease: str | None
    ) -> None:
        try:
            if delta:
                await store.settle(limits, delta)
        finally:
            if lease is not None:
                await store.release(limits, lease)

    async def close(self) -> None:
        """Let settlements on their way finish (each is bounded by the store's timeout),
        then close the store."""
        if self.settling:
            await asyncio.wait(list(self.settling), timeout=2.0)
        await self.store.close()


def too_many_concurrent(limit: int) -> RateLimited:
    return RateLimited(
        "rate_limit_exceeded",
        f"Too many concurrent requests: this token may have {limit} in flight",
        details={"limit": MAX_CONCURRENT, "retry_after": 1},
        headers={"Retry-After": "1"},
    )


def over_limit(decision: Decision, tokens: int) -> RateLimited:
    rule = decision.refused_by
    assert rule is not None  # noqa: S101  # only refusals come here
    wait = decision.retry_after
    if rule.tokens and tokens > rule.limit:
        message = (
            f"This request alone needs an estimated {tokens} tokens, more than the limit of "
            f"{rule.limit} tokens per minute; lower max_tokens or the prompt"
        )
        wait = rule.window  # waiting never makes it fit: no promise sooner than a window
    else:
        message = f"Rate limit reached: {rule.limit} {rule.name.replace('_', ' ')}"
    retry_after = max(1, math.ceil(wait))
    return RateLimited(
        "rate_limit_exceeded",
        message,
        details={"limit": rule.name, "retry_after": retry_after},
        headers={"Retry-After": str(retry_after)},
    )


def response_headers(states: tuple[RuleState, ...]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers: the tightest request limit (fewest remaining,
    the shorter window on a tie) and the token limit."""
    headers: dict[str, str] = {}
    tightest: RuleState | None = None
    for state in states:
        rule, remaining, reset = state
        if rule.tokens:
            headers["x-ratelimit-limit-tokens"] = rule.limit_text
            headers["x-ratelimit-remaining-tokens"] = str(remaining)
            headers["x-ratelimit-reset-tokens"] = duration_text(reset)
        elif tightest is None or remaining < tightest[1]:
            tightest = state  # request rules come shortest window first: ties keep it
    if tightest is not None:
        rule, remaining, reset = tightest
        headers["x-ratelimit-limit-requests"] = rule.limit_text
        headers["x-ratelimit-remaining-requests"] = str(remaining)
        headers["x-ratelimit-reset-requests"] = duration_text(reset)
    return headers


def duration_text(seconds: float) -> str:
    """A duration as OpenAI writes it (Go's format): ``20ms``, ``1s``, ``1.5s``, ``6m0s``,
    ``1h0m0s``."""
    millis = math.ceil(seconds * 1000 - 1e-6)
    if millis < 1000:
        return f"{millis if millis > 0 else 0}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def estimate_tokens(body_bytes: int, max_tokens: int | None) -> int:
    """SPEC §5's reservation: prompt bytes ÷ 4 plus ``max_tokens`` (1024 when absent;
    the caller passes 0 for an endpoint that generates nothing, embeddings). The prompt is
    the request body: what the upstream reads."""
    completion = DEFAULT_COMPLETION_TOKENS if max_tokens is None else max(0, max_tokens)
    return body_bytes // 4 + completion
