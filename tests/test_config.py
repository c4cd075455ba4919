"""Tests of configuration loading: YAML and the original Berry TOML in, frozen objects out.

Every test passes its environment explicitly (``env=``) so that nothing depends on, or
changes, the environment of the test process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from berry_proxy.cli import main
from berry_proxy.config import (
    STRATEGIES,
    Config,
    ConfigError,
    build_config,
    hash_token,
    load_config,
    normalize_base_url,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN_A = "alice-token-0123456789"
TOKEN_B = "bob-token-0123456789ab"
SHA_OF_NOTHING = hashlib.sha256(b"not a token anybody uses").hexdigest()


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def minimal() -> dict[str, Any]:
    """The smallest valid configuration: one provider, one model, one user."""
    return {
        "providers": {"p": {"base_url": "http://127.0.0.1:8000/v1"}},
        "models": {"m": {"backends": [{"provider": "p", "model": "x"}]}},
        "users": {"u": {"token": TOKEN_A}},
    }


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def with_value(path: str, value: Any, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """``raw`` (default: ``minimal()``) with ``value`` set at a dotted ``path``."""
    raw = minimal() if raw is None else raw
    parts: list[str | int] = [
        int(index) if index else key for key, index in _PATH_PART.findall(path)
    ]
    node: Any = raw
    for part in parts[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def build(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    return build_config(raw, env={} if env is None else env)


def errors_of(raw: Any, env: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        build(raw, env)
    return excinfo.value.errors


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# A good YAML file
# --------------------------------------------------------------------------------------

GOOD_YAML = """
server:
  host: 10.0.0.5
  port: 8080
  max_body_bytes: 1048576
  public_status: false
  drain_timeout_seconds: 5
providers:
  openai:
    name: OpenAI
    type: openai
    base_url: https://api.openai.com/v1
    api_key: ${OPENAI_API_KEY}
    headers: {OpenAI-Organization: org-123}
    models: [gpt-4o, gpt-4o-mini]
    connect_timeout_seconds: 3
    first_byte_timeout_seconds: 20
    idle_timeout_seconds: 15
    total_timeout_seconds: 300
    max_connections: 50
    max_retries: 2
  azure:
    type: azure
    base_url: https://res.openai.azure.com/
    api_key: ${AZURE_KEY}
    api_version: "2024-06-01"
  fake:
    type: mock
    mock: {latency_seconds: 0.01, chunk_count: 3, failure_rate: 0.5, seed: 7}
models:
  gpt-4o:
    strategy: failover
    backends:
      - {provider: openai, model: gpt-4o, priority: 0, tags: [premium]}
      - {provider: azure, model: gpt4o-deployment, priority: 1, billing_mode: per_request}
  small:
    name: gpt-4o-mini
    strategy: weighted_random
    enabled: false
    backends:
      - {provider: openai, model: gpt-4o-mini, weight: 2.5}
      - {provider: fake, model: fake-mini, weight: 0.5, enabled: false}
users:
  root:
    name: Root
    token_sha256: <SHA>
  app:
    token: <TOKEN>
    allowed_models: [gpt-4o, gpt-4o-mini]
    enabled: false
    tags: [premium]
    rate_limit: {requests_per_minute: 60, tokens_per_minute: 10000, max_concurrent: 4}
settings:
  max_retries: 5
  smart_ai:
    exploration_ratio: 0.1
rate_limit_store:
  backend: redis
  redis_url: rediss://cache:6380/1
  key_prefix: "gw:"
