"""The OpenAI request bodies the gateway serves, and the little it must know of them.

The hot path validates by hand only the fields the gateway must understand (model, the
required input, the documented ranges of the sampling fields, stream options); every other
field passes through untouched. The body sent upstream is the client's own bytes whenever
nothing needs rewriting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidRequest, invalid_parameter, missing_parameter


@dataclass(frozen=True, slots=True)
class Endpoint:
    upstream_path: str  # relative to the provider's base URL
    required: str  # the field besides "model" that must be present
    streams: bool


CHAT = Endpoint("chat/completions", "messages", streams=True)
COMPLETIONS = Endpoint("completions", "prompt", streams=True)
EMBEDDINGS = Endpoint("embeddings", "input", streams=False)

# OpenAI's documented ranges for the sampling fields; checked before any upstream call.
_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}
_POSITIVE_INTS = ("n", "max_tokens", "max_completion_tokens")


def parse_request(raw: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """The request body as a dict, or a 400 naming the first bad field."""
    if not raw.strip():
        raise InvalidRequest("invalid_json", "The request body must be a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("invalid_json", f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("invalid_json", "The request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise missing_parameter("model")
    if not isinstance(model, str) or not model:
        raise invalid_parameter("model", "must be a non-empty string")
    required = body.get(endpoint.required)
    if required is None:
        raise missing_parameter(endpoint.required)
    if endpoint is CHAT:
        if not isinstance(required, list) or not required:
            raise invalid_parameter("messages", "must be a non-empty array of messages")
    elif not isinstance(required, str | list):
        raise invalid_parameter(endpoint.required, "must be a string or an array")
    for name, (low, high) in _RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_parameter(name, "must be a number")
        if not low <= value <= high:
            raise invalid_parameter(name, f"must be between {low:g} and {high:g}")
    for name in _POSITIVE_INTS:
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise invalid_parameter(name, "must be a positive integer")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_parameter("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid_parameter("stream_options", "must be an object")
    return body


def wants_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def upstream_body(raw: bytes, body: dict[str, Any], backend_model: str, add_usage: bool) -> bytes:
    """The client's request for this backend: only ``model`` (and usage opt-in) rewritten."""
    if body["model"] == backend_model and not add_usage:
        return raw
    rewritten = dict(body, model=backend_model)
    if add_usage:
        options = body.get("stream_options") or {}
        rewritten["stream_options"] = {**options, "include_usage": True}
    try:
        return orjson.dumps(rewritten)
    except orjson.JSONEncodeError:
        # orjson reads deeper nesting than it writes (1024 vs 254 levels); the standard
        # library writes whatever was read.
        return json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()
