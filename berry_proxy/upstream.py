"""Provider adapters: how one request reaches one provider.

Each adapter knows its provider's URL layout and credentials (``openai``: bearer key and
``{base_url}/{endpoint}``; ``azure``: ``api-key`` header and the deployment URL with
``api-version``; ``mock``: the in-process fake LLM of ``mock.py``) and answers with an
``UpstreamResponse`` that the proxy reads the same way whatever the provider is.

Transport exceptions are NOT mapped here; the proxy wraps each phase in
``errors.upstream_errors`` so that a departed client is never mistaken for a sick provider.

Two safety nets live here too: a non-stream answer is read up to a byte limit
(``UpstreamResponse.read``), and ``Redactor`` takes the provider's own credentials out of
anything it sends back before a client sees it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Mapping

import aiohttp
from multidict import CIMultiDictProxy

from .config import ProviderConfig
from .errors import FailureKind, UpstreamFailure, failure_for_status, parse_retry_after

# Request headers never forwarded upstream: hop-by-hop headers (RFC 9110 §7.6.1), the
# client's credentials (the provider's key replaces them), values aiohttp recomputes, and
# OpenAI account headers that belong to the client's key, not the provider's.
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "api-key",
        "cookie",
        "content-length",
        # aiohttp already decoded the client's body; the gateway sends JSON as it is.
        "content-encoding",
        "content-type",
        "accept-encoding",
        "expect",
        "x-request-id",
        "openai-organization",
        "openai-project",
        # Where the client is: none of a third-party provider's business.
        "forwarded",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "via",
        # Which page a browser app's request came from: the gateway answers CORS itself,
        # and a provider that checks Origin (Ollama refuses unknown ones with 403, which
        # would count against its breaker) must see a server-side client.
        "origin",
        "referer",
    }
)
# Every X-Forwarded-* header (For, Host, Proto, Port, Prefix...) stays behind as well, and
# so do a browser's fetch metadata, client hints and preflight questions.
DROPPED_REQUEST_PREFIXES = ("x-forwarded-", "sec-fetch-", "sec-ch-", "access-control-request-")

# Upstream response headers passed to the client: what describes the body, and OpenAI's
# own informational headers. Everything else (hop-by-hop, cookies, the provider account's
# rate limits and request ids, cloud region and routing details) stays behind.
PASSED_RESPONSE_HEADERS = frozenset(
    {
        "content-type",
        "openai-processing-ms",
        "openai-version",
    }
)


def _connection_listed(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers the sender declared hop-by-hop in ``Connection`` (RFC 9110 §7.6.1)."""
    listed = headers.get("Connection")
    if not listed:
        return frozenset()
    return frozenset(name.strip().lower() for name in listed.split(","))


def forwardable_request_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    listed = _connection_listed(client_headers)
    return {
        k: v
        for k, v in client_headers.items()
        if (lower := k.lower()) not in DROPPED_REQUEST_HEADERS
        and lower not in listed
        and not lower.startswith(DROPPED_REQUEST_PREFIXES)
    }


def passable_response_headers(upstream_headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream_headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}


class UpstreamResponse(abc.ABC):
    """An upstream answer whose headers have arrived; the body is read on demand."""

    status: int
    headers: Mapping[str, str]

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/json")

    def failure(self) -> UpstreamFailure | None:
        """The failure this answer's status means; None when it goes to the client (a
        success, or a 4xx that is the caller's fault)."""
        status = self.status
        if 300 <= status < 400:
            # Following or forwarding a redirect could leak the upstream URL.
            return UpstreamFailure(
                FailureKind.PROTOCOL,
                f"upstream answered with a redirect (HTTP {status})",
                status=status,
            )
        if status < 400:
            return None
        return failure_for_status(status, parse_retry_after(self.headers.get("Retry-After")))

    @abc.abstractmethod
    async def read(self, limit: int) -> bytes:
        """The whole body; a body larger than ``limit`` bytes is a PROTOCOL failure."""

    @abc.abstractmethod
    def read_chunk(self) -> Awaitable[bytes]:
        """The next bytes as they arrive; ``b""`` at the end of the body."""

    @abc.abstractmethod
    def release(self) -> None:
        """The body was read to its end: the connection may be reused."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop now: close the connection so the provider stops generating."""


class HttpUpstreamResponse(UpstreamResponse):
    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def read(self, limit: int) -> bytes:
        # aiohttp decompresses in bounded steps as it reads; the limit applies to what
        # comes out, so a small gzip answer cannot inflate into gigabytes here.
        content = self._response.content
        parts: list[bytes] = []
        size = 0
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise response_too_large(limit)
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_chunk(self) -> Awaitable[bytes]:
        # aiohttp's own coroutine, handed back: no extra frame per chunk of a stream.
        return self._response.content.readany()

    def release(self) -> None:
        self._response.release()

    def abort(self) -> None:
        self._response.close()


def response_too_large(limit: int) -> UpstreamFailure:
    return UpstreamFailure(
        FailureKind.TOO_LARGE, f"upstream answer is larger than the limit of {limit} bytes"
    )


