"""What a reload changes: ids added, removed and changed, and what only a restart applies.

Only config ids and key names are reported (never a value: a changed ``api_key`` is
"provider openai changed", nothing more), so the answer of ``POST /admin/reload`` and the
reload's log line are safe to show anyone who may reload.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from .config import Config

# Settings the running server took at start-up and keeps until it restarts: the listening
# socket, aiohttp's per-connection limits, and the open rate-limit store (its counters
# are the state a reload must keep).
RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.keepalive_timeout_seconds",
    "server.send_timeout_seconds",
    "rate_limit_store",
)


def _ids(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(k for k in old.keys() & new.keys() if old[k] != new[k]),
    }


def changed_keys(old: object, new: object, prefix: str) -> list[str]:
    """Dotted names of the leaf fields that differ between two config dataclasses."""
    if not (is_dataclass(old) and is_dataclass(new)) or type(old) is not type(new):
        return [] if old == new else [prefix]
    found: list[str] = []
    for field in fields(old):
        before, after = getattr(old, field.name), getattr(new, field.name)
        if before != after:
            found += changed_keys(before, after, f"{prefix}.{field.name}")
    return found


def changes(old: Config, new: Config) -> dict[str, Any]:
    """What differs, by section: ids for providers, models and users; key names else."""
    found: dict[str, Any] = {
        "providers": _ids(old.providers, new.providers),
        "models": _ids(old.models, new.models),
        "users": _ids(old.users, new.users),
        "settings": changed_keys(old.settings, new.settings, "settings"),
        "server": changed_keys(old.server, new.server, "server"),
    }
    if old.rate_limit_store != new.rate_limit_store:
        found["rate_limit_store"] = ["rate_limit_store"]
    return found


def restart_required(old: Config, new: Config) -> list[str]:
    """The changed keys a reload cannot apply (they take effect at the next restart)."""
    changed = set(changed_keys(old.server, new.server, "server"))
    if old.rate_limit_store != new.rate_limit_store:
        changed.add("rate_limit_store")
    return [key for key in RESTART_ONLY if key in changed]


def nothing_changed(found: Mapping[str, Any]) -> bool:
    return not any(
        any(section.values()) if isinstance(section, Mapping) else section
        for section in found.values()
    )
