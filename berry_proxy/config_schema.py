"""Strict marshmallow schemas for every configuration section.

Strict means: unknown keys are errors (``RAISE``), and numbers, booleans and strings are
never coerced from one another ("yes" is not a boolean, "3" is not a number). Schemas of
leaf sections build the frozen objects of ``config_model`` directly.
"""

from __future__ import annotations

import re
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load, validate

from .config_model import (
    BILLING_MODES,
    MIN_TOKEN_LENGTH,
    PROVIDER_TYPES,
    STRATEGIES,
    UNSUPPORTED_PROVIDER_TYPES,
    BackendConfig,
    ConfidenceAdjustments,
    MockConfig,
    RateLimitConfig,
    RateLimitStoreConfig,
    ServerConfig,
    Settings,
    SmartAISettings,
)
from .cors import normalize_origin

_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _origin(value: str) -> None:
    if normalize_origin(value) is None:
        raise ValidationError(
            f"{value!r} is not an origin: use '*' or scheme://host[:port] without a path"
        )


class StrictFloat(fields.Float):
    """A number, never a string or a boolean (marshmallow would coerce both)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        return float(value)


class StrictInteger(fields.Integer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """Only true/false: ``"no"`` or ``0`` in a config file is a mistake, not a boolean."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def _positive(**kwargs: Any) -> StrictFloat:
    return StrictFloat(validate=validate.Range(min=0, min_inclusive=False), **kwargs)


def _interval(**kwargs: Any) -> StrictFloat:
    return StrictFloat(validate=validate.Range(min=1), **kwargs)


def _fraction(**kwargs: Any) -> StrictFloat:
    return StrictFloat(validate=validate.Range(min=0, max=1), **kwargs)


def _string_list() -> fields.List[str]:
    return fields.List(fields.String())


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class ServerSchema(_Strict):
    host = fields.String()
    port = StrictInteger(validate=validate.Range(min=0, max=65535))
    max_body_bytes = StrictInteger(validate=validate.Range(min=1024))
    public_status = StrictBoolean()
    drain_timeout_seconds = StrictFloat(validate=validate.Range(min=0))
    keepalive_timeout_seconds = _positive()
    body_timeout_seconds = _positive()
    send_timeout_seconds = _positive()
    cors_allow_origins = fields.List(fields.String(validate=_origin))

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> ServerConfig:
        if "cors_allow_origins" in data:
            # As browsers spell them, so that listed origins compare equal to Origin.
            origins = (normalize_origin(o) for o in data["cors_allow_origins"])
            data["cors_allow_origins"] = tuple(o for o in origins if o is not None)
        return ServerConfig(**data)


class MockSchema(_Strict):
    latency_seconds = StrictFloat(validate=validate.Range(min=0))
    chunk_count = StrictInteger(validate=validate.Range(min=1, max=10000))
    chunk_delay_seconds = StrictFloat(validate=validate.Range(min=0))
    failure_rate = _fraction()
    seed = StrictInteger()
    embedding_dimensions = StrictInteger(validate=validate.Range(min=1, max=8192))

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> MockConfig:
        return MockConfig(**data)


# The original's key names, accepted for ours. Each alias is a field of its own, so an
# error names the key as the file wrote it; post_load then moves the value across.
_PROVIDER_ALIASES = (("backend_type", "type"), ("timeout_seconds", "connect_timeout_seconds"))


def _validate_provider_type(value: str) -> None:
    if value in UNSUPPORTED_PROVIDER_TYPES:
        raise ValidationError(f"provider type '{value}' is not supported yet")
    if value not in PROVIDER_TYPES:
        raise ValidationError(f"must be one of {', '.join(PROVIDER_TYPES)}, got '{value}'")