""".replace("<SHA>", SHA_OF_NOTHING).replace("<TOKEN>", TOKEN_A)

GOOD_ENV = {"OPENAI_API_KEY": "sk-openai", "AZURE_KEY": "az-key"}


@pytest.fixture
def good(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, "berry.yaml", GOOD_YAML), env=GOOD_ENV)


def test_good_yaml_server(good: Config) -> None:
    assert good.server.host == "10.0.0.5"
    assert good.server.port == 8080
    assert good.server.max_body_bytes == 1048576
    assert good.server.public_status is False
    assert good.server.drain_timeout_seconds == 5.0


def test_good_yaml_providers(good: Config) -> None:
    assert list(good.providers) == ["openai", "azure", "fake"]
    openai = good.providers["openai"]
    assert openai.id == "openai"
    assert openai.name == "OpenAI"
    assert openai.type == "openai"
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key == "sk-openai"
    assert dict(openai.headers) == {"OpenAI-Organization": "org-123"}
    assert openai.models == ("gpt-4o", "gpt-4o-mini")
    assert openai.connect_timeout_seconds == 3.0
    assert openai.first_byte_timeout_seconds == 20.0
    assert openai.idle_timeout_seconds == 15.0
    assert openai.total_timeout_seconds == 300.0
    assert openai.max_connections == 50
    assert openai.max_retries == 2

    azure = good.providers["azure"]
    assert azure.name == "azure"  # defaults to the key
    assert azure.type == "azure"
    # Azure URLs get no /v1: the adapter builds /openai/deployments/... itself.
    assert azure.base_url == "https://res.openai.azure.com"
    assert azure.api_version == "2024-06-01"

    fake = good.providers["fake"]
    assert fake.type == "mock"
    assert fake.base_url == ""
    assert fake.mock.latency_seconds == 0.01
    assert fake.mock.chunk_count == 3
    assert fake.mock.failure_rate == 0.5
    assert fake.mock.seed == 7


def test_no_secret_or_upstream_address_appears_in_a_repr(good: Config) -> None:
    """A config object in a log line or a traceback must not leak what it guards."""
    shown = repr(good)
    for secret in ("sk-openai", "az-key", "org-123", "api.openai.com", "res.openai.azure"):
        assert secret not in shown
    assert "cache:6380" not in shown  # the Redis URL, which may carry a password
    for user in good.users.values():
        assert user.token_sha256.hex() not in shown
        assert repr(user.token_sha256) not in shown


def test_new_limits_have_their_documented_defaults(good: Config) -> None:
    assert good.server.keepalive_timeout_seconds == 15.0
    assert good.server.body_timeout_seconds == 60.0
    openai = good.providers["openai"]
    assert openai.max_connections == 50  # as configured
    azure = good.providers["azure"]
    assert azure.max_connections == 4096
    assert azure.pool_timeout_seconds == 1.0
    assert azure.max_response_bytes == 128 * 1024 * 1024
    assert azure.max_event_bytes == 1024 * 1024


def test_good_yaml_models(good: Config) -> None:
    gpt4o = good.models["gpt-4o"]
    assert gpt4o.id == gpt4o.name == "gpt-4o"
    assert gpt4o.strategy == "failover"
    assert gpt4o.enabled is True
    first, second = gpt4o.backends
    assert (first.provider, first.model, first.priority, first.tags) == (
        "openai",
        "gpt-4o",
        0,
        ("premium",),
    )
    assert first.billing_mode == "per_token"
    assert (second.provider, second.model, second.priority) == ("azure", "gpt4o-deployment", 1)
    assert second.billing_mode == "per_request"

    small = good.models["small"]
    assert small.name == "gpt-4o-mini"
    assert small.strategy == "weighted_random"
    assert small.enabled is False
    assert [b.weight for b in small.backends] == [2.5, 0.5]
    assert [b.enabled for b in small.backends] == [True, False]


def test_good_yaml_find_model_by_public_name_or_key(good: Config) -> None:
    assert set(good.models_by_name) == {"gpt-4o", "gpt-4o-mini"}
    assert good.find_model("gpt-4o-mini") is good.models["small"]
    assert good.find_model("small") is good.models["small"]
    assert good.find_model("gpt-4o") is good.models["gpt-4o"]
    assert good.find_model("gpt-5") is None


def test_good_yaml_users(good: Config) -> None:
    root, app = good.users["root"], good.users["app"]
    assert root.name == "Root"
    assert root.token_sha256 == bytes.fromhex(SHA_OF_NOTHING)
    assert root.admin is True
    assert root.allowed_models == ()
    assert root.rate_limit is None

    assert app.name == "app"
    assert app.token_sha256 == hashlib.sha256(TOKEN_A.encode()).digest()
    # Public names are resolved to model ids (config keys).
    assert app.allowed_models == ("gpt-4o", "small")
    assert app.may_use("small")
    assert not app.may_use("other")
    assert app.enabled is False
    assert app.admin is False
    assert app.tags == ("premium",)
    assert app.rate_limit is not None
    assert app.rate_limit.requests_per_minute == 60
    assert app.rate_limit.tokens_per_minute == 10000
    assert app.rate_limit.max_concurrent == 4
    assert app.rate_limit.requests_per_hour is None
    assert app.rate_limit.requests_per_day is None


def test_good_yaml_settings_and_store(good: Config) -> None:
    assert good.settings.max_retries == 5
    assert good.settings.smart_ai.exploration_ratio == 0.1
    # Keys not given keep their defaults, at every level.
    assert good.settings.health_check_interval_seconds == 30.0
    assert good.settings.smart_ai.initial_confidence == 0.8
    assert good.settings.smart_ai.confidence_adjustments.success_boost == 0.1
    assert good.rate_limit_store.backend == "redis"
    assert good.rate_limit_store.redis_url == "rediss://cache:6380/1"
    assert good.rate_limit_store.key_prefix == "gw:"


def test_raw_token_is_not_kept(good: Config) -> None:
    assert TOKEN_A not in repr(good)
    assert not hasattr(good.users["app"], "token")


def test_load_config_accepts_str_path_and_yml_suffix(tmp_path: Path) -> None:
    path = write(tmp_path, "berry.yml", GOOD_YAML)
    assert load_config(str(path), env=GOOD_ENV).server.port == 8080


def test_hash_token() -> None:
    assert hash_token(TOKEN_A) == hashlib.sha256(TOKEN_A.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_token(TOKEN_B))


# --------------------------------------------------------------------------------------
# The original Berry TOML schema
# --------------------------------------------------------------------------------------

APPENDIX_TOML = """
[providers.openai-primary]
name = "OpenAI"
base_url = "https://api.openai.com"
api_key = "sk-..."
models = ["gpt-4o"]
[models.gpt_4o]
name = "gpt-4o"
strategy = "smart_ai"
[[models.gpt_4o.backends]]
provider = "openai-primary"
model = "gpt-4o"
weight = 1.0
billing_mode = "per_token"
[users.admin]
name = "Admin"
token = "berry-admin-token-12345"
allowed_models = []
"""


def test_appendix_example_loads_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "config.toml", APPENDIX_TOML), env={})
    provider = config.providers["openai-primary"]
    assert provider.name == "OpenAI"
    assert provider.base_url == "https://api.openai.com/v1"
    assert provider.api_key == "sk-..."
    assert provider.models == ("gpt-4o",)
    model = config.models["gpt_4o"]
    assert model.name == "gpt-4o"
    assert model.strategy == "smart_ai"
    assert config.find_model("gpt-4o") is model
    (backend,) = model.backends
    assert (backend.provider, backend.model, backend.weight) == ("openai-primary", "gpt-4o", 1.0)
    assert backend.billing_mode == "per_token"
    admin = config.users["admin"]
    assert admin.name == "Admin"
    assert admin.admin is True
    assert admin.token_sha256 == hashlib.sha256(b"berry-admin-token-12345").digest()


FULL_TOML = """
[settings]
health_check_interval_seconds = 15
request_timeout_seconds = 90
max_retries = 4
max_internal_retries = 1
circuit_breaker_failure_threshold = 7
circuit_breaker_timeout_seconds = 45
recovery_check_interval_seconds = 100
health_check_timeout_seconds = 4.5

[settings.smart_ai]
initial_confidence = 0.7
min_confidence = 0.1
exploration_ratio = 0.15
enable_time_decay = false
non_premium_stability_bonus = 1.2

[settings.smart_ai.confidence_adjustments]
success_boost = 0.05
network_error_penalty = 0.35
auth_error_penalty = 0.9
rate_limit_penalty = 0.15
server_error_penalty = 0.25
model_error_penalty = 0.4
timeout_penalty = 0.3

[providers.openai]
name = "OpenAI"
base_url = "https://api.openai.com"
api_key = "${OPENAI_API_KEY}"
models = ["gpt-4o", "gpt-4o-mini"]
enabled = true
timeout_seconds = 30
max_retries = 2
backend_type = "openai"

[providers.openai.headers]
"OpenAI-Organization" = "org-1"
"X-Team" = "search"

[providers.local]
name = "Local vLLM"
base_url = "http://127.0.0.1:8000/"
api_key = ""
enabled = false
timeout_seconds = 2.5
backend_type = "openai"

[models.gpt_4o]
name = "gpt-4o"
strategy = "smart_weighted_failover"
enabled = true

[[models.gpt_4o.backends]]
provider = "openai"
model = "gpt-4o"
weight = 2
priority = 0
enabled = true
tags = ["premium"]
billing_mode = "per_token"

[[models.gpt_4o.backends]]
provider = "local"
model = "llama"
weight = 0.5
priority = 1
enabled = false
tags = []
billing_mode = "per_request"

[models.mini]
name = "gpt-4o-mini"
strategy = "round_robin"
enabled = false

[[models.mini.backends]]
provider = "openai"
model = "gpt-4o-mini"

[users.admin]
name = "Admin"
token = "berry-admin-token-12345"
allowed_models = []
enabled = true
tags = []

[users.app]
name = "App"
token = "berry-app-token-1234567"
allowed_models = ["gpt_4o", "gpt-4o-mini"]
enabled = true
tags = ["premium"]

