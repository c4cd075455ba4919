"""The error envelope and the one mapping of upstream failures (``errors.py``).

Checks the SPEC's error table (status, ``type``, ``code``), how a request whose every
attempt failed is reported (429 / 504 / 502), which upstream statuses and exceptions count
as provider failures, and that nothing in the client-facing text leaks an upstream URL.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiohttp
import orjson
import pytest
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from berry_proxy.errors import (
    MAX_RETRY_AFTER_SECONDS,
    AuthenticationFailed,
    FailureKind,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamError,
    UpstreamFailure,
    UpstreamTimeout,
    error_for_failures,
    failure_for_status,
    invalid_parameter,
    map_upstream_exception,
    missing_parameter,
    parse_retry_after,
    upstream_errors,
)

SECRET_HOST = "secret-upstream.internal.example"
SECRET_URL = f"https://{SECRET_HOST}:8443/v1/chat/completions?api-key=sk-leak"


@pytest.mark.parametrize(
    ("cls", "code", "status", "error_type"),
    [
        (InvalidRequest, "invalid_parameter", 400, "invalid_request"),
        (InvalidRequest, "invalid_model", 400, "invalid_request"),
        (AuthenticationFailed, "missing_token", 401, "authentication_error"),
        (AuthenticationFailed, "invalid_token", 401, "authentication_error"),
        (PermissionDenied, "model_not_allowed", 403, "permission_error"),
        (PermissionDenied, "admin_required", 403, "permission_error"),
        (NotFound, "not_found", 404, "invalid_request"),
        (MethodNotAllowed, "method_not_allowed", 405, "invalid_request"),
        (RequestTooLarge, "request_too_large", 413, "invalid_request"),
        (RateLimited, "rate_limit_exceeded", 429, "rate_limit_error"),
        (InternalError, "internal_error", 500, "service_error"),
        (UpstreamError, "upstream_error", 502, "service_error"),
        (ServiceUnavailable, "no_healthy_backends", 503, "service_error"),
        (ServiceUnavailable, "draining", 503, "service_error"),
        (UpstreamTimeout, "upstream_timeout", 504, "service_error"),
    ],
)
def test_envelope_of_each_error_class(
    cls: type[GatewayError], code: str, status: int, error_type: str
) -> None:
    error = cls(code, "something went wrong")
    assert error.status == status
    assert orjson.loads(error.body()) == {
        "error": {
            "type": error_type,
            "code": code,
            "message": "something went wrong",
            "param": None,
        }
    }


def test_envelope_carries_param_details_and_headers() -> None:
    error = PermissionDenied(
        "model_not_allowed",
        "You don't have permission to access this model",
        param="model",
        details={"model": "gpt-4", "allowed_models": ["gpt-3.5-turbo"]},
        headers={"X-Extra": "1"},
    )
    # The shape of the SPEC's example, with the offending parameter named.
    assert orjson.loads(error.body()) == {
        "error": {
            "type": "permission_error",
            "code": "model_not_allowed",
            "message": "You don't have permission to access this model",
            "param": "model",
            "details": {"model": "gpt-4", "allowed_models": ["gpt-3.5-turbo"]},
        }
    }
    assert error.headers == {"X-Extra": "1"}
    assert str(error) == "You don't have permission to access this model"


def test_parameter_helpers_name_the_parameter() -> None:
    missing = missing_parameter("messages").envelope()["error"]
    assert (missing["code"], missing["param"]) == ("missing_parameter", "messages")
    assert "messages" in missing["message"]
    invalid = invalid_parameter("top_p", "must be between 0 and 1").envelope()["error"]
    assert (invalid["code"], invalid["param"]) == ("invalid_parameter", "top_p")
    assert "must be between 0 and 1" in invalid["message"]


# --------------------------------------------------------------------------------------
# error_for_failures
# --------------------------------------------------------------------------------------


def rate_limited(retry_after: float | None) -> UpstreamFailure:
    failure = failure_for_status(429, retry_after)
    assert failure is not None
    return failure


def timed_out() -> UpstreamFailure:
    failure = map_upstream_exception(TimeoutError(), "first byte")
    assert failure is not None
    return failure


def test_all_rate_limited_is_429_with_smallest_retry_after() -> None:
    error = error_for_failures([rate_limited(30), rate_limited(7), rate_limited(None)])
    assert isinstance(error, RateLimited)
    envelope = error.envelope()["error"]
    assert (error.status, envelope["type"], envelope["code"]) == (
        429,
        "rate_limit_error",
        "upstream_rate_limited",
    )
    assert envelope["details"] == {"attempts": 3, "retry_after": 7}
    assert error.headers == {"Retry-After": "7"}


@pytest.mark.parametrize(("waits", "expected"), [([None, None], "1"), ([0.0], "1"), ([0.2], "1")])
def test_rate_limited_retry_after_is_at_least_one_second(
    waits: list[float | None], expected: str
) -> None:
    error = error_for_failures([rate_limited(w) for w in waits])
    assert error.status == 429
    assert error.headers["Retry-After"] == expected


def test_all_timeouts_is_504() -> None:
    error = error_for_failures([timed_out(), timed_out()])
    assert isinstance(error, UpstreamTimeout)
    envelope = error.envelope()["error"]
    assert (error.status, envelope["type"], envelope["code"]) == (
        504,
        "service_error",
        "upstream_timeout",
    )
    assert envelope["details"]["attempts"] == 2


@pytest.mark.parametrize(
    "kinds",
    [
        [FailureKind.RATE_LIMIT, FailureKind.TIMEOUT],
        [FailureKind.TIMEOUT, FailureKind.SERVER],
        [FailureKind.RATE_LIMIT, FailureKind.NETWORK],
        [FailureKind.SERVER],
        [FailureKind.AUTH, FailureKind.PROTOCOL, FailureKind.NETWORK],
    ],
)
def test_any_other_mix_is_502_with_attempts_and_last_error(kinds: list[FailureKind]) -> None:
    failures = [UpstreamFailure(kind, f"failure {i}") for i, kind in enumerate(kinds)]
    error = error_for_failures(failures)
    assert isinstance(error, UpstreamError)
    envelope = error.envelope()["error"]
    assert (error.status, envelope["type"], envelope["code"]) == (
        502,
        "service_error",
        "upstream_error",
    )
    assert envelope["details"] == {
        "attempts": len(kinds),
        "last_error": f"failure {len(kinds) - 1}",
    }
    assert "Retry-After" not in error.headers


def test_no_attempt_at_all_is_502() -> None:
    error = error_for_failures([])
    assert error.status == 502
    assert error.envelope()["error"]["details"]["attempts"] == 0


def connector_error() -> aiohttp.ClientConnectorError:
    key = ConnectionKey(SECRET_HOST, 8443, True, True, None, None, None, SECRET_HOST)
    return aiohttp.ClientConnectorError(
        key, ConnectionRefusedError(111, f"Connect call failed ('{SECRET_HOST}', 8443)")
    )


def response_error() -> aiohttp.ClientResponseError:
    url = URL(SECRET_URL)
    info = aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=200, message=f"bad body from {SECRET_URL}")


def test_no_client_facing_text_contains_an_upstream_url() -> None:
    # The exceptions themselves name the upstream; what reaches the client must not.
    assert SECRET_HOST in str(connector_error())
    assert SECRET_HOST in str(response_error())
    exceptions: list[BaseException] = [
        connector_error(),
        response_error(),
        aiohttp.ServerDisconnectedError(f"disconnected by {SECRET_URL}"),
        aiohttp.ClientPayloadError(f"payload from {SECRET_URL} not completed"),
        aiohttp.InvalidURL(SECRET_URL),
        OSError(f"network unreachable: {SECRET_URL}"),
        TimeoutError(f"timed out talking to {SECRET_URL}"),
    ]
    failures = []
    for exc in exceptions:
        failure = map_upstream_exception(exc, "response")
        assert failure is not None, exc
        failures.append(failure)
    for status in (500, 503, 401, 403, 429):
        failure = failure_for_status(status)
        assert failure is not None
        failures.append(failure)
    errors = [error_for_failures(failures[: i + 1]) for i in range(len(failures))]
    errors += [error_for_failures([f]) for f in failures]
    assert {e.status for e in errors} >= {502, 504, 429}
    for error in errors:
        text = error.body().decode()
        assert SECRET_HOST not in text
        assert "http://" not in text
        assert "https://" not in text
        assert "sk-leak" not in text


# --------------------------------------------------------------------------------------
# failure_for_status / map_upstream_exception / parse_retry_after
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, FailureKind.SERVER),
        (502, FailureKind.SERVER),
        (503, FailureKind.SERVER),
        (504, FailureKind.SERVER),
        (529, FailureKind.SERVER),
        (429, FailureKind.RATE_LIMIT),
        (401, FailureKind.AUTH),
        (403, FailureKind.AUTH),
    ],
)
def test_statuses_that_fail_over(status: int, kind: FailureKind) -> None:
    failure = failure_for_status(status)
    assert failure is not None
    assert failure.kind is kind
    assert failure.status == status


def test_429_keeps_retry_after() -> None:
    failure = failure_for_status(429, 12.0)
    assert failure is not None
    assert failure.retry_after == 12.0


@pytest.mark.parametrize("status", [200, 201, 400, 404, 409, 413, 422])
def test_caller_errors_and_successes_are_not_failures(status: int) -> None:
    assert failure_for_status(status) is None


def test_map_timeout() -> None:
    for exc in (
        TimeoutError(),
        aiohttp.ServerTimeoutError("read timeout"),
        aiohttp.ConnectionTimeoutError("connect timeout"),
    ):
        failure = map_upstream_exception(exc, "first byte")
        assert failure is not None
        assert failure.kind is FailureKind.TIMEOUT
        assert "first byte" in failure.message


@pytest.mark.parametrize(
    "exc",
    [
        connector_error(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError("generic"),
        socket.gaierror(-2, "Name or service not known"),
        ssl.SSLError("bad handshake"),
    ],
)
def test_map_network_errors(exc: BaseException) -> None:
    failure = map_upstream_exception(exc, "stream")
    assert failure is not None
    assert failure.kind is FailureKind.NETWORK


def test_map_dropped_connection_names_the_phase() -> None:
    failure = map_upstream_exception(aiohttp.ServerDisconnectedError(), "stream")
    assert failure is not None
    assert "stream" in failure.message


def test_map_invalid_response_is_protocol_error() -> None:
    failure = map_upstream_exception(response_error(), "response")
    assert failure is not None
    assert failure.kind is FailureKind.PROTOCOL


def test_map_keeps_an_existing_failure() -> None:
    original = UpstreamFailure(FailureKind.SERVER, "already classified", status=500)
    assert map_upstream_exception(original, "response") is original


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),  # a departed client is not a provider failure
        KeyboardInterrupt(),
        ValueError("a bug in the gateway"),
        KeyError("model"),
        RuntimeError("boom"),
    ],
)
def test_non_provider_exceptions_are_not_mapped(exc: BaseException) -> None:
    assert map_upstream_exception(exc, "response") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (" 20 ", 20.0),
        (None, None),
        ("", None),
        ("-3", None),
        ("soon", None),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00", None),  # a date without its zone is not HTTP's
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


# 2015-10-21T07:28:00Z, the RFC 9110 example date.
EXAMPLE_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
EXAMPLE_EPOCH = 1445412480.0


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    assert parse_retry_after(EXAMPLE_DATE, now=EXAMPLE_EPOCH - 90) == 90.0
    assert parse_retry_after(EXAMPLE_DATE, now=EXAMPLE_EPOCH + 5) == 0.0  # already past


@pytest.mark.parametrize("value", ["1000000000", "3601", "Fri, 01 Jan 2100 00:00:00 GMT"])
def test_retry_after_is_capped_at_an_hour(value: str) -> None:
    assert parse_retry_after(value, now=EXAMPLE_EPOCH) == MAX_RETRY_AFTER_SECONDS == 3600


def test_fractional_retry_after_is_never_shortened() -> None:
    error = error_for_failures([rate_limited(parse_retry_after("3.4"))])
    assert int(error.headers["Retry-After"]) >= 3.4


def test_infinite_retry_after_does_not_crash_the_429_mapping() -> None:
    error = error_for_failures([rate_limited(parse_retry_after("inf"))])
    assert error.status == 429


# --------------------------------------------------------------------------------------
# upstream_errors: the one place transport exceptions become failures
# --------------------------------------------------------------------------------------


def _client_exception_classes() -> list[type[BaseException]]:
    """Every exception class aiohttp's client can raise (``aiohttp.client_exceptions``)."""
    return [
        cls
        for cls in vars(aiohttp.client_exceptions).values()
        if isinstance(cls, type) and issubclass(cls, aiohttp.ClientError)
    ]


