"""The OpenAI request bodies the gateway serves, and the little it must know of them.

A body is decoded only to its top level: each top-level member stays its raw JSON bytes
(``msgspec.Raw``, a view into the body), and only the handful of small members the gateway
must understand are decoded further (``model``, the sampling fields, the counts, ``stream``
and ``stream_options``). The whole body is still validated as JSON in the same pass, but a
32 MiB array of tiny objects never becomes millions of Python objects: decoding it costs
one pass over its bytes and no memory beyond the body itself.

The body sent upstream is the client's own bytes whenever nothing needs rewriting;
otherwise the top level is rebuilt from the raw members with only ``model`` (and the usage
opt-in of ``stream_options``) replaced, so every other member goes upstream byte for byte.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from .errors import InvalidRequest, invalid_parameter, missing_parameter

Body = bytes | bytearray

# Members decoded into Python values are at most this large; a bigger value of a field
# that must be a number, a boolean, a short string or a small object is a bad request, and
# decoding it could build a large object tree.
MAX_DECODED_MEMBER_BYTES = 64 * 1024

_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_VALUE = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()
# First bytes of raw JSON values, as memoryview items (ints).
_OPEN_ARRAY, _CLOSE_ARRAY, _QUOTE, _NULL = b'[]"n'
_WHITESPACE = b" \t\r\n"


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
# The members decoded into Python values: the ones the gateway checks or reads.
_DECODED = frozenset({"model", "stream", "stream_options", *_RANGES, *_POSITIVE_INTS})


class OpenAIRequest(NamedTuple):
    """A validated request body: its bytes, its top-level members, what the gateway read."""

    raw: Body
    members: dict[str, msgspec.Raw]
    model: str  # the model asked for: the body's, or the deployment an Azure path names
    body_model: str | None  # the body's own "model" member, if it is a string
    stream: bool  # the client asked for a stream (and the endpoint streams)
    stream_options: dict[str, Any] | None

    @property
    def wants_usage(self) -> bool:
        options = self.stream_options
        return options is not None and options.get("include_usage") is True


# stream_options is a small flat object (include_usage, include_obfuscation); the gateway
# re-encodes it to add include_usage, and refuses deeper nesting than this.
MAX_STREAM_OPTIONS_DEPTH = 8


def decode_top_level(raw: Body) -> dict[str, msgspec.Raw]:
    """The body's top-level members as raw JSON, or a 400 ``invalid_json``.

    Validates the whole document (syntax, UTF-8) without building its values.
    """
    if not raw or raw.isspace():  # isspace stops at the first other byte: no copy
        raise InvalidRequest("invalid_json", "The request body must be a JSON object")
    if not raw.isascii() and not _valid_utf8(raw):
        raise InvalidRequest("invalid_json", "The request body is not valid UTF-8")
    try:
        return _TOP_LEVEL.decode(raw)
    except msgspec.ValidationError:
        raise InvalidRequest("invalid_json", "The request body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        # msgspec's messages name the problem and a byte offset, never the content.
        raise InvalidRequest("invalid_json", f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest(
            "invalid_json", "The request body is nested too deeply to be a sane request"
        ) from None


# UTF-8 is checked in slices of this size, so the check never holds the body as text.
_UTF8_SLICE = 64 * 1024


def _valid_utf8(raw: Body) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with memoryview(raw) as view:
            for start in range(0, len(view), _UTF8_SLICE):
                decoder.decode(view[start : start + _UTF8_SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def member_value(members: dict[str, msgspec.Raw], name: str) -> Any:
    """The decoded value of a small top-level member (None when absent or null)."""
    raw = members.get(name)
    return None if raw is None else _decode_member(name, raw)


def _decode_member(name: str, raw: msgspec.Raw) -> Any:
    if len(raw) > MAX_DECODED_MEMBER_BYTES:
        raise invalid_parameter(name, f"is larger than {MAX_DECODED_MEMBER_BYTES} bytes")
    try:
        return _VALUE.decode(raw)
    except msgspec.DecodeError:
        # Valid JSON msgspec cannot represent, such as a number out of range (1e999).
        raise invalid_parameter(name, "is not a value the gateway can read") from None


def parse_request(raw: Body, endpoint: Endpoint, deployment: str | None = None) -> OpenAIRequest:
    """The validated request, or a 400 naming the first bad field.

    ``deployment`` is the model an Azure-style path names
    (``/openai/deployments/{deployment}/...``): as on Azure, it is the model served, and
    the body need not name one.
    """
    members = decode_top_level(raw)
    # One pass over the members, decoding only those the gateway reads.
    values = {
        name: _decode_member(name, member) for name, member in members.items() if name in _DECODED
    }
    body_model = values.get("model")
    if body_model is not None and (not isinstance(body_model, str) or not body_model):
        raise invalid_parameter("model", "must be a non-empty string")
    model = deployment or body_model
    if model is None:
        raise missing_parameter("model")
    _check_required(members, endpoint)
    for name, value in values.items():
        if value is not None:
            _check_field(name, value)
    options = values.get("stream_options")
    return OpenAIRequest(
        raw=raw,
        members=members,
        model=model,
        body_model=body_model,
        stream=endpoint.streams and values.get("stream") is True,
        stream_options=options,
    )


def _check_field(name: str, value: Any) -> None:
    """The documented type and range of one decoded field (not ``model``), or a 400."""
    bounds = _RANGES.get(name)
    if bounds is not None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid_parameter(name, "must be a number")
        low, high = bounds
        if not low <= value <= high:
            raise invalid_parameter(name, f"must be between {low:g} and {high:g}")
    elif name in _POSITIVE_INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid_parameter(name, "must be a positive integer")
    elif name == "stream":
        if not isinstance(value, bool):
            raise invalid_parameter("stream", "must be a boolean")
    elif name == "stream_options":
        if not isinstance(value, dict):
            raise invalid_parameter("stream_options", "must be an object")
        if _depth(value, MAX_STREAM_OPTIONS_DEPTH) > MAX_STREAM_OPTIONS_DEPTH:
            raise invalid_parameter(
                "stream_options", f"is nested deeper than {MAX_STREAM_OPTIONS_DEPTH} levels"
            )


def _depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests (a scalar is 0), counted up to ``limit`` + 1 at most."""
    deepest = 0
    level: list[Any] = [value]
    while level and deepest <= limit:
        children: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(item.values())
            elif isinstance(item, list):
                children.extend(item)
        if children or any(isinstance(item, dict | list) for item in level):
            deepest += 1
        level = children
    return deepest