[users.app.rate_limit]
requests_per_minute = 60
requests_per_hour = 1000
requests_per_day = 10000
"""


@pytest.fixture
def full_toml(tmp_path: Path) -> Config:
    return load_config(write(tmp_path, "config.toml", FULL_TOML), env={"OPENAI_API_KEY": "sk-1"})


def test_toml_settings_full_key_set(full_toml: Config) -> None:
    s = full_toml.settings
    assert s.health_check_interval_seconds == 15.0
    assert s.request_timeout_seconds == 90.0
    assert s.max_retries == 4
    assert s.max_internal_retries == 1
    assert s.circuit_breaker_failure_threshold == 7
    assert s.circuit_breaker_timeout_seconds == 45.0
    assert s.recovery_check_interval_seconds == 100.0
    assert s.health_check_timeout_seconds == 4.5
    ai = s.smart_ai
    assert (ai.initial_confidence, ai.min_confidence, ai.exploration_ratio) == (0.7, 0.1, 0.15)
    assert ai.enable_time_decay is False
    assert ai.non_premium_stability_bonus == 1.2
    assert dataclasses.asdict(ai.confidence_adjustments) == {
        "success_boost": 0.05,
        "network_error_penalty": 0.35,
        "auth_error_penalty": 0.9,
        "rate_limit_penalty": 0.15,
        "server_error_penalty": 0.25,
        "model_error_penalty": 0.4,
        "timeout_penalty": 0.3,
    }


def test_toml_providers_original_keys(full_toml: Config) -> None:
    openai = full_toml.providers["openai"]
    assert openai.type == "openai"  # from backend_type
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key == "sk-1"
    assert openai.connect_timeout_seconds == 30.0  # timeout_seconds is its alias
    assert openai.max_retries == 2
    assert dict(openai.headers) == {"OpenAI-Organization": "org-1", "X-Team": "search"}
    assert openai.enabled is True
    local = full_toml.providers["local"]
    assert local.base_url == "http://127.0.0.1:8000/v1"
    assert local.api_key == ""
    assert local.enabled is False
    assert local.connect_timeout_seconds == 2.5
    assert local.max_retries is None
    assert local.models == ()


def test_toml_models_and_backend_arrays(full_toml: Config) -> None:
    model = full_toml.models["gpt_4o"]
    assert model.name == "gpt-4o"
    assert model.strategy == "smart_weighted_failover"
    assert [dataclasses.astuple(b) for b in model.backends] == [
        ("openai", "gpt-4o", 2.0, 0, True, ("premium",), "per_token"),
        ("local", "llama", 0.5, 1, False, (), "per_request"),
    ]
    assert isinstance(model.backends[0].weight, float)
    mini = full_toml.models["mini"]
    assert (mini.name, mini.strategy, mini.enabled) == ("gpt-4o-mini", "round_robin", False)


def test_toml_users_allowed_models_by_key_and_public_name(full_toml: Config) -> None:
    admin, app = full_toml.users["admin"], full_toml.users["app"]
    assert admin.admin is True
    assert app.allowed_models == ("gpt_4o", "mini")
    assert app.admin is False
    assert app.tags == ("premium",)
    assert app.rate_limit is not None
    assert (
        app.rate_limit.requests_per_minute,
        app.rate_limit.requests_per_hour,
        app.rate_limit.requests_per_day,
    ) == (60, 1000, 10000)


def test_allowed_models_duplicates_by_key_and_name_collapse() -> None:
    raw = with_value("models.m.name", "public")
    raw["users"]["u"]["allowed_models"] = ["m", "public", "m"]
    assert build(raw).users["u"].allowed_models == ("m",)


@pytest.mark.parametrize(
    ("alias", "canonical", "value"),
    [("backend_type", "type", "openai"), ("timeout_seconds", "connect_timeout_seconds", 5)],
)
def test_alias_and_canonical_key_together_is_an_error(
    alias: str, canonical: str, value: object
) -> None:
    raw = with_value(f"providers.p.{alias}", value)
    raw["providers"]["p"][canonical] = value
    assert errors_of(raw) == [
        f"providers.p.{alias}: give either '{alias}' or '{canonical}', not both"
    ]


def test_errors_about_an_alias_name_the_key_in_the_file(tmp_path: Path) -> None:
    text = '[providers.p]\nbase_url = "http://h"\ntimeout_seconds = "30"\nbackend_type = "foo"\n'
    text += '[models.m]\n[[models.m.backends]]\nprovider = "p"\nmodel = "x"\n'
    text += f'[users.u]\ntoken = "{TOKEN_A}"\n'
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "c.toml", text), env={})
    assert sorted(excinfo.value.errors) == [
        "providers.p.backend_type: must be one of openai, azure, mock, got 'foo'",
        "providers.p.timeout_seconds: Not a valid number.",
    ]


# --------------------------------------------------------------------------------------
# base_url
# --------------------------------------------------------------------------------------

BASE_URLS = [
    ("https://api.openai.com", "https://api.openai.com/v1"),
    ("https://api.openai.com/", "https://api.openai.com/v1"),
    ("https://api.openai.com/v1", "https://api.openai.com/v1"),
    ("https://api.openai.com/v1/", "https://api.openai.com/v1"),
    ("http://host:8000/v1", "http://host:8000/v1"),
    ("http://host:8000", "http://host:8000/v1"),
    ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1"),
    ("https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1"),
    ("http://gateway/openai", "http://gateway/openai"),
]


@pytest.mark.parametrize(("given", "expected"), BASE_URLS)
def test_normalize_base_url(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected


@pytest.mark.parametrize(("given", "expected"), BASE_URLS)
def test_provider_base_url_is_normalised(given: str, expected: str) -> None:
    assert build(with_value("providers.p.base_url", given)).providers["p"].base_url == expected


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("api.openai.com", "must be an http:// or https:// URL"),
        ("ftp://files.example.com", "must be an http:// or https:// URL"),
        ("", "required for provider type 'openai'"),
    ],
)
def test_bad_base_url(base_url: str, message: str) -> None:
    assert errors_of(with_value("providers.p.base_url", base_url)) == [
        f"providers.p.base_url: {message}"
    ]


def test_missing_base_url_is_required_except_for_mock() -> None:
    raw = minimal()
    del raw["providers"]["p"]["base_url"]
    assert errors_of(raw) == ["providers.p.base_url: required for provider type 'openai'"]
    raw["providers"]["p"]["type"] = "mock"
    assert build(raw).providers["p"].base_url == ""


# --------------------------------------------------------------------------------------
# ${VAR} expansion
# --------------------------------------------------------------------------------------


def test_env_var_is_expanded_everywhere_strings_are() -> None:
    raw = minimal()
    raw["providers"]["p"].update(
        {
            "base_url": "http://${HOST}:${PORT}",
            "api_key": "${KEY}",
            "headers": {"Authorization": "Bearer ${KEY}"},
            "models": ["x", "${MODEL}"],
        }
    )
    raw["users"]["u"]["token"] = "${TOKEN}"
    env = {"HOST": "gpu1", "PORT": "8000", "KEY": "k-1", "MODEL": "llama", "TOKEN": TOKEN_B}
    config = build(raw, env)
    provider = config.providers["p"]
    assert provider.base_url == "http://gpu1:8000/v1"
    assert provider.api_key == "k-1"
    assert dict(provider.headers) == {"Authorization": "Bearer k-1"}
    assert provider.models == ("x", "llama")
    assert config.users["u"].token_sha256 == hashlib.sha256(TOKEN_B.encode()).digest()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "redis://127.0.0.1:6379/0"),
        ({"REDIS_URL": "redis://cache:6379/2"}, "redis://cache:6379/2"),
        # Shell semantics of ":-": an empty value also takes the default.
        ({"REDIS_URL": ""}, "redis://127.0.0.1:6379/0"),
    ],
)
def test_env_var_default(env: dict[str, str], expected: str) -> None:
    raw = with_value(
        "rate_limit_store",
        {"backend": "redis", "redis_url": "${REDIS_URL:-redis://127.0.0.1:6379/0}"},
    )
    assert build(raw, env).rate_limit_store.redis_url == expected


def test_env_var_empty_default_and_empty_value() -> None:
    raw = with_value("providers.p.api_key", "${LOCAL_KEY:-}")
    assert build(raw).providers["p"].api_key == ""
    # A variable that is set but empty is a legitimate empty api_key (local servers).
    raw = with_value("providers.p.api_key", "${LOCAL_KEY}")
    assert build(raw, {"LOCAL_KEY": ""}).providers["p"].api_key == ""


def test_unset_env_var_without_default_names_the_path() -> None:
    raw = with_value("providers.p.api_key", "${OPENAI_API_KEY}")
    assert errors_of(raw) == [
        "providers.p.api_key: environment variable 'OPENAI_API_KEY' is not set"
    ]


def test_every_unset_env_var_is_reported() -> None:
    raw = minimal()
    raw["providers"]["p"]["models"] = ["x", "${MODEL_B}"]
    raw["providers"]["p"]["headers"] = {"X-Key": "${HEADER_KEY}"}
    raw["users"]["u"]["name"] = "${ALICE_NAME}"
    assert sorted(errors_of(raw)) == [
        "providers.p.headers.X-Key: environment variable 'HEADER_KEY' is not set",
        "providers.p.models[1]: environment variable 'MODEL_B' is not set",
        "users.u.name: environment variable 'ALICE_NAME' is not set",
    ]


def test_explicit_env_replaces_the_process_environment() -> None:
    name = next(k for k, v in os.environ.items() if re.fullmatch(r"[A-Z_][A-Z0-9_]*", k) and v)
    raw = with_value("providers.p.name", f"${{{name}}}")
    assert errors_of(raw, env={}) == [f"providers.p.name: environment variable '{name}' is not set"]
    # Without env=, the process environment is used (read, never modified here).
    assert build_config(raw).providers["p"].name == os.environ[name]


def test_text_that_is_not_a_reference_is_kept() -> None:
    raw = with_value("providers.p.api_key", "$NOT_A_REF and ${ and {X}")
    assert build(raw).providers["p"].api_key == "$NOT_A_REF and ${ and {X}"


def test_expanded_value_is_validated() -> None:
    raw = with_value("users.u.token", "${TOKEN}")
    assert errors_of(raw, {"TOKEN": "short"}) == ["users.u.token: must be at least 16 characters"]


# --------------------------------------------------------------------------------------
# Error paths, and all errors at once
# --------------------------------------------------------------------------------------


def test_unknown_provider_error_names_the_exact_path() -> None:
    raw = minimal()
    raw["models"] = {
        "gpt-4": {
            "backends": [
                {"provider": "p", "model": "gpt-4"},
                {"provider": "azure-eu", "model": "gpt-4"},
            ]
        }
    }
    assert errors_of(raw) == ["models.gpt-4.backends[1].provider: unknown provider 'azure-eu'"]


def test_backend_model_must_be_listed_by_a_provider_that_lists_models() -> None:
    raw = with_value("providers.p.models", ["a", "b"])
    assert errors_of(raw) == [
        "models.m.backends[0].model: provider 'p' does not list model 'x' in its models"
    ]


def test_model_needs_backends() -> None:
    assert errors_of(with_value("models.m.backends", [])) == [
        "models.m.backends: a model needs at least one backend"
    ]
    raw = minimal()
    del raw["models"]["m"]["backends"]
    assert errors_of(raw) == ["models.m.backends: Missing data for required field."]


@pytest.mark.parametrize("key", ["provider", "model"])
def test_backend_provider_and_model_are_required(key: str) -> None:
    raw = minimal()
    del raw["models"]["m"]["backends"][0][key]
    assert errors_of(raw) == [f"models.m.backends[0].{key}: Missing data for required field."]


@pytest.mark.parametrize("section", ["providers", "models", "users"])
def test_sections_are_required(section: str) -> None:
    raw = minimal()
    del raw[section]
    assert f"{section}: Missing data for required field." in errors_of(raw)


@pytest.mark.parametrize("value", [[], "x", 3, None])
def test_section_must_be_a_mapping(value: object) -> None:
    errors = errors_of(with_value("providers", value))
    assert len(errors) == 1  # and no cascade of "unknown provider" errors
    assert errors[0].startswith("providers: ")


def test_entry_must_be_a_mapping() -> None:
    assert errors_of(with_value("providers.p", "http://h")) == ["providers.p: Invalid input type."]


ALL_AT_ONCE_YAML = """
servr:
  port: 3000
