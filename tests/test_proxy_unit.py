"""Request validation and rewriting in the proxy (``proxy.py``, ``upstream.py``), unit by unit.

``parse_request`` decides which requests get a 400 before any upstream call (and which
code and ``param`` name the problem); ``upstream_body`` must change nothing but ``model``
(and the usage opt-in); the header filters decide what crosses the gateway in each
direction.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgspec
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from berry_proxy.context import request_id_from
from berry_proxy.errors import InvalidRequest
from berry_proxy.openai_request import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    Endpoint,
    OpenAIRequest,
    parse_request,
    upstream_body,
)
from berry_proxy.upstream import forwardable_request_headers, passable_response_headers

MESSAGES = [{"role": "user", "content": "Hi"}]


def member(body: OpenAIRequest, name: str) -> Any:
    """A top-level member of a parsed request, decoded."""
    return msgspec.json.decode(body.members[name])


def chat(**fields: Any) -> bytes:
    return orjson.dumps({"model": "gpt-test", "messages": MESSAGES, **fields})


def rejected(raw: bytes, endpoint: Endpoint = CHAT) -> tuple[str, str | None]:
    with pytest.raises(InvalidRequest) as info:
        parse_request(raw, endpoint)
    error = info.value
    assert error.status == 400
    envelope = error.envelope()["error"]
    assert envelope["type"] == "invalid_request"
    return envelope["code"], envelope["param"]


# --------------------------------------------------------------------------------------
# parse_request
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   ", b"\n\t"])
def test_empty_body_is_invalid_json(raw: bytes) -> None:
    assert rejected(raw) == ("invalid_json", None)


@pytest.mark.parametrize("raw", [b"{", b"{'model': 'x'}", b'{"model": "x",}', b"model=x", b"\xff"])
def test_malformed_json_is_invalid_json(raw: bytes) -> None:
    assert rejected(raw) == ("invalid_json", None)


@pytest.mark.parametrize("raw", [b"[]", b'[{"model": "x"}]', b'"text"', b"42", b"null", b"true"])
def test_non_object_is_invalid_json(raw: bytes) -> None:
    assert rejected(raw) == ("invalid_json", None)


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_missing_model(endpoint: Endpoint) -> None:
    raw = orjson.dumps({"messages": MESSAGES, "prompt": "x", "input": "x"})
    assert rejected(raw, endpoint) == ("missing_parameter", "model")
    raw = orjson.dumps({"model": None, "messages": MESSAGES, "prompt": "x", "input": "x"})
    assert rejected(raw, endpoint) == ("missing_parameter", "model")


@pytest.mark.parametrize("model", [42, "", ["gpt-4"], {"name": "gpt-4"}, True])
def test_model_must_be_a_non_empty_string(model: Any) -> None:
    assert rejected(orjson.dumps({"model": model, "messages": MESSAGES})) == (
        "invalid_parameter",
        "model",
    )


@pytest.mark.parametrize(
    ("endpoint", "field"), [(CHAT, "messages"), (COMPLETIONS, "prompt"), (EMBEDDINGS, "input")]
)
def test_missing_required_field(endpoint: Endpoint, field: str) -> None:
    assert rejected(orjson.dumps({"model": "m"}), endpoint) == ("missing_parameter", field)
    raw = orjson.dumps({"model": "m", field: None})
    assert rejected(raw, endpoint) == ("missing_parameter", field)


@pytest.mark.parametrize("messages", [[], "Hi", {"role": "user", "content": "Hi"}, 3])
def test_messages_must_be_a_non_empty_array(messages: Any) -> None:
    raw = orjson.dumps({"model": "m", "messages": messages})
    assert rejected(raw) == ("invalid_parameter", "messages")


@pytest.mark.parametrize(("endpoint", "field"), [(COMPLETIONS, "prompt"), (EMBEDDINGS, "input")])
def test_prompt_and_input_must_be_string_or_array(endpoint: Endpoint, field: str) -> None:
    for bad in ({"text": "x"}, 3, True):
        assert rejected(orjson.dumps({"model": "m", field: bad}), endpoint) == (
            "invalid_parameter",
            field,
        )
    for good in ("text", ["a", "b"], [[1, 2, 3]]):
        assert (
            member(parse_request(orjson.dumps({"model": "m", field: good}), endpoint), field)
            == good
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.01),
        ("temperature", -0.1),
        ("temperature", 100),
        ("top_p", 1.5),
        ("top_p", -0.01),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3),
        ("frequency_penalty", -3),
    ],
)
def test_sampling_fields_out_of_range(field: str, value: float) -> None:
    assert rejected(chat(**{field: value})) == ("invalid_parameter", field)


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", ["0.5", True, False, [0.5], {"v": 0.5}])
def test_sampling_fields_must_be_numbers(field: str, value: Any) -> None:
    code, param = rejected(chat(**{field: value}))
    assert (code, param) == ("invalid_parameter", field)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 0),
        ("temperature", 2),
        ("temperature", 0.7),
        ("top_p", 0),
        ("top_p", 1),
        ("presence_penalty", -2),
        ("presence_penalty", 2),
        ("frequency_penalty", -2.0),
        ("frequency_penalty", 1.5),
    ],
)
def test_sampling_fields_in_range_are_accepted(field: str, value: float) -> None:
    assert member(parse_request(chat(**{field: value}), CHAT), field) == value


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 2.0, "3", True])
def test_counts_must_be_positive_integers(field: str, value: Any) -> None:
    assert rejected(chat(**{field: value})) == ("invalid_parameter", field)


@pytest.mark.parametrize("field", ["n", "max_tokens", "max_completion_tokens"])
def test_positive_counts_are_accepted(field: str) -> None:
    assert member(parse_request(chat(**{field: 1}), CHAT), field) == 1
    assert member(parse_request(chat(**{field: 4096}), CHAT), field) == 4096


@pytest.mark.parametrize("value", ["true", 1, 0, "yes"])
def test_stream_must_be_boolean(value: Any) -> None:
    assert rejected(chat(stream=value)) == ("invalid_parameter", "stream")


@pytest.mark.parametrize("value", [True, "include_usage", [{"include_usage": True}], 1])
def test_stream_options_must_be_an_object(value: Any) -> None:
    assert rejected(chat(stream=True, stream_options=value)) == (
        "invalid_parameter",
        "stream_options",
    )


def test_null_optional_values_are_allowed() -> None:
    nulls = {
        name: None
        for name in (
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "n",
            "max_tokens",
            "max_completion_tokens",
            "stream",
            "stream_options",
        )
    }
    body = parse_request(chat(**nulls), CHAT)
    assert (body.model, body.stream, body.stream_options) == ("gpt-test", False, None)
    assert list(body.members) == ["model", "messages", *nulls]


def test_unknown_fields_pass_validation_untouched() -> None:
    extra = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_object"},
        "seed": 7,
        "logit_bias": {"50256": -100},
        "x_vendor_knob": [1, {"a": None}],
    }
    body = parse_request(chat(stream=False, **extra), CHAT)
    for key, value in extra.items():
        assert bytes(body.members[key]) == orjson.dumps(value)


def test_the_first_bad_field_is_named() -> None:
    # A request with several problems names one of them, never a different one.
    code, param = rejected(chat(temperature=5, top_p=-1))
    assert code == "invalid_parameter"
    assert param in {"temperature", "top_p"}


def test_wants_usage() -> None:
    def wants(**fields: Any) -> bool:
        return parse_request(chat(stream=True, **fields), CHAT).wants_usage

    assert wants(stream_options={"include_usage": True})
    assert not wants(stream_options={"include_usage": False})
    assert not wants(stream_options=None)
    assert not wants()


# --------------------------------------------------------------------------------------
# upstream_body
# --------------------------------------------------------------------------------------


def test_unchanged_request_is_forwarded_as_the_same_bytes() -> None:
    raw = b'{"model":  "up-model", "messages": [{"role":"user","content":"Hi \\u00e9"}]}'
    body = parse_request(raw, CHAT)
    assert upstream_body(body, "up-model", add_usage=False) is raw


def test_only_model_is_rewritten() -> None:
    fields = {
        "temperature": 0.25,
        "stream": False,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "seed": 7,
        "user": "end-user-1",
    }
    raw = chat(**fields)
    body = parse_request(raw, CHAT)
    out = upstream_body(body, "backend-model", add_usage=False)
    sent = orjson.loads(out)
    assert sent == {"model": "backend-model", "messages": MESSAGES, **fields}
    # Field order is kept too.
    assert list(sent) == list(orjson.loads(raw))
    assert body.model == "gpt-test"  # the parsed request itself is not mutated


def test_usage_opt_in_is_added_to_a_stream_without_options() -> None:
    raw = chat(stream=True)
    body = parse_request(raw, CHAT)
    sent = orjson.loads(upstream_body(body, "gpt-test", add_usage=True))
    assert sent == {
        "model": "gpt-test",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_usage_opt_in_merges_into_existing_stream_options() -> None:
    raw = chat(stream=True, stream_options={"include_obfuscation": False, "vendor": {"x": 1}})
    body = parse_request(raw, CHAT)
    sent = orjson.loads(upstream_body(body, "backend-model", add_usage=True))
    assert sent["model"] == "backend-model"
    assert sent["stream_options"] == {
        "include_obfuscation": False,
        "vendor": {"x": 1},
        "include_usage": True,
    }
    assert body.stream_options == {"include_obfuscation": False, "vendor": {"x": 1}}


def test_usage_opt_in_replaces_null_stream_options() -> None:
    raw = chat(stream=True, stream_options=None)
    body = parse_request(raw, CHAT)
    sent = orjson.loads(upstream_body(body, "gpt-test", add_usage=True))
    assert sent["stream_options"] == {"include_usage": True}


def test_non_ascii_content_survives_the_rewrite() -> None:
    messages = [{"role": "user", "content": "Grüß dich 👋 — ça va?"}]
    raw = orjson.dumps({"model": "gpt-test", "messages": messages})
    body = parse_request(raw, CHAT)
    sent = orjson.loads(upstream_body(body, "other", add_usage=False))
    assert sent["messages"] == messages


# --------------------------------------------------------------------------------------
# Header filters
# --------------------------------------------------------------------------------------


def test_forwardable_request_headers_drop_credentials_and_hop_by_hop() -> None:
    client = CIMultiDictProxy(
        CIMultiDict(
            {
                "Host": "gateway:3000",
                "Authorization": "Bearer client-token-0123456789",
                "api-key": "client-azure-key",
                "Cookie": "session=1",
                "Connection": "keep-alive",
                "Keep-Alive": "timeout=5",
                "Transfer-Encoding": "chunked",
                "TE": "trailers",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic eA==",
                "Content-Length": "123",
                "Accept-Encoding": "gzip, br",
                "Expect": "100-continue",
                "X-Request-ID": "client-chosen",
                "OpenAI-Organization": "org-client",
                "OpenAI-Project": "proj-client",
                "X-Forwarded-For": "10.0.0.1",
                "X-Forwarded-Port": "443",
                "Forwarded": "for=10.0.0.1",
                "X-Real-IP": "10.0.0.1",
                "True-Client-IP": "10.0.0.1",
                "Via": "1.1 lb",
                # aiohttp decoded the body already; the gateway sets its own Content-Type.
                "Content-Type": "application/x-www-form-urlencoded",
                "Content-Encoding": "gzip",
                # Kept:
                "User-Agent": "AsyncOpenAI/Python 1.50.0",
                "X-Stainless-Lang": "python",
                "OpenAI-Beta": "assistants=v2",
                "Accept": "application/json",
            }
        )
    )
    assert forwardable_request_headers(client) == {
        "User-Agent": "AsyncOpenAI/Python 1.50.0",
        "X-Stainless-Lang": "python",
        "OpenAI-Beta": "assistants=v2",
        "Accept": "application/json",
    }


@pytest.mark.parametrize(
    "name", ["authorization", "AUTHORIZATION", "Authorization", "aUtHoRiZaTiOn"]
)
def test_request_header_filter_is_case_insensitive(name: str) -> None:
    assert forwardable_request_headers({name: "Bearer secret", "x-keep": "1"}) == {"x-keep": "1"}


def test_passable_response_headers_drop_provider_details() -> None:
    upstream = CIMultiDictProxy(
        CIMultiDict(
            {
                "Content-Type": "application/json",
                "Content-Length": "512",
                "Content-Encoding": "gzip",
                "Transfer-Encoding": "chunked",
                "Connection": "keep-alive",
                "Date": "Tue, 01 Jan 2030 00:00:00 GMT",
                "Server": "cloudflare",
                "Set-Cookie": "__cf_bm=abc; path=/",
                "X-Request-ID": "req_upstream",
                "OpenAI-Organization": "org-provider",
                "OpenAI-Project": "proj-provider",
                "x-ratelimit-limit-requests": "10000",
                "X-RateLimit-Remaining-Tokens": "149984",
                "CF-Ray": "8a1b2c3d4e5f-AMS",
                "CF-Cache-Status": "DYNAMIC",
                "Alt-Svc": 'h3=":443"',
                # Provider and cloud details are not passed either (allow list).
                "X-Custom-Upstream": "yes",
                "x-ms-region": "West Europe",
                "apim-request-id": "4f1e",
                "Via": "1.1 azure",
                # Kept:
                "OpenAI-Processing-Ms": "312",
                "OpenAI-Version": "2020-10-01",
            }
        )
    )
    assert passable_response_headers(upstream) == {
        "Content-Type": "application/json",
        "OpenAI-Processing-Ms": "312",
        "OpenAI-Version": "2020-10-01",
    }


def test_response_header_filter_keeps_content_type_of_streams() -> None:
    headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    assert passable_response_headers(headers) == {"content-type": headers["content-type"]}


# --------------------------------------------------------------------------------------
# Request ids (sent upstream as X-Request-ID and returned to the client)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client_id", ["abc", "req_123", "2f1c0d6e-4b0a-4e8e-9c55-0123456789ab", "a.b:c-d_e", "x" * 128]
)
def test_sane_client_request_id_is_kept(client_id: str) -> None:
    assert request_id_from(client_id) == client_id


@pytest.mark.parametrize(
    "client_id",
    [
        None,
        "",
        "x" * 129,
        "has space",
        "line\r\nX-Injected: 1",
        'quote"',
        "<script>",
        "caf\u00e9",
        "tab\t",
    ],
)
def test_other_request_ids_are_replaced_by_a_generated_one(client_id: str | None) -> None:
    generated = request_id_from(client_id)
    assert generated != client_id
    assert request_id_from(generated) == generated  # itself a sane id
    assert generated != request_id_from(client_id)  # unique per request


def test_headers_named_in_connection_are_hop_by_hop() -> None:
    request = CIMultiDict(
        {"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "s", "X-Trace": "t"}
    )
    assert forwardable_request_headers(request) == {"X-Trace": "t"}


# --------------------------------------------------------------------------------------
# What the gateway checks is what goes upstream; checking costs no copy of the body
# --------------------------------------------------------------------------------------


def test_a_body_naming_model_twice_goes_upstream_with_the_one_checked() -> None:
    """The gateway reads the last ``model``; a provider may read the first. Forwarding
    both would let a user reach a model it was never checked for."""
    raw = b'{"model": "forbidden", "messages": [{"role": "user", "content": "x"}], "model": "ok"}'
    body = parse_request(raw, CHAT)
    assert body.model == "ok"
    sent = upstream_body(body, "ok", add_usage=False)
    assert sent.count(b'"model"') == 1
    assert orjson.loads(sent)["model"] == "ok"


def test_a_body_naming_stream_twice_is_rebuilt_too() -> None:
    raw = b'{"model": "m", "stream": true, "messages": [1], "stream": false}'
    body = parse_request(raw, CHAT)
    assert body.stream is False
    assert orjson.loads(upstream_body(body, "m", add_usage=False))["stream"] is False


@pytest.mark.parametrize("first", [b'"mod\\u0065l"', b'"\\u006dodel"', b'"mod\\u0065l" '])
def test_a_model_named_first_with_an_escape_is_not_forwarded_beside_the_checked_one(
    first: bytes,
) -> None:
    """``"mod\\u0065l"`` is ``"model"`` to a JSON parser, not to a byte count."""
    raw = b"{" + first + b': "forbidden", "messages": [1], "model": "ok"}'
    body = parse_request(raw, CHAT)
    assert body.model == "ok"
    sent = upstream_body(body, "ok", add_usage=False)
    assert b"forbidden" not in sent


def test_a_body_naming_stream_options_twice_is_rebuilt_with_the_usage_opt_in() -> None:
    raw = (
        b'{"model": "m", "stream": true, "messages": [1], '
        b'"stream_options": {"include_usage": false}, "stream_options": {"include_usage": true}}'
    )
    body = parse_request(raw, CHAT)
    sent = upstream_body(body, "m", add_usage=not body.wants_usage)
    assert sent.count(b'"stream_options"') == 1
    assert orjson.loads(sent)["stream_options"] == {"include_usage": True}


def test_utf8_is_checked_without_holding_the_body_as_text() -> None:
    text = "x" * (16 * 1024 * 1024) + "👋"  # one emoji: as a str, 4 bytes per character
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
    tracemalloc.start()
    try:
        parse_request(raw, CHAT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024  # a decoded copy would be 64 MiB


@pytest.mark.parametrize(
    "raw", [b'{"model":"m","messages":["\xff"]}', b'{"model":"m","messages":["\xe2\x82"]}']
)
def test_invalid_utf8_is_invalid_json(raw: bytes) -> None:
    assert rejected(raw) == ("invalid_json", None)
