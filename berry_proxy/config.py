"""Configuration: YAML or Berry-style TOML in, frozen typed objects out.

Loading goes in three passes, each collecting every problem it finds so that
``check-config`` can list them all at once:

1. parse the file (YAML by default, TOML for ``.toml``) and expand ``${VAR}`` /
   ``${VAR:-default}`` in every string value;
2. validate the shape of each section with strict marshmallow schemas (unknown keys,
   wrong types and out-of-range numbers are errors);
3. check references between sections (backends -> providers, users -> models).

Every error names its exact path, e.g. ``models.gpt-4.backends[1].provider: unknown
provider 'azure-eu'``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load, validate

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

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` lists every problem with its path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --------------------------------------------------------------------------------------
# Frozen runtime objects
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 3000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    public_status: bool = True
    drain_timeout_seconds: float = 30.0


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
    base_url: str
    api_key: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    enabled: bool = True
    models: tuple[str, ...] = ()
    connect_timeout_seconds: float = 10.0
    first_byte_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 60.0
    # None means "not set": non-streaming requests then use DEFAULT_TOTAL_TIMEOUT_SECONDS
    # and streams are unbounded (long generations must not be cut).
    total_timeout_seconds: float | None = None
    max_connections: int = 100
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
    token_sha256: bytes
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
    redis_url: str = "redis://127.0.0.1:6379/0"
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

    def find_model(self, name_or_id: str) -> ModelConfig | None:
        """The model a client means by ``name_or_id``: its public name, else its key."""
        return self.models_by_name.get(name_or_id) or self.models.get(name_or_id)


# --------------------------------------------------------------------------------------
# Strict marshmallow fields and schemas
# --------------------------------------------------------------------------------------


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

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> ServerConfig:
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


def _rename_alias(data: dict[str, Any], alias: str, canonical: str) -> None:
    """Accept the original's key name ``alias`` for ``canonical`` (not both at once)."""
    if alias in data:
        if canonical in data:
            raise ValidationError(f"give either '{alias}' or '{canonical}', not both", alias)
        data[canonical] = data.pop(alias)


def _validate_provider_type(value: str) -> None:
    if value in UNSUPPORTED_PROVIDER_TYPES:
        raise ValidationError(f"provider type '{value}' is not supported yet")
    if value not in PROVIDER_TYPES:
        raise ValidationError(f"must be one of {', '.join(PROVIDER_TYPES)}, got '{value}'")


