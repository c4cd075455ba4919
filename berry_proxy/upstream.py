"""Provider adapters: how one request reaches one provider.

Each adapter knows its provider's URL layout and credentials (``openai``: bearer key and
``{base_url}/{endpoint}``; ``azure``: ``api-key`` header and the deployment URL with
``api-version``; ``mock``: the in-process fake LLM of ``mock.py``) and answers with an
``UpstreamResponse`` that the proxy reads the same way whatever the provider is.

Transport exceptions are NOT mapped here; the proxy wraps each phase in
``errors.upstream_errors`` so that a departed client is never mistaken for a sick provider.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDictProxy

from .config import ProviderConfig

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
    }
)

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
        if (lower := k.lower()) not in DROPPED_REQUEST_HEADERS and lower not in listed
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

    @abc.abstractmethod
    async def read(self) -> bytes:
        """The whole body."""

    @abc.abstractmethod
    async def read_chunk(self) -> bytes:
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

    async def read(self) -> bytes:
        return await self._response.read()

    async def read_chunk(self) -> bytes:
        return await self._response.content.readany()

    def release(self) -> None:
        self._response.release()

    def abort(self) -> None:
        self._response.close()


class Adapter(abc.ABC):
    """Sends requests to one provider."""

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider

    @abc.abstractmethod
    async def send(
        self,
        endpoint: str,
        backend_model: str,
        body: bytes,
        headers: dict[str, str],
    ) -> UpstreamResponse:
        """POST ``body`` to ``endpoint`` (e.g. ``chat/completions``); return at headers."""

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
        body: bytes,
        headers: dict[str, str],
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
            await response.read()
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