def _check_required(members: dict[str, msgspec.Raw], endpoint: Endpoint) -> None:
    """The endpoint's input member is present and of the right kind, judged by its bytes
    (the document is valid JSON already, so an array has its closing bracket)."""
    name = endpoint.required
    raw = members.get(name)
    if raw is None:
        raise missing_parameter(name)
    view = memoryview(raw)
    first = view[0]
    if first == _NULL:
        raise missing_parameter(name)
    if endpoint is CHAT:
        if first != _OPEN_ARRAY:
            raise invalid_parameter("messages", "must be a non-empty array of messages")
        index = 1
        while view[index] in _WHITESPACE:
            index += 1
        if view[index] == _CLOSE_ARRAY:
            raise invalid_parameter("messages", "must be a non-empty array of messages")
    elif first not in (_OPEN_ARRAY, _QUOTE):
        raise invalid_parameter(name, "must be a string or an array")


def _duplicates_possible(raw: Body) -> bool:
    """Could ``raw`` name ``model``, ``stream`` or ``stream_options`` twice? The gateway
    reads the last one (as msgspec does); a provider might read the first, and serve a
    model the user may not use, or leave out the usage the gateway counts on. Rebuilding
    the top level keeps one of each. (The check counts every quoted ``"model"``, nested
    ones too, and takes any member name spelled with a ``\\u00XX``
    escape, such as ``"mod\\u0065l"``, for a possible duplicate: a false alarm only costs
    the rebuild.)"""
    return (
        raw.count(b'"model"') > 1
        or raw.count(b'"stream"') > 1
        or raw.count(b'"stream_options"') > 1
        or (b"\\u00" in raw and _ESCAPED_NAME.search(raw) is not None)
    )


# A member name (a string followed by ":") holding a \u00XX escape of an ASCII character.
_ESCAPED_NAME = re.compile(rb'"[^"\\]*(?:\\u00[0-9a-fA-F]{2}[^"\\]*)+"\s*:')


def max_tokens_of(request: OpenAIRequest) -> int | None:
    """The completion tokens the request allows (``max_completion_tokens``, the newer
    name, else ``max_tokens``), or None when it names no positive integer."""
    members = request.members
    for name in ("max_completion_tokens", "max_tokens"):
        raw = members.get(name)
        if raw is None:
            continue
        try:
            value = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def upstream_body(request: OpenAIRequest, backend_model: str, add_usage: bool) -> Body:
    """The client's request for this backend: only ``model`` (and usage opt-in) rewritten.

    Every other member goes out as the raw bytes the client sent (``msgspec`` writes a
    ``Raw`` member as it is); only the top level's punctuation is the gateway's.
    """
    if (
        request.body_model == backend_model
        and not add_usage
        and not _duplicates_possible(request.raw)
    ):
        return request.raw
    members: dict[str, Any] = dict(request.members)
    members["model"] = backend_model
    if add_usage:
        members["stream_options"] = {**(request.stream_options or {}), "include_usage": True}
    return _ENCODER.encode(members)