class ProviderSchema(_Strict):
    name = fields.String()
    type = fields.String(load_default="openai", validate=_validate_provider_type)
    base_url = fields.String()
    api_key = fields.String()
    headers = fields.Dict(keys=fields.String(), values=fields.String())
    enabled = StrictBoolean()
    models = _string_list()
    connect_timeout_seconds = _positive()
    first_byte_timeout_seconds = _positive()
    idle_timeout_seconds = _positive()
    total_timeout_seconds = _positive(allow_none=True)
    max_connections = StrictInteger(validate=validate.Range(min=1))
    max_retries = StrictInteger(validate=validate.Range(min=1))
    api_version = fields.String(validate=validate.Length(min=1))
    mock = fields.Nested(MockSchema)

    @pre_load
    def aliases(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            _rename_alias(data, "backend_type", "type")
            _rename_alias(data, "timeout_seconds", "connect_timeout_seconds")
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
    min_confidence = _fraction()
    exploration_ratio = _fraction()
    enable_time_decay = StrictBoolean()
    non_premium_stability_bonus = StrictFloat(validate=validate.Range(min=0))
    confidence_adjustments = fields.Nested(ConfidenceAdjustmentsSchema)

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> SmartAISettings:
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

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Settings:
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


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _flatten(messages: Any, path: str) -> Iterator[str]:
    """Turn marshmallow's nested error dict into ``path: message`` lines."""
    if isinstance(messages, dict):
        for key, sub in messages.items():
            if isinstance(key, int):
                sub_path = f"{path}[{key}]"
            elif key == "_schema":
                sub_path = path
            else:
                sub_path = f"{path}.{key}" if path else str(key)
            yield from _flatten(sub, sub_path)
    elif isinstance(messages, list):
        for message in messages:
            yield from _flatten(message, path)
    else:
        yield f"{path or '<root>'}: {messages}"


def _load_section(
    schema: Schema, raw: Any, path: str, errors: list[str], partial: bool = False
) -> Any:
    try:
        return schema.load(raw)
    except ValidationError as exc:
        errors.extend(_flatten(exc.messages, path))
        # ``partial``: keep what did validate, so that later passes still check it.
        return exc.valid_data if partial else None


def expand_env(value: Any, path: str, errors: list[str], env: Mapping[str, str]) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string inside ``value``."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            # Shell semantics: ``:-`` also replaces a variable that is set but empty.
            if env.get(name):
                return env[name]
            if default is not None:
                return default
            if name in env:
                return ""
            errors.append(f"{path or '<root>'}: environment variable '{name}' is not set")
            return ""

        return _ENV_PATTERN.sub(substitute, value) if "${" in value else value
    if isinstance(value, dict):
        return {
            k: expand_env(v, f"{path}.{k}" if path else str(k), errors, env)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]", errors, env) for i, v in enumerate(value)]
    return value


def normalize_base_url(base_url: str) -> str:
    """Apply the OpenAI SDK convention: a URL without a path means ``<url>/v1``."""
    url = base_url.rstrip("/")
    scheme_sep = url.find("://")
    rest = url[scheme_sep + 3 :] if scheme_sep >= 0 else url
    if "/" not in rest:
        url += "/v1"
    return url


def _build_provider(pid: str, data: dict[str, Any], path: str, errors: list[str]) -> Any:
    ptype = data.get("type", "openai")
    if ptype in UNSUPPORTED_PROVIDER_TYPES:
        errors.append(f"{path}.type: provider type '{ptype}' is not supported yet")
        return None
    if ptype not in PROVIDER_TYPES:
        errors.append(f"{path}.type: must be one of {', '.join(PROVIDER_TYPES)}, got '{ptype}'")
        return None
    base_url = data.get("base_url", "")
    if ptype != "mock":
        if not base_url:
            errors.append(f"{path}.base_url: required for provider type '{ptype}'")
            return None
        if not re.match(r"^https?://[^/\s]+", base_url):
            errors.append(f"{path}.base_url: must be an http:// or https:// URL")
            return None
        base_url = normalize_base_url(base_url) if ptype == "openai" else base_url.rstrip("/")
    data = dict(data, type=ptype, base_url=base_url)
    data.setdefault("name", pid)
    data["models"] = tuple(data.get("models", ()))
    data["headers"] = MappingProxyType(dict(data.get("headers", {})))
    return ProviderConfig(id=pid, **data)


def _entries(raw: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield str(key), value


def build_config(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    """Validate an already-parsed document and build the frozen config, or raise."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the configuration must be a mapping of sections"])
    raw = expand_env(raw, "", errors, os.environ if env is None else env)
    top = _load_section(ConfigSchema(), raw, "", errors, partial=True) or {}

    providers: dict[str, ProviderConfig] = {}
    for pid, entry in _entries(top.get("providers")):
        path = f"providers.{pid}"
        first_error = len(errors)
        loaded = _load_section(ProviderSchema(), entry, path, errors)
        for alias, canonical in (
            ("backend_type", "type"),
            ("timeout_seconds", "connect_timeout_seconds"),
        ):
            if isinstance(entry, dict) and alias in entry and canonical not in entry:
                errors[first_error:] = [
                    e.replace(f"{path}.{canonical}:", f"{path}.{alias}:", 1)
                    for e in errors[first_error:]
                ]
        if loaded is not None and (provider := _build_provider(pid, loaded, path, errors)):
            providers[pid] = provider

    # None when the providers section itself is invalid (already reported): no cascade.
    raw_providers = top.get("providers")
    models: dict[str, ModelConfig] = {}
    for mid, entry in _entries(top.get("models")):
        path = f"models.{mid}"
        loaded = _load_section(ModelSchema(), entry, path, errors)
        raw_backends = entry.get("backends") if isinstance(entry, dict) else None
        # References are checked on the raw backends too, so a schema error in one
        # backend does not hide an unknown provider in another (all errors at once).
        for i, raw_backend in enumerate(raw_backends if isinstance(raw_backends, list) else []):
            ref = raw_backend.get("provider") if isinstance(raw_backend, dict) else None
            if isinstance(ref, str) and raw_providers is not None and ref not in raw_providers:
                errors.append(f"{path}.backends[{i}].provider: unknown provider '{ref}'")
        if loaded is None:
            continue
        backends = tuple(loaded.pop("backends"))
        if not backends:
            errors.append(f"{path}.backends: a model needs at least one backend")
        for i, backend in enumerate(backends):
            provider = providers.get(backend.provider)
            if provider and provider.models and backend.model not in provider.models:
                errors.append(
                    f"{path}.backends[{i}].model: provider '{backend.provider}' does not list "
                    f"model '{backend.model}' in its models"
                )
        loaded.setdefault("name", mid)
        models[mid] = ModelConfig(id=mid, backends=backends, **loaded)

    models_by_name: dict[str, ModelConfig] = {}
    for model in models.values():
        if model.name in models_by_name:
            other = models_by_name[model.name].id
            errors.append(
                f"models.{model.id}.name: public name '{model.name}' is also used by models.{other}"
            )
        models_by_name[model.name] = model

    # Every model id and name in the file, valid or not (None: the section is invalid).
    defined = None
    if top.get("models") is not None:
        defined = {mid for mid, _ in _entries(top["models"])} | {
            e["name"] for _, e in _entries(top["models"]) if isinstance(e, dict) and "name" in e
        }
    users = _build_users(top.get("users"), models, models_by_name, defined, errors)

    if errors:
        raise ConfigError(errors)
    return Config(
        server=top.get("server") or ServerConfig(),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        users=MappingProxyType(users),
        settings=top.get("settings") or Settings(),
        rate_limit_store=top.get("rate_limit_store") or RateLimitStoreConfig(),
        models_by_name=MappingProxyType(models_by_name),
    )


def _build_users(
    raw_users: Any,
    models: Mapping[str, ModelConfig],
    models_by_name: Mapping[str, ModelConfig],
    defined_models: set[Any] | None,
    errors: list[str],
) -> dict[str, UserConfig]:
    users: dict[str, UserConfig] = {}
    seen_digests: dict[bytes, str] = {}
    for uid, entry in _entries(raw_users):
        path = f"users.{uid}"
        loaded = _load_section(UserSchema(), entry, path, errors)
        if loaded is None:
            continue
        token, token_hash = loaded.pop("token", None), loaded.pop("token_sha256", None)
        if (token is None) == (token_hash is None):
            errors.append(f"{path}: give exactly one of 'token' or 'token_sha256'")
            continue
        digest = bytes.fromhex(hash_token(token) if token is not None else token_hash)
        if digest in seen_digests:
            errors.append(f"{path}.token: same token as users.{seen_digests[digest]}")
        seen_digests[digest] = uid

        allowed: list[str] = []
        for i, ref in enumerate(loaded.pop("allowed_models", [])):
            model = models.get(ref) or models_by_name.get(ref)
            if model is None:
                # A model that is in the file but invalid has its own errors already.
                if defined_models is not None and ref not in defined_models:
                    errors.append(f"{path}.allowed_models[{i}]: unknown model '{ref}'")
            elif model.id not in allowed:
                allowed.append(model.id)
        # The original's definition: a user who may use every model is an admin, unless
        # the config says otherwise explicitly.
        admin = loaded.pop("admin", not allowed)
        users[uid] = UserConfig(
            id=uid,
            name=loaded.pop("name", uid),
            token_sha256=digest,
            allowed_models=tuple(allowed),
            admin=admin,
            tags=tuple(loaded.pop("tags", ())),
            **loaded,
        )
    return users


def hash_token(token: str) -> str:
    """The hex sha256 of a token, as written in ``token_sha256``."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_file(path: Path) -> Any:
    """Read YAML (default) or TOML (``.toml``), raising ConfigError on syntax errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([f"{path}: syntax error: {exc}"]) from exc


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load, expand, validate and freeze the configuration at ``path``."""
    return build_config(parse_file(Path(path)), env)


def config_path_from_env(cli_value: str | None) -> str:
    return cli_value or os.environ.get("BERRY_CONFIG") or "config/berry.yaml"


__all__ = [
    "STRATEGIES",
    "BackendConfig",
    "Config",
    "ConfigError",
    "MockConfig",
    "ModelConfig",
    "ProviderConfig",
    "RateLimitConfig",
    "ServerConfig",
    "Settings",
    "SmartAISettings",
    "UserConfig",
    "build_config",
    "hash_token",
    "load_config",
]
