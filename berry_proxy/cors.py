"""CORS, so that browser apps can call the gateway (SPEC §5 "CORS").

``server.cors_allow_origins`` lists the origins (``scheme://host[:port]``) whose pages may
call the gateway; ``["*"]`` (the default, like the OpenAI API) is any page, ``[]`` turns
CORS off (no header is added and ``OPTIONS`` is a 405, as before).

- A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) to a path the gateway
  serves is answered 204 by the gateway itself: without a token (browsers never send one
  with a preflight) and never sent upstream. It allows the path's methods and the headers
  the page asked for (the OpenAI SDKs send their own ``x-stainless-*`` headers; a listed
  ``Authorization`` is never covered by a ``*``), for ``PREFLIGHT_MAX_AGE`` seconds.
- Every other answer to a request with an ``Origin`` (a browser script's), errors and
  streams included, carries ``Access-Control-Allow-Origin`` (with ``"*"``, not the
  answers of routes that need no token: see ``CorsPolicy.answer_headers``) and
  ``Access-Control-Expose-Headers`` (so a page can read the request id, the ``X-Berry-*``
  headers and the rate-limit headers). With a list of origins the allowed origin is
  echoed, and ``Vary: Origin`` tells caches the answer depends on it.

Credentials (cookies) are never allowed: the gateway authenticates by token only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from aiohttp import web

ALLOW_ORIGIN = "Access-Control-Allow-Origin"
EXPOSE_HEADERS = "Access-Control-Expose-Headers"

# Headers a page's script may read from an answer besides the CORS-safelisted ones.
EXPOSED = ", ".join(
    (
        "X-Request-ID",
        "X-Berry-Provider",
        "X-Berry-Backend-Model",
        "X-Berry-Attempts",
        "X-Berry-Overhead-Ms",
        "Retry-After",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
)
# Always allowed on a preflight, whatever the page lists.
ALWAYS_ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Request-ID", "api-key")
# Seconds a browser may cache a preflight (Chromium caps this at 7200).
PREFLIGHT_MAX_AGE = 7200
# A page's Access-Control-Request-Headers is echoed back only when it is a plain list of
# header names of reasonable length; anything else gets only the headers above.
_HEADER_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_LIST = re.compile(rf"{_HEADER_NAME}(?:[ \t]*,[ \t]*{_HEADER_NAME})*")
MAX_REQUESTED_HEADERS_LENGTH = 2048
_VARY_ORIGIN = {"Vary": "Origin"}


class CorsPolicy:
    """Which origins may call the gateway, and the headers that say so."""

    __slots__ = ("_any", "_exposed", "_origins")

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins)
        # The same headers for every answer when any origin may call: built once.
        self._exposed = {ALLOW_ORIGIN: "*", EXPOSE_HEADERS: EXPOSED}

    def answer_headers(self, origin: str | None, public: bool = False) -> Mapping[str, str] | None:
        """The CORS headers of an answer to a request from ``origin`` (its header), to a
        route that needs a token, or none (``public``).

        A request without ``Origin`` is no browser script's (browsers send it on every
        cross-origin request): with ``"*"`` its answer needs nothing, so SDK traffic pays
        nothing. ``"*"`` does not cover public routes: any web page a colleague opens
        could otherwise read an intranet gateway's health and weights without a token;
        only listed origins may. With a list, every answer says it varies by ``Origin``,
        for caches.
        """
        if self._any:
            return self._exposed if origin is not None and not public else None
        if origin is not None and origin in self._origins:
            return {ALLOW_ORIGIN: origin, EXPOSE_HEADERS: EXPOSED, "Vary": "Origin"}
        return _VARY_ORIGIN

    def preflight(self, request: web.Request, allowed_methods: Sequence[str]) -> web.Response:
        """The 204 answer to a preflight for a path that allows ``allowed_methods``.

        An origin not allowed gets the 204 without ``Access-Control-Allow-Origin``: the
        browser then refuses the page's request itself.
        """
        origin = request.headers.get("Origin")
        headers: dict[str, str] = dict(self.answer_headers(origin) or {})
        headers.pop(EXPOSE_HEADERS, None)  # meaningless on a preflight
        if ALLOW_ORIGIN in headers:
            methods = sorted({*allowed_methods, "OPTIONS"})
            headers["Access-Control-Allow-Methods"] = ", ".join(methods)
            headers["Access-Control-Allow-Headers"] = allowed_headers(
                request.headers.get("Access-Control-Request-Headers")
            )
            headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE)
            # The echoed header list depends on the request: caches must know.
            vary = "Origin, Access-Control-Request-Headers"
            headers["Vary"] = vary if not self._any else "Access-Control-Request-Headers"
        return web.Response(status=204, headers=headers)


# scheme://host[:port] as a browser's Origin header spells it: no path, no user info.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/\s:?#@\[\]]+)(?::(?P<port>[0-9]{1,5}))?",
    re.IGNORECASE,
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str | None:
    """``value`` as browsers send it in ``Origin`` (scheme and host in lower case, no
    default port), ``"*"`` as it is; None when it is not an origin."""
    if value == "*":
        return value
    match = _ORIGIN.fullmatch(value)
    if match is None:
        return None
    scheme, host = match["scheme"].lower(), match["host"].lower()
    port = int(match["port"] or _DEFAULT_PORTS[scheme])
    if port > 65535:
        return None
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


def allowed_headers(requested: str | None) -> str:
    """The always-allowed headers, plus those a page asked for when it asked sanely."""
    names = list(ALWAYS_ALLOWED_HEADERS)
    if requested and len(requested) <= MAX_REQUESTED_HEADERS_LENGTH:
        requested = requested.strip()
        if _HEADER_LIST.fullmatch(requested):
            known = {name.lower() for name in names}
            for listed in requested.split(","):
                name = listed.strip()
                if name.lower() not in known:
                    known.add(name.lower())
                    names.append(name)
    return ", ".join(names)


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def policy_for(origins: Sequence[str]) -> CorsPolicy | None:
    """The policy for ``server.cors_allow_origins``; None when CORS is off."""
    return CorsPolicy(origins) if origins else None
