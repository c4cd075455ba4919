"""What the gateway knows about one request: its id, its timing and what it did.

The request-context middleware creates one per request; handlers fill it in; the access
log line is written from it when the request ends. It never holds a token or prompt text.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids must be unique, not secret (a client may send any id it likes): 96 bits of
# a PRNG seeded from the OS, rather than a getrandom() system call per request.
_ID_BITS = random.Random()  # noqa: S311  # ids, not secrets (see above)
os.register_at_fork(after_in_child=_ID_BITS.seed)  # a forked child draws its own ids


def request_id_from(header: str | None) -> str:
    """Keep a client's sane ``X-Request-ID``; anything else gets a generated one."""
    if header is not None and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return f"req_{_ID_BITS.getrandbits(96):024x}"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float  # monotonic seconds
    route: str = "unmatched"
    user: str | None = None
    model: str | None = None
    provider: str | None = None
    backend_model: str | None = None
    attempts: int = 0
    status: int | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Seconds from the request's start until the first upstream byte reached the client.
    time_to_first_byte: float | None = None
    # Seconds spent waiting on upstreams (all attempts) until the response was committed.
    upstream_seconds: float = 0.0
    # The gateway's own share of the time until the response was committed.
    overhead: float | None = None
    abort_reason: str | None = None
    error_code: str | None = None
    failures: list[str] = field(default_factory=list)
    # The CORS headers every answer to this request carries (``cors``), if any.
    cors: Mapping[str, str] | None = None
    # The x-ratelimit-* headers of a request a rate limit admitted (``ratelimit``).
    rate_limit_headers: Mapping[str, str] | None = None

    def commit(self, now: float) -> float:
        """Fix the gateway's overhead at the moment the client response starts; return it."""
        self.overhead = max(0.0, now - self.started - self.upstream_seconds)
        return self.overhead

    def log_fields(self, now: float) -> dict[str, Any]:
        """The access line's fields: those always present, then each one that is set."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "route": self.route,
            "status": self.status,
            "duration_ms": round((now - self.started) * 1000, 3),
        }
        # One test per field, not a dict of candidates filtered: this runs per request.
        if self.user is not None:
            fields["user"] = self.user
        if self.model is not None:
            fields["model"] = self.model
        if self.provider is not None:
            fields["provider"] = self.provider
        if self.backend_model is not None:
            fields["backend_model"] = self.backend_model
        if self.prompt_tokens is not None:
            fields["prompt_tokens"] = self.prompt_tokens
        if self.completion_tokens is not None:
            fields["completion_tokens"] = self.completion_tokens
        if self.abort_reason is not None:
            fields["abort_reason"] = self.abort_reason
        if self.error_code is not None:
            fields["error_code"] = self.error_code
        if self.attempts:
            fields["attempts"] = self.attempts
            fields["stream"] = self.stream
        if self.overhead is not None:
            fields["overhead_ms"] = round(self.overhead * 1000, 3)
        if self.time_to_first_byte is not None:
            fields["ttfb_ms"] = round(self.time_to_first_byte * 1000, 3)
        if self.failures:
            fields["upstream_failures"] = self.failures
        return fields
