"""Bearer-token authentication, model permissions and the admin rule (``auth.py``).

What a client sees: which 401 code a bad ``Authorization`` header gets, which model names a
user may call and see, and which users count as admins.
"""

from __future__ import annotations

from typing import Any

import pytest

from berry_proxy.app import create_app
from berry_proxy.auth import (
    Access,
    Authenticator,
    UndeclaredAccess,
    access,
    declared_access,
    require_admin,
    resolve_model,
    visible_models,
)
from berry_proxy.config import Config, build_config, hash_token
from berry_proxy.errors import AuthenticationFailed, GatewayError, InvalidRequest, PermissionDenied

ADMIN_TOKEN = "auth-admin-token-0123456789"
LIMITED_TOKEN = "auth-limited-token-0123456"
OFF_TOKEN = "auth-disabled-token-012345"
HASHED_TOKEN = "auth-hashed-token-01234567"
NOT_ADMIN_TOKEN = "auth-not-admin-token-01234"


def raw_config() -> dict[str, Any]:
    return {
        "providers": {"p": {"type": "mock"}},
        "models": {
            # Key and public name differ on purpose.
            "gpt4-internal": {"name": "gpt-4", "backends": [{"provider": "p", "model": "m4"}]},
            "mini": {"name": "gpt-4o-mini", "backends": [{"provider": "p", "model": "m1"}]},
            "legacy": {
                "name": "gpt-3.5",
                "enabled": False,
                "backends": [{"provider": "p", "model": "m3"}],
            },
        },
        "users": {
            "root": {"token": ADMIN_TOKEN},
            # One by public name, one by key: both forms are accepted.
            "limited": {"token": LIMITED_TOKEN, "allowed_models": ["gpt-4o-mini", "legacy"]},
            "off": {"token": OFF_TOKEN, "enabled": False},
            "hashed": {"token_sha256": hash_token(HASHED_TOKEN), "allowed_models": ["mini"]},
            "everything-but-admin": {"token": NOT_ADMIN_TOKEN, "admin": False},
        },
    }


@pytest.fixture
def config() -> Config:
    return build_config(raw_config(), env={})


@pytest.fixture
def auth(config: Config) -> Authenticator:
    return Authenticator(config.users)


def expect_error(error: GatewayError, status: int, error_type: str, code: str) -> dict[str, Any]:
    envelope: dict[str, Any] = error.envelope()["error"]
    assert (error.status, envelope["type"], envelope["code"]) == (status, error_type, code)
    return envelope


# --------------------------------------------------------------------------------------
# Authenticator
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, ""])
def test_missing_authorization_is_missing_token(auth: Authenticator, header: str | None) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(header)
    expect_error(info.value, 401, "authentication_error", "missing_token")


