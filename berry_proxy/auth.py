"""Token authentication (bearer or ``api-key``), model permissions and access levels.

Tokens are never kept or compared raw: users are found by the sha256 digest of the
presented token (see ``Authenticator``).
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


class UndeclaredAccess(Exception):
    """A route's handler does not say who may call it."""


def declared_access(handler: object) -> Access:
    """The access level ``handler`` declares with ``@access``; raises if it has none.

    Access fails closed: a handler nobody marked is never taken for public.
    """
    level = getattr(handler, "berry_access", None)
    if not isinstance(level, Access):
        name = getattr(handler, "__qualname__", repr(handler))
        raise UndeclaredAccess(f"route handler {name} declares no access level (@access)")
    return level


class Authenticator:
    """Finds the user a bearer token belongs to.

    Users are indexed by the sha256 digest of their token. Looking up the digest leaks
    nothing useful through timing: an attacker cannot steer a digest towards a valid one
    without already knowing a token. The final comparison is ``hmac.compare_digest``.
    """

    def __init__(self, users: Mapping[str, UserConfig]) -> None:
        self._by_digest = {user.token_sha256: user for user in users.values()}

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> UserConfig:
        """The user a request's token belongs to, or raise 401.

        The token is ``Authorization: Bearer <token>`` (the scheme in any case) or, from
        Azure OpenAI SDKs, ``api-key: <token>``; ``Authorization`` wins when both are sent.
        """
        if authorization:
            scheme, _, token = authorization.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise AuthenticationFailed(
                    "invalid_token", "Authorization must be 'Bearer <token>'"
                )
        elif api_key is not None and api_key.strip():
            token = api_key.strip()
        else:
            raise AuthenticationFailed(
                "missing_token",
                "A token is required: 'Authorization: Bearer <token>' or 'api-key: <token>'",
            )
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        user = self._by_digest.get(digest)
        if user is None or not hmac.compare_digest(digest, user.token_sha256) or not user.enabled:
            raise AuthenticationFailed("invalid_token", "The provided token is invalid")
        return user


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
