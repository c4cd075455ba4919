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
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from marshmallow import Schema, ValidationError

from .config_model import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TOTAL_TIMEOUT_SECONDS,
    PROVIDER_TYPES,
    STRATEGIES,
    UNSUPPORTED_PROVIDER_TYPES,
    BackendConfig,
    ConfidenceAdjustments,
    Config,
    ConfigError,
    MockConfig,
    ModelConfig,
    ProviderConfig,
    RateLimitConfig,
    RateLimitStoreConfig,
    ServerConfig,
    Settings,
    SmartAISettings,
    UserConfig,
)
from .config_schema import ConfigSchema, ModelSchema, ProviderSchema, UserSchema

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    if data.get("max_retries") == 0:
        # The original counted retries: 0 meant one attempt and no retry. Here the key
        # caps attempts against the provider, and a cap of 0 would leave it unused.
        data["max_retries"] = 1
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
        loaded = _load_section(ProviderSchema(), entry, path, errors)
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
        ignored=ignored_keys(raw),
    )


# The original Berry's keys that load unchanged but have no effect here, and why.
IGNORED_KEYS: dict[tuple[str, ...], str] = {
    ("settings", "smart_ai", "lightweight_check_interval_seconds"): (
        "providers are probed on one schedule each (health_check_interval_seconds, and "
        "recovery_check_interval_seconds while a breaker is open); there is no lighter check"
    ),
    ("settings", "batch_metrics"): (
        "metrics are counted per request in memory and read at /metrics and /prometheus; "
        "nothing is batched or flushed"
    ),
    ("settings", "database"): (
        "there is no database: runtime state lives in memory, and rate limits shared by "
        "several instances in Redis (rate_limit_store)"
    ),
}


def ignored_keys(raw: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """(dotted key, why) for each ``IGNORED_KEYS`` entry present in the raw document."""
    found = []
    for path, why in IGNORED_KEYS.items():
        node: Any = raw
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            found.append((".".join(path), why))
    return tuple(found)


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
        raise ConfigError([f"{path}: syntax error: {syntax_error_text(exc)}"]) from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # PyYAML building a value it parsed: a date such as 2024-13-45, nesting too deep.
        # The message may quote the value (a secret, perhaps): only its kind is told.
        raise ConfigError(
            [f"{path}: a value cannot be read ({type(exc).__name__}; e.g. an invalid date)"]
        ) from None


def syntax_error_text(exc: yaml.YAMLError | tomllib.TOMLDecodeError) -> str:
    """What is wrong and where, never the offending text: PyYAML quotes the line it
    stopped at, which may be an ``api_key`` or a ``token`` (and reload errors are logged
    and answered over HTTP). TOML's messages name only a line and column."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc) if isinstance(exc, tomllib.TOMLDecodeError) else type(exc).__name__
    what = "; ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
    # Some problems quote the text they met (an alias, a tag, an anchor name): not that.
    what = re.sub(r"'[^']*'", "'…'", what)
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return what
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})"


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Load, expand, validate and freeze the configuration at ``path``."""
    return build_config(parse_file(Path(path)), env)


def config_path_from_env(cli_value: str | None, env: Mapping[str, str] | None = None) -> str:
    """``--config``, else ``$BERRY_CONFIG``, else the original's ``$CONFIG_PATH``, else
    ``config/berry.yaml``."""
    env = os.environ if env is None else env
    return cli_value or env.get("BERRY_CONFIG") or env.get("CONFIG_PATH") or "config/berry.yaml"


def bind_address_from_env(env: Mapping[str, str] | None = None) -> tuple[str | None, int | None]:
    """The original's ``$BIND_ADDRESS`` (``host:port``, ``[v6]:port`` or ``:port``) as
    (host, port), each None when not given; ConfigError when it is not such an address."""
    value = (os.environ if env is None else env).get("BIND_ADDRESS", "").strip()
    if not value:
        return None, None
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]") and host.count("[") == 1:
        host = host[1:-1]  # an IPv6 address, in the brackets it needs before a port
        bracketed = True
    else:
        bracketed = False
    if (
        not sep
        or not port_text.isdigit()
        or any(c.isspace() or c in "[]" for c in host)
        or (":" in host and not bracketed)  # an IPv6 address without brackets is ambiguous
        or (bracketed and not host)
    ):
        raise ConfigError(
            [f"BIND_ADDRESS: '{value}' is not host:port (e.g. 0.0.0.0:3000 or [::1]:3000)"]
        )
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError([f"BIND_ADDRESS: port {port} is not between 1 and 65535"])
    return host or None, port


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_TOTAL_TIMEOUT_SECONDS",
    "STRATEGIES",
    "BackendConfig",
    "ConfidenceAdjustments",
    "Config",
    "ConfigError",
    "MockConfig",
    "ModelConfig",
    "ProviderConfig",
    "RateLimitConfig",
    "RateLimitStoreConfig",
    "ServerConfig",
    "Settings",
    "SmartAISettings",
    "UserConfig",
    "bind_address_from_env",
    "build_config",
    "config_path_from_env",
    "expand_env",
    "hash_token",
    "load_config",
    "normalize_base_url",
    "parse_file",
]