@pytest.mark.parametrize(
    "header",
    [
        f"Basic {ADMIN_TOKEN}",
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,  # no scheme at all
        "Bearer",
        "Bearer ",
        "Bearer    ",
    ],
)
def test_malformed_authorization_is_invalid_token(auth: Authenticator, header: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(header)
    expect_error(info.value, 401, "authentication_error", "invalid_token")


@pytest.mark.parametrize(
    "token",
    [
        "not-a-configured-token-at-all",
        ADMIN_TOKEN[:-1],  # one character short
        ADMIN_TOKEN + "x",
        ADMIN_TOKEN.upper(),  # tokens are case-sensitive
        hash_token(HASHED_TOKEN),  # the digest itself is not a credential
    ],
)
def test_unknown_token_is_invalid_token(auth: Authenticator, token: str) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(f"Bearer {token}")
    expect_error(info.value, 401, "authentication_error", "invalid_token")


def test_disabled_user_is_invalid_token(auth: Authenticator) -> None:
    with pytest.raises(AuthenticationFailed) as info:
        auth.authenticate(f"Bearer {OFF_TOKEN}")
    envelope = expect_error(info.value, 401, "authentication_error", "invalid_token")
    # Indistinguishable from a wrong token: nothing tells the caller the user exists.
    assert "disabled" not in envelope["message"].lower()


@pytest.mark.parametrize(
    ("token", "user_id"),
    [
        (ADMIN_TOKEN, "root"),
        (LIMITED_TOKEN, "limited"),
        (HASHED_TOKEN, "hashed"),  # token_sha256 in the file, raw token on the wire
        (NOT_ADMIN_TOKEN, "everything-but-admin"),
    ],
)
def test_valid_token_authenticates_its_user(auth: Authenticator, token: str, user_id: str) -> None:
    assert auth.authenticate(f"Bearer {token}").id == user_id


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(auth: Authenticator, scheme: str) -> None:
    assert auth.authenticate(f"{scheme} {ADMIN_TOKEN}").id == "root"


def test_surrounding_whitespace_around_token_is_ignored(auth: Authenticator) -> None:
    assert auth.authenticate(f"Bearer   {ADMIN_TOKEN}  ").id == "root"


# --------------------------------------------------------------------------------------
# resolve_model / visible_models
# --------------------------------------------------------------------------------------


def test_unknown_model_is_400_invalid_model(config: Config) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_model(config, config.users["root"], "gpt-5-turbo")
    envelope = expect_error(info.value, 400, "invalid_request", "invalid_model")
    assert envelope["param"] == "model"
    assert envelope["details"] == {"model": "gpt-5-turbo"}


def test_unknown_model_is_invalid_model_for_a_restricted_user_too(config: Config) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_model(config, config.users["limited"], "gpt-5-turbo")
    expect_error(info.value, 400, "invalid_request", "invalid_model")


@pytest.mark.parametrize("user_id", ["root", "limited"])
@pytest.mark.parametrize("requested", ["gpt-3.5", "legacy"])
def test_disabled_model_is_invalid_model(config: Config, user_id: str, requested: str) -> None:
    # "limited" is even allowed the disabled model explicitly.
    with pytest.raises(InvalidRequest) as info:
        resolve_model(config, config.users[user_id], requested)
    envelope = expect_error(info.value, 400, "invalid_request", "invalid_model")
    assert envelope["details"] == {"model": requested}


def test_restricted_user_gets_403_with_public_allowed_names(config: Config) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve_model(config, config.users["limited"], "gpt-4")
    envelope = expect_error(info.value, 403, "permission_error", "model_not_allowed")
    assert envelope["param"] == "model"
    assert envelope["details"]["model"] == "gpt-4"
    # Public names, never config keys, and only models that can be called: "legacy" is
    # allowed to this user but disabled, so listing it would send the caller to a 400.
    assert envelope["details"]["allowed_models"] == ["gpt-4o-mini"]


def test_hashed_user_restriction_lists_public_names(config: Config) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve_model(config, config.users["hashed"], "gpt4-internal")
    assert info.value.envelope()["error"]["details"]["allowed_models"] == ["gpt-4o-mini"]


@pytest.mark.parametrize("requested", ["gpt-4o-mini", "mini"])
def test_allowed_model_resolves_by_public_name_or_key(config: Config, requested: str) -> None:
    for user_id in ("limited", "hashed", "root"):
        assert resolve_model(config, config.users[user_id], requested).id == "mini"


def test_unrestricted_users_reach_every_enabled_model(config: Config) -> None:
    for user_id in ("root", "everything-but-admin"):
        user = config.users[user_id]
        assert resolve_model(config, user, "gpt-4").id == "gpt4-internal"
        assert resolve_model(config, user, "gpt-4o-mini").id == "mini"


def test_visible_models_are_enabled_allowed_in_config_order(config: Config) -> None:
    def names(user_id: str) -> list[str]:
        return [m.name for m in visible_models(config, config.users[user_id])]

    assert names("root") == ["gpt-4", "gpt-4o-mini"]
    assert names("everything-but-admin") == ["gpt-4", "gpt-4o-mini"]
    assert names("limited") == ["gpt-4o-mini"]  # its other model is disabled
    assert names("hashed") == ["gpt-4o-mini"]


# --------------------------------------------------------------------------------------
# Admin
# --------------------------------------------------------------------------------------


def test_require_admin_rejects_non_admins_with_403(config: Config) -> None:
    require_admin(config.users["root"])  # no exception
    for user_id in ("limited", "hashed", "everything-but-admin"):
        with pytest.raises(PermissionDenied) as info:
            require_admin(config.users[user_id])
        expect_error(info.value, 403, "permission_error", "admin_required")


def test_admin_default_follows_allowed_models() -> None:
    raw = raw_config()
    raw["users"]["explicit-empty"] = {"token": "auth-explicit-empty-01234", "allowed_models": []}
    raw["users"]["restricted-admin"] = {
        "token": "auth-restricted-admin-0123",
        "allowed_models": ["mini"],
        "admin": True,
    }
    users = build_config(raw, env={}).users
    # Empty (or absent) allowed_models means every model, and by default the admin views.
    assert users["root"].admin is True
    assert users["explicit-empty"].admin is True
    # A restricted user is not an admin unless the config says so.
    assert users["limited"].admin is False
    assert users["hashed"].admin is False
    assert users["restricted-admin"].admin is True
    # admin: false is honoured for a user with every model.
    assert users["everything-but-admin"].admin is False
    assert users["everything-but-admin"].allowed_models == ()


# --------------------------------------------------------------------------------------
# Every route declares who may call it (SPEC §5): access fails closed
# --------------------------------------------------------------------------------------


async def undeclared(request: object) -> None:
    """A handler nobody marked with @access."""


def test_a_handler_without_a_declaration_is_refused() -> None:
    with pytest.raises(UndeclaredAccess, match="undeclared"):
        declared_access(undeclared)


def test_declared_levels_are_read_back() -> None:
    for level in Access:

        async def handler(request: object) -> None:
            """Marked below."""

        assert declared_access(access(level)(handler)) is level


def test_the_app_refuses_to_start_with_an_undeclared_route(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("berry_proxy.status.v1_health", undeclared)
    with pytest.raises(UndeclaredAccess):
        create_app(config, health_checks=False)


def test_every_route_of_the_app_declares_its_access(config: Config) -> None:
    app = create_app(config, health_checks=False)
    routes = list(app.router.routes())
    assert len(routes) >= 13
    for route in routes:
        declared_access(route.handler)