def test_every_aiohttp_client_exception_is_mapped_to_a_failure() -> None:
    classes = _client_exception_classes()
    assert len(classes) > 20  # the module's whole tree, not an empty list
    for cls in classes:
        exc = cls.__new__(cls)  # isinstance is all the mapping looks at
        with pytest.raises(UpstreamFailure) as caught, upstream_errors("stream"):
            raise exc
        assert caught.value.kind in {
            FailureKind.NETWORK,
            FailureKind.PROTOCOL,
            FailureKind.TIMEOUT,
        }, cls
        assert "stream" in caught.value.message


@pytest.mark.parametrize(
    "exc", [TimeoutError(), ConnectionResetError(), OSError("no route"), ssl.SSLError()]
)
def test_timeouts_and_os_errors_are_mapped_too(exc: BaseException) -> None:
    with pytest.raises(UpstreamFailure), upstream_errors("first byte"):
        raise exc


@pytest.mark.parametrize(
    "exc", [RuntimeError("our bug"), ValueError("bad"), KeyError("k"), asyncio.CancelledError()]
)
def test_bugs_and_cancellation_pass_through_unchanged(exc: BaseException) -> None:
    with pytest.raises(type(exc)) as caught, upstream_errors("stream"):
        raise exc
    assert caught.value is exc


def test_an_upstream_failure_passes_through_as_it_is() -> None:
    failure = UpstreamFailure(FailureKind.PROTOCOL, "not JSON")
    with pytest.raises(UpstreamFailure) as caught, upstream_errors("response"):
        raise failure
    assert caught.value is failure


def test_a_mapped_failure_is_not_chained_to_what_it_replaced() -> None:
    with pytest.raises(UpstreamFailure) as caught, upstream_errors("stream"):
        raise aiohttp.ServerDisconnectedError()
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    detached = caught.value.detach()
    assert (detached.__traceback__, detached.__context__) == (None, None)
