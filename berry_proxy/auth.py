"""Bearer-token authentication and model permissions.

Tokens are compared as sha256 digests with ``hmac.compare_digest`` against every user,
without an early exit, so the time taken says nothing about which token nearly matched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping
from typing import TypeVar

from .config import Config, ModelConfig, UserConfig
from .errors import AuthenticationFailed, InvalidRequest, PermissionDenied


class Access(enum.Enum):
    """Who may call an endpoint; set on handlers with ``@access(...)``."""

    PUBLIC = "public"
    USER = "user"
    ADMIN = "admin"
    # Public while ``server.public_status`` is true (the original's behaviour), else admin.
    STATUS = "status"


_Handler = TypeVar("_Handler", bound=Callable[..., object])


def access(level: Access) -> Callable[[_Handler], _Handler]:
    def mark(handler: _Handler) -> _Handler:
        handler.berry_access = level  # type: ignore[attr-defined]  # read by the auth middleware
        return handler

    return mark


def access_of(handler: object) -> Access:
    level = getattr(handler, "berry_access", Access.PUBLIC)
    return level if isinstance(level, Access) else Access.PUBLIC


class Authenticator:
    def __init__(self, users: Mapping[str, UserConfig]) -> None:
        self._users = tuple(users.values())

    def authenticate(self, authorization: str | None) -> UserConfig:
        """The user an ``Authorization`` header belongs to, or raise 401."""
        if not authorization:
            raise AuthenticationFailed("missing_token", "Authorization header is required")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("invalid_token", "Authorization must be 'Bearer <token>'")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: UserConfig | None = None
        for user in self._users:
            if hmac.compare_digest(digest, user.token_sha256):
                found = user
        if found is None or not found.enabled:
            raise AuthenticationFailed("invalid_token", "The provided token is invalid")
        return found


def require_admin(user: UserConfig) -> None:
    if not user.admin:
        raise PermissionDenied("admin_required", "This endpoint requires an admin token")


def resolve_model(config: Config, user: UserConfig, requested: str) -> ModelConfig:
    """The enabled model ``requested`` names, if this user may use it; else 400/403."""
    model = config.find_model(requested)
    if model is None or not model.enabled:
        raise InvalidRequest(
            "invalid_model",
            "The specified model does not exist",
            param="model",
            details={"model": requested},
        )
    if not user.may_use(model.id):
        raise PermissionDenied(
            "model_not_allowed",
            "You don't have permission to access this model",
            param="model",
            details={
                "model": requested,
                "allowed_models": [m.name for m in visible_models(config, user)],
            },
        )
    return model


def visible_models(config: Config, user: UserConfig) -> list[ModelConfig]:
    """Enabled models this user may call, in config order."""
    return [m for m in config.models.values() if m.enabled and user.may_use(m.id)]
