"""Gateway errors, their JSON envelope, and the one mapping of upstream failures.

Every error the gateway itself produces is a ``GatewayError``; the error middleware turns
it into the SPEC's envelope::

    {"error": {"type": ..., "code": ..., "message": ..., "param": ..., "details": {...}}}

The tree (status, ``type``)::

    GatewayError
    ├── InvalidRequest          400 invalid_request   missing_parameter, invalid_parameter,
    │                                                 invalid_json, invalid_model,
    │                                                 invalid_body, invalid_http
    ├── AuthenticationFailed    401 authentication_error  missing_token, invalid_token
    ├── PermissionDenied        403 permission_error  model_not_allowed, admin_required
    ├── NotFound                404 invalid_request   not_found, model_not_found
    ├── MethodNotAllowed        405 invalid_request   method_not_allowed
    ├── RequestTimeout          408 invalid_request   request_timeout
    ├── RequestTooLarge         413 invalid_request   request_too_large
    ├── ExpectationFailed       417 invalid_request   expectation_failed
    ├── HeadersTooLarge         431 invalid_request   request_headers_too_large
    ├── RateLimited             429 rate_limit_error  rate_limit_exceeded, upstream_rate_limited
    ├── InternalError           500 service_error     internal_error
    ├── UpstreamError           502 service_error     upstream_error
    ├── ServiceUnavailable      503 service_error     no_healthy_backends, draining,
    │                                                 upstream_saturated
    └── UpstreamTimeout         504 service_error     upstream_timeout

Upstream trouble is described separately by ``UpstreamFailure`` (what went wrong with one
attempt, classified once by ``FailureKind``); the proxy turns the attempts' failures into
one client-facing ``GatewayError`` with ``error_for_failures``. ``upstream_errors`` is the
one place where transport exceptions become failures.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, ClassVar

import aiohttp
import orjson

# An upstream's Retry-After is passed on (and obeyed) for at most this long: a provider
# asking for a billion seconds must not take itself out of rotation for good.
MAX_RETRY_AFTER_SECONDS = 3600.0


class GatewayError(Exception):
    """An error answered to the client in the SPEC's envelope."""

    status: int = 500  # an instance may narrow it (e.g. a mapped aiohttp HTTP error)
    type: ClassVar[str] = "service_error"
    # The connection cannot carry another request after this answer (e.g. a request body
    # that was not read to its end): the response says ``Connection: close`` (aiohttp then
    # reads and discards what the client still sends for a while, so it can read this).
    close_connection: bool = False
    # Close at once once the answer is written, without reading more from the client: it
    # stopped sending (408), or its body is broken beyond reading (bad encoding).
    drop_connection: bool = False

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.details = dict(details) if details else None
        self.headers = dict(headers) if headers else {}

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }
        if self.details is not None:
            body["details"] = self.details
        return {"error": body}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request"
    drop_connection = True


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request"


class ExpectationFailed(GatewayError):
    status = 417
    type = "invalid_request"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"


class InternalError(GatewayError):
    status = 500
    type = "service_error"


class UpstreamError(GatewayError):
    status = 502
    type = "service_error"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "service_error"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "service_error"


def missing_parameter(name: str) -> InvalidRequest:
    return InvalidRequest("missing_parameter", f"Missing required parameter: {name}", param=name)


def invalid_parameter(name: str, reason: str) -> InvalidRequest:
    return InvalidRequest("invalid_parameter", f"Invalid parameter '{name}': {reason}", param=name)


# --------------------------------------------------------------------------------------
# Upstream failures
# --------------------------------------------------------------------------------------


class FailureKind(enum.Enum):
    """Why one upstream attempt failed; drives failover, breaker and SmartAI penalties."""

    NETWORK = "network_error"  # connect refused/reset, DNS, TLS, connection dropped
    TIMEOUT = "timeout"  # connect, first byte, idle gap or total deadline
    SERVER = "server_error"  # upstream 5xx
    RATE_LIMIT = "rate_limited"  # upstream 429
    AUTH = "auth_error"  # upstream 401/403: the provider's key is bad
    PROTOCOL = "protocol_error"  # 200 that is not JSON, broken SSE
    # A 2xx answer larger than max_response_bytes: as likely the request's doing (a huge
    # batch) as the provider's, and the same again on the same backend. Another backend
    # is tried; no breaker or confidence is charged.
    TOO_LARGE = "response_too_large"
    # Every connection slot to the provider is busy (max_connections): the gateway's own
    # limit, so it never counts against the provider.
    SATURATED = "saturated"


class UpstreamFailure(Exception):
    """One upstream attempt failed in a way another backend might not.

    ``message`` is safe to show a client: it never holds a key or an upstream URL.
    """

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after

    def detach(self) -> UpstreamFailure:
        """This failure without its traceback and chained exceptions; returns itself.

        A caught failure's traceback holds the frames of the attempt it ended, and with
        them the attempt's buffers. Detached, it can be kept for the final error without
        keeping those alive, and without a reference cycle only a full GC could break.
        """
        self.__traceback__ = None
        self.__context__ = None
        self.__cause__ = None
        return self