# Provider header names whose values are secrets (besides ``api_key``) when they contain
# one of these words: ``Authorization``, ``X-Api-Key``, ``X-Auth-Token``...
_SECRET_HEADER_WORDS = ("auth", "key", "token", "secret")
# Shorter values are not redacted: they would match ordinary text.
MIN_REDACTED_LENGTH = 8
REDACTED = b"[REDACTED]"


class Redactor:
    """Replaces a provider's own secrets in bytes it sends back (an error body that echoes
    the key, a stream event quoting a header) before a client sees them."""

    __slots__ = ("_secrets",)

    def __init__(self, provider: ProviderConfig) -> None:
        values = [provider.api_key] + [
            v
            for k, v in provider.headers.items()
            if any(word in k.lower() for word in _SECRET_HEADER_WORDS)
        ]
        secrets = {v.encode() for v in values if len(v) >= MIN_REDACTED_LENGTH}
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __call__(self, data: bytes) -> bytes:
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, REDACTED)
        return data


# A health probe reads at most this much of the model list, then closes the connection.
PROBE_BODY_LIMIT = 64 * 1024


class Adapter(abc.ABC):
    """Sends requests to one provider."""

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        # None when the provider has no secret to redact: nothing to do per block.
        redactor = Redactor(provider)
        self.redact: Redactor | None = redactor if redactor else None

    @abc.abstractmethod
    async def send(
        self,
        endpoint: str,
        backend_model: str,
        body: bytes | bytearray,
        headers: dict[str, str],
        public_model: str | None = None,
    ) -> UpstreamResponse:
        """POST ``body`` to ``endpoint`` (e.g. ``chat/completions``); return at headers.

        ``public_model`` is the gateway's name of the model asked for: a real provider
        reports its own model name, the mock reports this one.
        """

    @abc.abstractmethod
    async def probe(self) -> int:
        """The HTTP status of the provider's free model list (``GET .../models``).

        Raises the transport's exception when the provider cannot be reached; the caller
        bounds the time.
        """


class HttpAdapter(Adapter):
    """Common ground of the HTTP providers: one shared session, per-provider timeouts."""

    def __init__(self, provider: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(provider)
        self._session = session
        # The total and read-gap limits are enforced by the proxy per phase (first byte,
        # idle gap, total); aiohttp's default total=300 s would cut long generations.
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=provider.connect_timeout_seconds,
            sock_connect=provider.connect_timeout_seconds,
        )
        self._auth_headers = self.credential_headers()
        self._auth_headers.update(provider.headers)

    @abc.abstractmethod
    def credential_headers(self) -> dict[str, str]:
        """Headers carrying the provider's key."""

    @abc.abstractmethod
    def url(self, endpoint: str, backend_model: str) -> str:
        """Where ``endpoint`` lives for ``backend_model``."""

    async def send(
        self,
        endpoint: str,
        backend_model: str,
        body: bytes | bytearray,
        headers: dict[str, str],
        public_model: str | None = None,
    ) -> UpstreamResponse:
        headers.update(self._auth_headers)
        response = await self._session.post(
            self.url(endpoint, backend_model),
            data=body,
            headers=headers,
            timeout=self._timeout,
            allow_redirects=False,
        )
        return HttpUpstreamResponse(response)

    @abc.abstractmethod
    def models_url(self) -> str:
        """The provider's model list: a free call, used as the health probe."""

    async def probe(self) -> int:
        async with self._session.get(
            self.models_url(),
            headers=self._auth_headers,
            timeout=self._timeout,
            allow_redirects=False,
        ) as response:
            # Only the status matters. Reading the list to its end lets the connection
            # be reused; a list that does not end soon is not read (closed on exit).
            content = response.content
            read = 0
            while read <= PROBE_BODY_LIMIT and (chunk := await content.readany()):
                read += len(chunk)
            if read > PROBE_BODY_LIMIT:
                response.close()
            return response.status


class OpenAIAdapter(HttpAdapter):
    """Any OpenAI-compatible server: OpenAI, vLLM, Ollama, LM Studio, SGLang..."""

    def __init__(self, provider: ProviderConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(provider, session)
        self._urls: dict[str, str] = {}

    def credential_headers(self) -> dict[str, str]:
        key = self.provider.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def url(self, endpoint: str, backend_model: str) -> str:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = f"{self.provider.base_url}/{endpoint}"
        return url

    def models_url(self) -> str:
        return f"{self.provider.base_url}/models"


class AzureAdapter(HttpAdapter):
    """Azure OpenAI: the backend model is the deployment name."""

    def credential_headers(self) -> dict[str, str]:
        key = self.provider.api_key
        return {"api-key": key} if key else {}

    def _base(self) -> str:
        base = self.provider.base_url
        return base if base.endswith("/openai") else base + "/openai"

    def url(self, endpoint: str, backend_model: str) -> str:
        return (
            f"{self._base()}/deployments/{backend_model}/{endpoint}"
            f"?api-version={self.provider.api_version}"
        )

    def models_url(self) -> str:
        return f"{self._base()}/models?api-version={self.provider.api_version}"