server:
  port: "3000"
providers:
  openai:
    base_url: https://api.openai.com
    api_key: ${OPENAI_API_KEY}
    timeout_seconds: 0
  anthropic:
    backend_type: claude
    base_url: https://api.anthropic.com
    enabled: "yes"
models:
  gpt-4:
    strategy: fastest
    backends:
      - {provider: openai, model: gpt-4, weight: 0}
  gpt-4o:
    backends:
      - {provider: openai, model: gpt-4o}
      - {provider: azure-eu, model: gpt-4o}
users:
  alice:
    token: short
  bob:
    token_sha256: not-hex
  carol:
    token: carol-token-0123456789
    allowed_models: [gpt-4, gpt-5]
settings:
  max_retries: 0
  smart_ai:
    exploration_ratio: 1.5
"""


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "berry.yaml", ALL_AT_ONCE_YAML), env={})
    errors = excinfo.value.errors
    assert sorted(errors) == sorted(
        [
            "servr: Unknown field.",
            "server.port: Not a valid integer.",
            "providers.openai.api_key: environment variable 'OPENAI_API_KEY' is not set",
            "providers.openai.timeout_seconds: Must be greater than 0.",
            "providers.anthropic.backend_type: provider type 'claude' is not supported yet",
            "providers.anthropic.enabled: Not a valid boolean.",
            "models.gpt-4.strategy: Must be one of: " + ", ".join(STRATEGIES) + ".",
            "models.gpt-4.backends[0].weight: Must be greater than 0.",
            "models.gpt-4o.backends[1].provider: unknown provider 'azure-eu'",
            "users.alice.token: must be at least 16 characters",
            "users.bob.token_sha256: must be 64 hexadecimal characters (berry-proxy hash-token)",
            "users.carol.allowed_models[1]: unknown model 'gpt-5'",
            "settings.max_retries: "
            "Must be greater than or equal to 1 and less than or equal to 100.",
            "settings.smart_ai.exploration_ratio: "
            "Must be greater than or equal to 0 and less than or equal to 1.",
        ]
    )
    # The exception's message lists them all too, one per line.
    assert str(excinfo.value).splitlines() == errors


def test_no_cascading_errors_from_invalid_entries() -> None:
    # The provider is invalid (reported), so its backend is not also "unknown provider";
    # the model is invalid (reported), so the user's reference to it is not "unknown model".
    raw = with_value("providers.p.max_connections", 0)
    raw["models"]["m"]["strategy"] = "nope"
    raw["users"]["u"]["allowed_models"] = ["m"]
    raw["models"]["n"] = {"name": "public-n", "enabled": "no", "backends": []}
    raw["users"]["u"]["allowed_models"] = ["m", "public-n"]
    errors = errors_of(raw)
    assert [e.split(":")[0] for e in errors] == [
        "providers.p.max_connections",
        "models.m.strategy",
        "models.n.enabled",
    ]


# --------------------------------------------------------------------------------------
# Unknown keys, wrong types, out-of-range values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "section",
    [
        "",
        "server",
        "providers.p",
        "providers.p.mock",
        "models.m",
        "models.m.backends[0]",
        "users.u",
        "users.u.rate_limit",
        "settings",
        "settings.smart_ai",
        "settings.smart_ai.confidence_adjustments",
        "rate_limit_store",
    ],
)
def test_unknown_key_at_every_level(section: str) -> None:
    path = f"{section}.bogus_key" if section else "bogus_key"
    assert errors_of(with_value(path, 1)) == [f"{path}: Unknown field."]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("server.port", "3000", "Not a valid integer."),
        ("server.port", 3000.5, "Not a valid integer."),
        ("server.port", True, "Not a valid integer."),
        ("server.host", 127, "Not a valid string."),
        ("server.public_status", "yes", "Not a valid boolean."),
        ("server.public_status", 1, "Not a valid boolean."),
        ("server.max_body_bytes", "32MiB", "Not a valid integer."),
        ("providers.p.enabled", "yes", "Not a valid boolean."),
        ("providers.p.enabled", "true", "Not a valid boolean."),
        ("providers.p.api_key", 12345, "Not a valid string."),
        ("providers.p.models", "x", "Not a valid list."),
        ("providers.p.connect_timeout_seconds", "10", "Not a valid number."),
        ("providers.p.timeout_seconds", "10", "Not a valid number."),
        ("providers.p.max_retries", "2", "Not a valid integer."),
        ("providers.p.type", 1, "Not a valid string."),
        ("models.m.name", 5, "Not a valid string."),
        ("models.m.enabled", "no", "Not a valid boolean."),
        ("models.m.backends", {"provider": "p"}, "Not a valid list."),
        ("models.m.backends[0].weight", "1.5", "Not a valid number."),
        ("models.m.backends[0].weight", True, "Not a valid number."),
        ("models.m.backends[0].priority", 1.5, "Not a valid integer."),
        ("models.m.backends[0].priority", "0", "Not a valid integer."),
        ("models.m.backends[0].tags", "premium", "Not a valid list."),
        ("users.u.allowed_models", "m", "Not a valid list."),
        ("users.u.admin", "true", "Not a valid boolean."),
        ("users.u.enabled", 0, "Not a valid boolean."),
        ("users.u.rate_limit.requests_per_minute", "60", "Not a valid integer."),
        ("users.u.rate_limit", 60, "Invalid input type."),
        ("settings.max_retries", "3", "Not a valid integer."),
        ("settings.max_retries", 3.0, "Not a valid integer."),
        ("settings.health_check_interval_seconds", "30s", "Not a valid number."),
        ("settings.smart_ai.initial_confidence", "0.8", "Not a valid number."),
        ("settings.smart_ai.enable_time_decay", "yes", "Not a valid boolean."),
        ("settings.smart_ai.confidence_adjustments.success_boost", [0.1], "Not a valid number."),
        ("rate_limit_store.redis_url", 6379, "Not a valid string."),
    ],
)
def test_wrong_type(path: str, value: object, message: str) -> None:
    assert errors_of(with_value(path, value)) == [f"{path}: {message}"]


def test_header_values_must_be_strings() -> None:
    assert errors_of(with_value("providers.p.headers", {"X-Retries": 3})) == [
        "providers.p.headers.X-Retries.value: Not a valid string."
    ]


def test_quoted_yes_is_not_a_boolean_in_yaml_or_toml(tmp_path: Path) -> None:
    yaml_text = (
        "providers: {p: {base_url: 'http://h', enabled: 'yes'}}\n"
        "models: {m: {backends: [{provider: p, model: x}]}}\n"
        f"users: {{u: {{token: {TOKEN_A}}}}}\n"
    )
    toml_text = (
        '[providers.p]\nbase_url = "http://h"\nenabled = "yes"\n'
        '[[models.m.backends]]\nprovider = "p"\nmodel = "x"\n'
        f'[users.u]\ntoken = "{TOKEN_A}"\n'
    )
    for name, text in (("c.yaml", yaml_text), ("c.toml", toml_text)):
        with pytest.raises(ConfigError) as excinfo:
            load_config(write(tmp_path, name, text), env={})
        assert excinfo.value.errors == ["providers.p.enabled: Not a valid boolean."]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("models.m.backends[0].weight", 0),
        ("models.m.backends[0].weight", -1.5),
        ("models.m.backends[0].priority", -1),
        ("settings.smart_ai.initial_confidence", 1.01),
        ("settings.smart_ai.min_confidence", -0.1),
        # 0 would let a backend's weight reach 0, never to be drawn again.
        ("settings.smart_ai.min_confidence", 0),
        ("settings.smart_ai.non_premium_stability_bonus", 0),
        ("settings.smart_ai.exploration_ratio", 2),
        ("settings.smart_ai.non_premium_stability_bonus", -1),
        ("settings.smart_ai.confidence_adjustments.success_boost", 1.5),
        ("settings.smart_ai.confidence_adjustments.auth_error_penalty", -0.2),
        ("settings.smart_ai.confidence_adjustments.timeout_penalty", 1.2),
        ("settings.health_check_interval_seconds", 0.5),
        ("settings.recovery_check_interval_seconds", 0),
        ("settings.circuit_breaker_timeout_seconds", 0.99),
        ("settings.health_check_timeout_seconds", 0),
        ("settings.request_timeout_seconds", -5),
        ("settings.max_retries", 0),
        ("settings.max_internal_retries", -1),
        ("settings.circuit_breaker_failure_threshold", 0),
        ("providers.p.connect_timeout_seconds", 0),
        ("providers.p.timeout_seconds", -1),
        ("providers.p.first_byte_timeout_seconds", 0),
        ("providers.p.idle_timeout_seconds", -0.5),
        ("providers.p.total_timeout_seconds", 0),
        ("providers.p.max_connections", 0),
        ("providers.p.max_retries", -1),
        ("providers.p.mock.failure_rate", 1.5),
        ("providers.p.mock.chunk_count", 0),
        ("providers.p.api_version", ""),
        ("server.port", 65536),
        ("server.port", -1),
        ("server.max_body_bytes", 0),
        ("server.drain_timeout_seconds", -1),
        ("users.u.rate_limit.requests_per_minute", 0),
        ("users.u.rate_limit.requests_per_hour", -1),
        ("users.u.rate_limit.requests_per_day", 0),
        ("users.u.rate_limit.tokens_per_minute", 0),
        ("users.u.rate_limit.max_concurrent", 0),
        ("models.m.name", ""),
        ("models.m.backends[0].model", ""),
        ("models.m.backends[0].billing_mode", "per_call"),
        ("rate_limit_store.backend", "memcached"),
        ("rate_limit_store.redis_url", "http://127.0.0.1:6379"),
    ],
)
def test_out_of_range(path: str, value: object) -> None:
    errors = errors_of(with_value(path, value))
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("models.m.backends[0].weight", 0.001),
        ("models.m.backends[0].weight", 3),
        ("models.m.backends[0].priority", 0),
        ("models.m.backends[0].priority", 10),
        ("settings.smart_ai.initial_confidence", 0),
        ("settings.smart_ai.initial_confidence", 1),
        ("settings.smart_ai.confidence_adjustments.auth_error_penalty", 1.0),
        ("settings.health_check_interval_seconds", 1),
        ("settings.recovery_check_interval_seconds", 1.0),
        ("settings.circuit_breaker_timeout_seconds", 1),
        ("settings.health_check_timeout_seconds", 0.1),
        ("settings.max_retries", 1),
        ("settings.max_internal_retries", 0),
        ("providers.p.connect_timeout_seconds", 0.05),
        ("providers.p.total_timeout_seconds", None),
        ("providers.p.api_key", ""),
        ("server.port", 0),
        ("server.port", 65535),
        ("server.drain_timeout_seconds", 0),
        ("rate_limit_store.redis_url", "unix:///run/redis.sock"),
    ],
)
def test_boundary_values_are_accepted(path: str, value: object) -> None:
    build(with_value(path, value))


# --------------------------------------------------------------------------------------
# Users: tokens, admin, allowed_models
# --------------------------------------------------------------------------------------


def test_token_of_16_characters_is_accepted() -> None:
    build(with_value("users.u.token", "x" * 16))


def test_token_shorter_than_16_characters() -> None:
    assert errors_of(with_value("users.u.token", "x" * 15)) == [
        "users.u.token: must be at least 16 characters"
    ]


@pytest.mark.parametrize(
    "token", ["berry token 0123456789", "berry-token-012345\t", "\nberry-token-0123456789"]
)
def test_token_with_whitespace(token: str) -> None:
    assert errors_of(with_value("users.u.token", token)) == [
        "users.u.token: must not contain whitespace"
    ]


@pytest.mark.parametrize(
    "digest",
    [
        "0" * 63,
        "0" * 65,
        "g" * 64,
        hash_token(TOKEN_A)[:-1] + " ",
        TOKEN_A,
        "",
    ],
)
def test_token_sha256_must_be_64_hex(digest: str) -> None:
    raw = minimal()
    raw["users"]["u"] = {"token_sha256": digest}
    assert errors_of(raw) == [
        "users.u.token_sha256: must be 64 hexadecimal characters (berry-proxy hash-token)"
    ]


def test_token_sha256_upper_case_hex_is_accepted() -> None:
    raw = minimal()
    raw["users"]["u"] = {"token_sha256": hash_token(TOKEN_A).upper()}
    assert build(raw).users["u"].token_sha256 == hashlib.sha256(TOKEN_A.encode()).digest()


@pytest.mark.parametrize(
    "credentials", [{}, {"token": TOKEN_A, "token_sha256": hash_token(TOKEN_A)}]
)
def test_exactly_one_of_token_and_token_sha256(credentials: dict[str, str]) -> None:
    raw = minimal()
    raw["users"]["u"] = {"name": "U", **credentials}
    assert errors_of(raw) == ["users.u: give exactly one of 'token' or 'token_sha256'"]


@pytest.mark.parametrize(
    "second", [{"token": TOKEN_A}, {"token_sha256": hash_token(TOKEN_A)}], ids=["raw", "sha256"]
)
def test_duplicate_tokens_between_users(second: dict[str, str]) -> None:
    raw = minimal()
    raw["users"]["v"] = second
    assert errors_of(raw) == ["users.v.token: same token as users.u"]


def test_distinct_tokens_are_fine() -> None:
    raw = minimal()
    raw["users"]["v"] = {"token": TOKEN_B}
    assert set(build(raw).users) == {"u", "v"}


def test_allowed_models_unknown_model() -> None:
    raw = with_value("users.u.allowed_models", ["m", "nope"])
    assert errors_of(raw) == ["users.u.allowed_models[1]: unknown model 'nope'"]


@pytest.mark.parametrize(
    ("user", "admin"),
    [
        ({}, True),  # allowed_models absent: every model, admin (the original's rule)
        ({"allowed_models": []}, True),
        ({"allowed_models": [], "admin": False}, False),
        ({"admin": False}, False),
        ({"allowed_models": ["m"]}, False),
        ({"allowed_models": ["m"], "admin": True}, True),
    ],
)
def test_admin_defaulting(user: dict[str, Any], admin: bool) -> None:
    raw = minimal()
    raw["users"]["u"].update(user)
    assert build(raw).users["u"].admin is admin


def test_admin_false_keeps_every_model() -> None:
    config = build(with_value("users.u.admin", False))
    user = config.users["u"]
    assert user.allowed_models == ()
    assert user.may_use("m")
    assert user.may_use("any-model")


def test_names_default_to_keys() -> None:
    config = build(minimal())
    assert config.providers["p"].name == "p"
    assert config.models["m"].name == "m"
    assert config.users["u"].name == "u"


# --------------------------------------------------------------------------------------
# Strategies, provider types, model names
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_is_accepted(strategy: str) -> None:
    assert build(with_value("models.m.strategy", strategy)).models["m"].strategy == strategy


def test_there_are_the_eight_strategies_of_the_spec() -> None:
    assert set(STRATEGIES) == {
        "weighted_random",
        "round_robin",
        "least_latency",
        "failover",
        "random",
        "weighted_failover",
        "smart_weighted_failover",
        "smart_ai",
    }


@pytest.mark.parametrize("strategy", ["fastest", "Smart_AI", "weighted-random", ""])
def test_unknown_strategy(strategy: str) -> None:
    assert errors_of(with_value("models.m.strategy", strategy)) == [
        "models.m.strategy: Must be one of: " + ", ".join(STRATEGIES) + "."
    ]


@pytest.mark.parametrize("ptype", ["claude", "gemini"])
@pytest.mark.parametrize("key", ["type", "backend_type"])
def test_claude_and_gemini_are_not_supported_yet(ptype: str, key: str) -> None:
    raw = minimal()
    raw["providers"]["my-claude"] = {key: ptype, "base_url": "https://api.example.com"}
    raw["models"]["m"]["backends"].append({"provider": "my-claude", "model": "c"})
    errors = errors_of(raw)
    # One error, naming the provider; its backend is not also an "unknown provider".
    assert errors == [f"providers.my-claude.{key}: provider type '{ptype}' is not supported yet"]


def test_unknown_provider_type() -> None:
    assert errors_of(with_value("providers.p.type", "bedrock")) == [
        "providers.p.type: must be one of openai, azure, mock, got 'bedrock'"
    ]


def test_provider_type_error_comes_with_the_entrys_other_errors() -> None:
    raw = with_value("providers.p.type", "gemini")
    raw["providers"]["p"]["max_connections"] = 0
    assert sorted(errors_of(raw)) == [
        "providers.p.max_connections: Must be greater than or equal to 1.",
        "providers.p.type: provider type 'gemini' is not supported yet",
    ]


def test_two_models_with_the_same_public_name() -> None:
    raw = minimal()
    raw["models"]["m2"] = {"name": "shared", "backends": [{"provider": "p", "model": "y"}]}
    raw["models"]["m3"] = {"name": "shared", "backends": [{"provider": "p", "model": "z"}]}
    assert errors_of(raw) == ["models.m3.name: public name 'shared' is also used by models.m2"]


def test_public_name_clashing_with_a_defaulted_name() -> None:
    raw = minimal()
    raw["models"]["other"] = {"name": "m", "backends": [{"provider": "p", "model": "y"}]}
    assert errors_of(raw) == ["models.other.name: public name 'm' is also used by models.m"]


# --------------------------------------------------------------------------------------
# Frozen objects and defaults
# --------------------------------------------------------------------------------------


def test_config_objects_are_frozen() -> None:
    raw = minimal()
    raw["users"]["u"]["rate_limit"] = {"requests_per_minute": 1}
    config = build(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.providers["p"].api_key = "stolen"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models["m"].backends[0].weight = 100.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.users["u"].admin = True  # type: ignore[misc]
    rate_limit = config.users["u"].rate_limit
    assert rate_limit is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rate_limit.requests_per_minute = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings.smart_ai.confidence_adjustments.success_boost = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rate_limit_store.backend = "redis"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.settings = config.settings  # type: ignore[misc]


def test_config_mappings_and_sequences_are_read_only() -> None:
    config = build(with_value("providers.p.headers", {"X-A": "1"}))
    with pytest.raises(TypeError):
        config.providers["q"] = config.providers["p"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.models_by_name["x"] = config.models["m"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.users["u2"] = config.users["u"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.providers["p"].headers["X-B"] = "2"  # type: ignore[index]
    assert isinstance(config.models["m"].backends, tuple)
    assert isinstance(config.users["u"].allowed_models, tuple)
    assert isinstance(config.providers["p"].models, tuple)


def test_defaults() -> None:
    config = build(minimal())
    server = config.server
    assert (server.host, server.port) == ("127.0.0.1", 3000)
    assert server.max_body_bytes == 32 * 1024 * 1024
    assert server.public_status is True
    assert server.drain_timeout_seconds == 30.0

    s = config.settings
    assert s.health_check_interval_seconds == 30
    assert s.max_retries == 3
    assert s.circuit_breaker_failure_threshold == 5
    assert s.circuit_breaker_timeout_seconds == 60
    assert s.recovery_check_interval_seconds == 120
    assert s.health_check_timeout_seconds == 10
    ai = s.smart_ai
    assert (ai.initial_confidence, ai.min_confidence, ai.exploration_ratio) == (0.8, 0.05, 0.2)
    assert dataclasses.asdict(ai.confidence_adjustments) == {
        "success_boost": 0.1,
        "network_error_penalty": 0.3,
        "auth_error_penalty": 0.8,
        "rate_limit_penalty": 0.1,
        "server_error_penalty": 0.2,
        "model_error_penalty": 0.3,
        "timeout_penalty": 0.2,
    }

    store = config.rate_limit_store
    assert (store.backend, store.redis_url, store.key_prefix) == (
        "memory",
        "redis://127.0.0.1:6379/0",
        "berry:",
    )

    provider = config.providers["p"]
    assert provider.type == "openai"
    assert provider.enabled is True
    assert provider.api_key == ""
    assert dict(provider.headers) == {}
    assert provider.models == ()
    assert provider.connect_timeout_seconds == 10
    assert provider.first_byte_timeout_seconds == 60
    assert provider.idle_timeout_seconds == 60
    assert provider.total_timeout_seconds is None  # "not set": see ProviderConfig
    assert provider.max_retries is None

    model = config.models["m"]
    assert (model.strategy, model.enabled) == ("smart_ai", True)
    assert dataclasses.astuple(model.backends[0]) == ("p", "x", 1.0, 0, True, (), "per_token")

    user = config.users["u"]
    assert user.enabled is True
    assert user.tags == ()
    assert user.rate_limit is None


def test_partial_nested_settings_keep_the_other_defaults() -> None:
    raw = with_value("settings.smart_ai.confidence_adjustments.timeout_penalty", 0.5)
    raw["settings"]["max_retries"] = 2
    settings = build(raw).settings
    assert settings.max_retries == 2
    assert settings.circuit_breaker_failure_threshold == 5
    assert settings.smart_ai.initial_confidence == 0.8
    assert settings.smart_ai.confidence_adjustments.timeout_penalty == 0.5
    assert settings.smart_ai.confidence_adjustments.auth_error_penalty == 0.8


def test_empty_sections_and_null_settings_use_defaults() -> None:
    raw = minimal()
    raw.update({"server": {}, "settings": {"smart_ai": {}}, "rate_limit_store": {}})
    config = build(raw)
    assert config.server.port == 3000
    assert config.settings.smart_ai.exploration_ratio == 0.2
    assert config.rate_limit_store.backend == "memory"


# --------------------------------------------------------------------------------------
# Files: syntax errors and the like
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("berry.yaml", "providers: {p: [unclosed\n"),
        ("berry.yaml", "providers:\n  p:\n base_url: x\n   bad: indent\n"),
        ("config.toml", '[providers.p\nbase_url = "x"\n'),
        ("config.toml", "[providers.p]\nbase_url = unquoted\n"),
        ("config.toml", '[users.u]\ntoken = "a"\n[users.u]\ntoken = "b"\n'),
    ],
)
def test_syntax_errors_are_config_errors(tmp_path: Path, name: str, text: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (error,) = excinfo.value.errors
    assert error.startswith(f"{path}: syntax error: ")


@pytest.mark.parametrize(
    "text",
    [
        "server:\n  port: 8080\nwhen: 2024-13-45\n",  # a date PyYAML cannot build
        "x: " + "[" * 5000 + "]" * 5000 + "\n",  # nesting deeper than Python recurses
    ],
)
def test_a_value_yaml_cannot_build_is_a_config_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = write(tmp_path, "berry.yaml", text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (error,) = excinfo.value.errors
    assert error.startswith(f"{path}: a value cannot be read (")
    assert main(["check-config", "--config", str(path)]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("berry.yaml", 'providers:\n  p:\n    api_key: "sk-SECRET-1234\n'),
        ("berry.yaml", "users:\n  u:\n    token: sk-SECRET-1234: more\n"),
        ("config.toml", '[providers.p]\napi_key = "sk-SECRET-1234\n'),
        ("berry.yaml", "providers:\n  p:\n    api_key: *sk-SECRET-1234\n"),
        ("berry.yaml", "providers:\n  p:\n    api_key: !sk-SECRET-1234 x\n"),
    ],
)
def test_a_syntax_error_names_where_never_the_text_there(
    tmp_path: Path, name: str, text: str
) -> None:
    """Reload errors are logged and answered over HTTP: a key on the broken line stays
    out of them."""
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, name, text), env={})
    (error,) = excinfo.value.errors
    assert "SECRET" not in error
    assert "line " in error


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- list\n", "just a string\n"])
def test_document_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "berry.yaml", text), env={})
    assert excinfo.value.errors == ["<root>: the configuration must be a mapping of sections"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (error,) = excinfo.value.errors
    assert error.startswith(f"{path}: cannot read")


def test_toml_file_is_read_as_toml_not_yaml(tmp_path: Path) -> None:
    # Valid TOML that YAML cannot parse as a mapping: the suffix decides the parser.
    config = load_config(write(tmp_path, "config.toml", APPENDIX_TOML), env={})
    assert "gpt_4o" in config.models


# --------------------------------------------------------------------------------------
# Shipped configuration files
# --------------------------------------------------------------------------------------

_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
CONFIG_SUFFIXES = {".yaml", ".yml", ".toml"}
SHIPPED_FILES = sorted(
    path
    for pattern in ("config/*", "config/examples/*")
    for path in ROOT.glob(pattern)
    if path.is_file() and path.suffix in CONFIG_SUFFIXES
)
EXAMPLE_FILES = [path for path in SHIPPED_FILES if path.parent.name == "examples"]


def _ids(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(ROOT)) for path in paths]


_COMMENT = re.compile(r"(^|\s)#.*$", re.MULTILINE)


def required_vars(text: str) -> set[str]:
    """Variables a file references (outside comments) without a default."""
    return {name for name, default in _VAR_REF.findall(_COMMENT.sub("", text)) if not default}


def dummy_env(text: str) -> dict[str, str]:
    """A plausible value for every variable the file needs (defaults are left to apply)."""
    env = {}
    for name in required_vars(text):
        if "REDIS" in name:
            env[name] = "redis://127.0.0.1:6379/0"
        elif name.endswith(("_URL", "_ENDPOINT")):
            env[name] = "https://upstream.example.com"
        else:
            env[name] = f"dummy-{name.lower()}-0123456789"
    return env


def test_the_documented_examples_exist() -> None:
    names = {path.name for path in EXAMPLE_FILES}
    assert {
        "openai-azure-failover.yaml",
        "local-pool.yaml",
        "multi-instance-redis.yaml",
        "berry-original.toml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=_ids(SHIPPED_FILES))
def test_shipped_config_loads(path: Path) -> None:
    config = load_config(path, env=dummy_env(path.read_text(encoding="utf-8")))
    assert config.models
    assert config.users


@pytest.mark.parametrize("path", SHIPPED_FILES, ids=_ids(SHIPPED_FILES))
def test_shipped_config_names_each_missing_variable(path: Path) -> None:
    needed = required_vars(path.read_text(encoding="utf-8"))
    if not needed:
        load_config(path, env={})
        return
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    missing = set()
    for error in excinfo.value.errors:
        found = re.search(r": environment variable '(\w+)' is not set$", error)
        assert found, error
        missing.add(found.group(1))
    assert missing == needed


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=_ids(EXAMPLE_FILES))
def test_example_header_names_its_purpose_and_variables(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, "each example starts with a comment saying what it is for"
    header_text = "\n".join(header)
    for name, _default in _VAR_REF.findall(text):
        assert name in header_text, f"{name} is not documented in the header"


def _example(name: str) -> Path:
    return ROOT / "config" / "examples" / name


def test_example_openai_azure_failover() -> None:
    path = _example("openai-azure-failover.yaml")
    text = path.read_text(encoding="utf-8")
    config = load_config(path, env={"OPENAI_API_KEY": "sk-a", "AZURE_OPENAI_API_KEY": "az-b"})
    assert config.providers["azure"].type == "azure"
    assert config.providers["azure"].base_url.endswith(".openai.azure.com")
    assert config.providers["azure"].api_key == "az-b"
    assert config.providers["openai"].api_key == "sk-a"
    gpt4o = config.find_model("gpt-4o")
    assert gpt4o is not None
    assert gpt4o.strategy == "failover"
    by_provider = {backend.provider: backend.priority for backend in gpt4o.backends}
    assert by_provider["openai"] < by_provider["azure"]
    # Users are configured by digest only: no raw token in the file.
    assert not re.search(r"^\s*token:", text, re.MULTILINE)
    assert any(not user.admin for user in config.users.values())


def test_example_local_pool() -> None:
    config = load_config(_example("local-pool.yaml"), env={})
    local = [p for p in config.providers.values() if p.enabled]
    assert {p.base_url.split("/")[2].split(":")[0] for p in local} == {"127.0.0.1"}
    assert all(p.api_key == "" for p in local)
    assert {m.strategy for m in config.models.values()} >= {"least_latency", "round_robin"}
    billing = {b.billing_mode for m in config.models.values() for b in m.backends}
    assert billing == {"per_token", "per_request"}


def test_example_multi_instance_redis() -> None:
    path = _example("multi-instance-redis.yaml")
    config = load_config(path, env={"OPENAI_API_KEY": "sk-a"})
    assert config.rate_limit_store.backend == "redis"
    assert config.rate_limit_store.redis_url == "redis://127.0.0.1:6379/0"
    assert any(user.rate_limit is not None for user in config.users.values())
    config = load_config(path, env={"OPENAI_API_KEY": "sk-a", "REDIS_URL": "rediss://r:6380/3"})
    assert config.rate_limit_store.redis_url == "rediss://r:6380/3"


def test_example_berry_original_toml_uses_the_original_keys() -> None:
    path = _example("berry-original.toml")
    text = path.read_text(encoding="utf-8")
    for key in (
        "[settings.smart_ai]",
        "[settings.smart_ai.confidence_adjustments]",
        "backend_type",
        "timeout_seconds",
        "max_retries",
        "[[models.",
        ".rate_limit]",
        ".headers]",
        "lightweight_check_interval_seconds",
        "[settings.batch_metrics]",
    ):
        assert key in text
    config = load_config(path, env=dummy_env(text))
    # The original's keys with no effect here are accepted, each named with why.
    assert [key for key, _ in config.ignored] == [
        "settings.smart_ai.lightweight_check_interval_seconds",
        "settings.batch_metrics",
    ]
    assert all(why for _, why in config.ignored)
    assert all(p.base_url.endswith("/v1") for p in config.providers.values())
    assert {b.billing_mode for m in config.models.values() for b in m.backends} == {
        "per_token",
        "per_request",
    }
    app = config.users["app1"]
    assert set(app.allowed_models) == {"gpt_4o_mini", "gpt_4o"}
    assert app.rate_limit is not None
    assert config.users["admin"].admin is True


def test_the_originals_ignored_keys_are_still_validated_where_they_have_a_type() -> None:
    raw = {
        "providers": {"p": {"type": "mock"}},
        "models": {"m": {"backends": [{"provider": "p", "model": "x"}]}},
        "users": {"u": {"token": "a-user-token-0123456789"}},
        "settings": {"smart_ai": {"lightweight_check_interval_seconds": "often"}},
    }
    with pytest.raises(ConfigError) as info:
        build_config(raw, env={})
    assert any("lightweight_check_interval_seconds" in e for e in info.value.errors)
    raw["settings"] = {"batch_metrics": {"anything": [1, 2]}, "database": {"url": "x"}}
    assert [key for key, _ in build_config(raw, env={}).ignored] == [
        "settings.batch_metrics",
        "settings.database",
    ]
    raw.pop("settings")
    assert build_config(raw, env={}).ignored == ()


def test_a_provider_max_retries_of_0_is_the_originals_no_retry_one_attempt(
    tmp_path: Path,
) -> None:
    text = """
[providers.local]
name = "Local"
base_url = "http://127.0.0.1:8000"
api_key = ""
max_retries = 0

[models.m]
name = "m"
[[models.m.backends]]
provider = "local"
model = "x"

[users.u]
name = "U"
token = "u-token-0123456789abcdef"
"""
    config = load_config(write(tmp_path, "config.toml", text), env={})
    assert config.providers["local"].max_retries == 1
    negative = text.replace("max_retries = 0", "max_retries = -1")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "bad.toml", negative), env={})
    assert any("max_retries" in e for e in excinfo.value.errors)
