"""The configuration's frozen, typed objects and its constants.

``config.py`` builds these from a file; everything else in berry-proxy reads them. They
never change while serving (runtime state lives in ``pool.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

STRATEGIES = (
    "weighted_random",
    "round_robin",
    "least_latency",
    "failover",
    "random",
    "weighted_failover",
    "smart_weighted_failover",
    "smart_ai",
)
PROVIDER_TYPES = ("openai", "azure", "mock")
# Provider types the original accepted but berry-proxy does not speak yet.
UNSUPPORTED_PROVIDER_TYPES = ("claude", "gemini", "anthropic")
BILLING_MODES = ("per_token", "per_request")
MIN_TOKEN_LENGTH = 16
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_TOTAL_TIMEOUT_SECONDS = 600.0
# A non-stream upstream answer larger than this (after decompression) is a protocol
# failure. Generous on purpose: 2048 float embeddings of 1536 dimensions are ~60 MB of JSON.
DEFAULT_MAX_RESPONSE_BYTES = 128 * 1024 * 1024
# Pending stream bytes without an event boundary; past this the attempt is a protocol
# failure (an upstream that never ends a line must not fill memory).
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
# High enough that ordinary load never queues: each slot is one upstream socket, and the
# systemd unit allows 65536 open files.
DEFAULT_MAX_CONNECTIONS = 4096


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` lists every problem with its path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    public_status: bool = True
    drain_timeout_seconds: float = 30.0
    # An idle keep-alive connection, and a connection whose request headers have not all
    # arrived, is closed after this long.
    keepalive_timeout_seconds: float = 15.0
    # The whole request body must arrive within this long after its headers.
    body_timeout_seconds: float = 60.0
    # A client that takes nothing of an answer the gateway writes for this long is
    # dropped (streams and proxied answers use their provider's idle_timeout_seconds).
    send_timeout_seconds: float = 60.0
    # Origins whose pages may call the gateway (CORS): "*" is any, () turns CORS off.
    cors_allow_origins: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class MockConfig:
    """Behaviour of the built-in fake LLM (provider type ``mock``)."""

    latency_seconds: float = 0.0
    chunk_count: int = 8
    chunk_delay_seconds: float = 0.0
    failure_rate: float = 0.0
    seed: int = 0
    embedding_dimensions: int = 8


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: str
    name: str
    type: str
    # Secrets and upstream addresses never appear in a repr (logs, tracebacks).
    base_url: str = field(repr=False)
    api_key: str = field(default="", repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)
    enabled: bool = True
    models: tuple[str, ...] = ()
    connect_timeout_seconds: float = 10.0
    first_byte_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 60.0
    # None means "not set": non-streaming requests then use DEFAULT_TOTAL_TIMEOUT_SECONDS
    # and streams are unbounded (long generations must not be cut).
    total_timeout_seconds: float | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # How long a request waits for a free connection slot (never longer than the connect
    # timeout) before it fails over or gets 503 upstream_saturated.
    pool_timeout_seconds: float = 1.0
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_retries: int | None = None
    api_version: str = "2024-10-21"
    mock: MockConfig = field(default_factory=MockConfig)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    provider: str
    model: str
    weight: float = 1.0
    priority: int = 0
    enabled: bool = True
    tags: tuple[str, ...] = ()
    billing_mode: str = "per_token"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    name: str
    strategy: str = "smart_ai"
    enabled: bool = True
    backends: tuple[BackendConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_minute: int | None = None
    requests_per_hour: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True, slots=True)
class UserConfig:
    id: str
    name: str
    # The sha256 digest of the token; the raw token is never kept.
    token_sha256: bytes = field(repr=False)
    enabled: bool = True
    # Model ids (config keys); empty means every model.
    allowed_models: tuple[str, ...] = ()
    admin: bool = False
    tags: tuple[str, ...] = ()
    rate_limit: RateLimitConfig | None = None

    def may_use(self, model_id: str) -> bool:
        return not self.allowed_models or model_id in self.allowed_models


@dataclass(frozen=True, slots=True)
class ConfidenceAdjustments:
    success_boost: float = 0.1
    network_error_penalty: float = 0.3
    auth_error_penalty: float = 0.8
    rate_limit_penalty: float = 0.1
    server_error_penalty: float = 0.2
    model_error_penalty: float = 0.3
    timeout_penalty: float = 0.2


@dataclass(frozen=True, slots=True)
class SmartAISettings:
    initial_confidence: float = 0.8
    min_confidence: float = 0.05
    exploration_ratio: float = 0.2
    enable_time_decay: bool = True
    non_premium_stability_bonus: float = 1.1
    confidence_adjustments: ConfidenceAdjustments = field(default_factory=ConfidenceAdjustments)


@dataclass(frozen=True, slots=True)
class Settings:
    health_check_interval_seconds: float = 30.0
    request_timeout_seconds: float = 600.0
    max_retries: int = 3
    max_internal_retries: int = 2
    circuit_breaker_failure_threshold: int = 5
    circuit_breaker_timeout_seconds: float = 60.0
    recovery_check_interval_seconds: float = 120.0
    health_check_timeout_seconds: float = 10.0
    smart_ai: SmartAISettings = field(default_factory=SmartAISettings)


@dataclass(frozen=True, slots=True)
class RateLimitStoreConfig:
    backend: str = "memory"
    # May carry a password.
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "berry:"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    providers: Mapping[str, ProviderConfig]
    models: Mapping[str, ModelConfig]
    users: Mapping[str, UserConfig]
    settings: Settings
    rate_limit_store: RateLimitStoreConfig
    # Public model name -> model, for request routing.
    models_by_name: Mapping[str, ModelConfig]
    # (key, why it has no effect here) for each of the original's keys the file sets that
    # this gateway accepts and ignores: logged once at start-up, shown by check-config.
    ignored: tuple[tuple[str, str], ...] = ()

    def find_model(self, name_or_id: str) -> ModelConfig | None:
        """The model a client means by ``name_or_id``: its public name, else its key."""
        return self.models_by_name.get(name_or_id) or self.models.get(name_or_id)