class ProviderSchema(_Strict):
    name = fields.String()
    type = fields.String(load_default="openai", validate=_validate_provider_type)
    backend_type = fields.String(validate=_validate_provider_type)
    base_url = fields.String()
    api_key = fields.String()
    headers = fields.Dict(keys=fields.String(), values=fields.String())
    enabled = StrictBoolean()
    models = _string_list()
    connect_timeout_seconds = _positive()
    timeout_seconds = _positive()
    first_byte_timeout_seconds = _positive()
    idle_timeout_seconds = _positive()
    total_timeout_seconds = _positive(allow_none=True)
    max_connections = StrictInteger(validate=validate.Range(min=1))
    pool_timeout_seconds = _positive()
    max_response_bytes = StrictInteger(validate=validate.Range(min=1024))
    max_event_bytes = StrictInteger(validate=validate.Range(min=1024))
    # 0 is the original's "no retries on this provider": one attempt (config._build_provider).
    max_retries = StrictInteger(validate=validate.Range(min=0))
    api_version = fields.String(validate=validate.Length(min=1))
    mock = fields.Nested(MockSchema)

    @pre_load
    def one_name_per_key(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            for alias, canonical in _PROVIDER_ALIASES:
                if alias in data and canonical in data:
                    raise ValidationError(
                        f"give either '{alias}' or '{canonical}', not both", alias
                    )
        return data

    @post_load
    def merge_aliases(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        for alias, canonical in _PROVIDER_ALIASES:
            if alias in data:
                data[canonical] = data.pop(alias)
        return data


class BackendSchema(_Strict):
    provider = fields.String(required=True)
    model = fields.String(required=True, validate=validate.Length(min=1))
    weight = _positive()
    priority = StrictInteger(validate=validate.Range(min=0))
    enabled = StrictBoolean()
    tags = _string_list()
    billing_mode = fields.String(validate=validate.OneOf(BILLING_MODES))

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> BackendConfig:
        if "tags" in data:
            data["tags"] = tuple(data["tags"])
        return BackendConfig(**data)


class ModelSchema(_Strict):
    name = fields.String(validate=validate.Length(min=1))
    strategy = fields.String(validate=validate.OneOf(STRATEGIES))
    enabled = StrictBoolean()
    backends = fields.List(fields.Nested(BackendSchema), required=True)


class RateLimitSchema(_Strict):
    requests_per_minute = StrictInteger(validate=validate.Range(min=1))
    requests_per_hour = StrictInteger(validate=validate.Range(min=1))
    requests_per_day = StrictInteger(validate=validate.Range(min=1))
    tokens_per_minute = StrictInteger(validate=validate.Range(min=1))
    max_concurrent = StrictInteger(validate=validate.Range(min=1))

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> RateLimitConfig:
        return RateLimitConfig(**data)


def _validate_token(token: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValidationError(f"must be at least {MIN_TOKEN_LENGTH} characters")
    if any(ch.isspace() for ch in token):
        raise ValidationError("must not contain whitespace")


def _validate_sha256(value: str) -> None:
    if not _HEX64.match(value):
        raise ValidationError("must be 64 hexadecimal characters (berry-proxy hash-token)")


class UserSchema(_Strict):
    name = fields.String()
    token = fields.String(validate=_validate_token)
    token_sha256 = fields.String(validate=_validate_sha256)
    enabled = StrictBoolean()
    allowed_models = _string_list()
    admin = StrictBoolean()
    tags = _string_list()
    rate_limit = fields.Nested(RateLimitSchema)


class ConfidenceAdjustmentsSchema(_Strict):
    success_boost = _fraction()
    network_error_penalty = _fraction()
    auth_error_penalty = _fraction()
    rate_limit_penalty = _fraction()
    server_error_penalty = _fraction()
    model_error_penalty = _fraction()
    timeout_penalty = _fraction()

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> ConfidenceAdjustments:
        return ConfidenceAdjustments(**data)


class SmartAISchema(_Strict):
    initial_confidence = _fraction()
    # Both > 0: a weight of exactly 0 could never be drawn again, so never win back traffic.
    min_confidence = StrictFloat(validate=validate.Range(min=0, max=1, min_inclusive=False))
    exploration_ratio = _fraction()
    enable_time_decay = StrictBoolean()
    non_premium_stability_bonus = StrictFloat(validate=validate.Range(min=0, min_inclusive=False))
    confidence_adjustments = fields.Nested(ConfidenceAdjustmentsSchema)
    # The original's key, accepted and ignored (config.IGNORED_KEYS says why); any
    # duration the original took (0 included).
    lightweight_check_interval_seconds = StrictFloat(validate=validate.Range(min=0))

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> SmartAISettings:
        data.pop("lightweight_check_interval_seconds", None)
        return SmartAISettings(**data)


class SettingsSchema(_Strict):
    health_check_interval_seconds = _interval()
    request_timeout_seconds = _positive()
    max_retries = StrictInteger(validate=validate.Range(min=1, max=100))
    max_internal_retries = StrictInteger(validate=validate.Range(min=0, max=100))
    circuit_breaker_failure_threshold = StrictInteger(validate=validate.Range(min=1))
    circuit_breaker_timeout_seconds = _interval()
    recovery_check_interval_seconds = _interval()
    health_check_timeout_seconds = _positive()
    smart_ai = fields.Nested(SmartAISchema)
    # The original's section, accepted whatever it holds and ignored (config.IGNORED_KEYS).
    batch_metrics = fields.Dict()
    database = fields.Dict()  # likewise: some versions of the original had one

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Settings:
        data.pop("batch_metrics", None)
        data.pop("database", None)
        return Settings(**data)


class RateLimitStoreSchema(_Strict):
    backend = fields.String(validate=validate.OneOf(("memory", "redis")))
    redis_url = fields.String(validate=validate.Regexp(r"^(redis|rediss|unix)://"))
    key_prefix = fields.String()

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> RateLimitStoreConfig:
        return RateLimitStoreConfig(**data)


class _SectionMap(fields.Field):  # type: ignore[type-arg]  # holds raw mappings for pass 2
    """A mapping of id -> raw table; each entry is validated on its own to keep paths exact."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise ValidationError("must be a mapping of id to settings")
        return value


class ConfigSchema(_Strict):
    server = fields.Nested(ServerSchema)
    providers = _SectionMap(required=True)
    models = _SectionMap(required=True)
    users = _SectionMap(required=True)
    settings = fields.Nested(SettingsSchema)
    rate_limit_store = fields.Nested(RateLimitStoreSchema)