def failure_for_status(status: int, retry_after: float | None = None) -> UpstreamFailure | None:
    """The failure an upstream status means, or None when the answer goes to the client.

    400/404/413/422 and other 4xx are the caller's fault and pass through untouched.
    """
    if status >= 500:
        return UpstreamFailure(
            FailureKind.SERVER, f"upstream returned HTTP {status}", status=status
        )
    if status == 429:
        return UpstreamFailure(
            FailureKind.RATE_LIMIT,
            "upstream rate limited the request (HTTP 429)",
            status=status,
            retry_after=retry_after,
        )
    if status in (401, 403):
        return UpstreamFailure(
            FailureKind.AUTH,
            f"upstream rejected the provider credentials (HTTP {status})",
            status=status,
        )
    return None


def map_upstream_exception(exc: BaseException, phase: str) -> UpstreamFailure | None:
    """The provider failure ``exc`` means, or None if it is not a provider's fault.

    ``phase`` ("first byte", "stream", "response") ends up in the message. Never maps
    ``CancelledError``: a departed client is not a provider failure.
    """
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(FailureKind.TIMEOUT, f"upstream {phase} timed out")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(FailureKind.NETWORK, "cannot connect to upstream")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return UpstreamFailure(FailureKind.NETWORK, f"upstream connection dropped during {phase}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamFailure(FailureKind.PROTOCOL, f"invalid upstream response during {phase}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return UpstreamFailure(FailureKind.NETWORK, f"upstream connection error during {phase}")
    return None


class upstream_errors:  # used like a function: ``with upstream_errors(...)``
    """Context manager: a transport exception inside becomes the ``UpstreamFailure`` it
    means (``map_upstream_exception``); anything else passes unchanged.

    Wrap only the reading and sending of an upstream exchange, never a write to the
    client: a departed client raises ``ConnectionResetError`` too, and it is not the
    provider's fault.

    No reference cycles: the failure is raised without chaining (``from None``) and
    without binding it to a local of a frame its traceback holds; and the replaced
    exception forgets its traceback, because aiohttp keeps it (a broken response stores
    its error to raise it again), so that traceback's frames, which hold the response,
    would otherwise form a cycle with it that only a full GC could break.
    """

    __slots__ = ("phase",)

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, UpstreamFailure):
            return
        failure = transport_failure(exc, self.phase)
        if failure is not None:
            raise failure from None


def transport_failure(exc: BaseException, phase: str) -> UpstreamFailure | None:
    """What ``upstream_errors`` raises for ``exc``: the provider failure a transport
    exception means (``exc`` then forgets its traceback), or None for any other exception.

    For a loop that reads a stream, where a ``with upstream_errors(...)`` block around
    every read would cost a context-manager object and two calls per read.
    """
    if not _is_transport_error(exc):
        return None
    _forget_frames(exc)
    failure = map_upstream_exception(exc, phase)
    assert failure is not None  # noqa: S101  # _is_transport_error said so
    return failure


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions chained to it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def _is_transport_error(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError | aiohttp.ClientError | OSError)


def error_for_failures(
    failures: Sequence[UpstreamFailure], attempts: int | None = None
) -> GatewayError:
    """The one client-facing error for a request whose every attempt failed.

    ``attempts`` counts the attempts actually sent (default: one per failure).
    """
    if attempts is None:
        attempts = len(failures)
    if failures and all(f.kind is FailureKind.RATE_LIMIT for f in failures):
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        # Rounded up: a client told to come back sooner than the upstream allows fails again.
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        return RateLimited(
            "upstream_rate_limited",
            "Every upstream provider is rate limiting this model; retry later",
            details={"attempts": attempts, "retry_after": retry_after},
            headers={"Retry-After": str(retry_after)},
        )
    if failures and all(f.kind is FailureKind.SATURATED for f in failures):
        # Each saturated provider estimated when a slot should free up; the soonest wins.
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        retry_after = max(1, math.ceil(min(waits))) if waits else 1
        return ServiceUnavailable(
            "upstream_saturated",
            "Every connection to this model's providers is busy; retry shortly",
            details={"attempts": attempts, "retry_after": retry_after},
            headers={"Retry-After": str(retry_after)},
        )
    if failures and all(f.kind is FailureKind.TIMEOUT for f in failures):
        return UpstreamTimeout(
            "upstream_timeout",
            "The upstream provider did not answer in time",
            details={"attempts": attempts, "last_error": failures[-1].message},
        )
    return UpstreamError(
        "upstream_error",
        "All upstream providers failed",
        details={
            "attempts": attempts,
            "last_error": failures[-1].message if failures else "no attempt was made",
        },
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header, delta-seconds or HTTP-date (RFC 9110 §10.2.3),
    capped at ``MAX_RETRY_AFTER_SECONDS``; None when absent or unreadable.

    ``now`` is the wall clock (seconds since the epoch) a date is measured from.
    """
    if not value:
        return None
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value, time.time() if now is None else now)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is taken as such
        return None
    return max(0.0, when.timestamp() - now)
