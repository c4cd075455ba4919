"""Hot reload in process: ``POST /admin/reload`` (SIGHUP's twin), what it swaps and keeps.

A reload reads the file the gateway was started from; these tests rewrite that file and
reload through the endpoint, then look at what clients and the admin views see. The
signal itself, in a real process, is in ``test_lifecycle.py``.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from berry_proxy import keys
from berry_proxy.app import create_app
from berry_proxy.breaker import BreakerState
from berry_proxy.config import build_config, load_config
from berry_proxy.config_diff import changes, restart_required
from berry_proxy.runtime import Gateway
from tests.conftest import (
    ADMIN_TOKEN,
    USER_TOKEN,
    AppServer,
    FakeUpstream,
    chat_body,
    gateway_config,
)

Reloadable = Callable[[dict[str, Any]], Awaitable[TestServer]]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = {"Authorization": f"Bearer {USER_TOKEN}"}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "berry.yaml"


@pytest.fixture
def start_reloadable(serve_app: AppServer, config_file: Path) -> Reloadable:
    """Serve ``raw`` written to ``config_file``: the file a reload reads again."""

    async def start(raw: dict[str, Any]) -> TestServer:
        write(config_file, raw)
        config = build_config(raw, env={})
        return await serve_app(
            create_app(config, config_path=str(config_file), health_checks=False)
        )

    return start


def write(path: Path, raw: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(raw))  # JSON is YAML


def gateway_of(server: TestServer) -> Gateway:
    return server.app[keys.GATEWAY]


async def reload(server: TestServer, token: str = ADMIN_TOKEN) -> tuple[int, dict[str, Any]]:
    async with (
        server_session(server) as session,
        session.post("/admin/reload", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        return response.status, await response.json()


def server_session(server: TestServer) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=f"http://127.0.0.1:{server.port}")


async def chat(
    server: TestServer, model: str = "gpt-test", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with (
        server_session(server) as session,
        session.post(
            "/v1/chat/completions",
            data=chat_body(model=model),
            headers={"Content-Type": "application/json", **(headers or ADMIN)},
        ) as response,
    ):
        return response.status, await response.json()


async def system_stats(server: TestServer) -> dict[str, Any]:
    async with (
        server_session(server) as session,
        session.get("/admin/system-stats", headers=ADMIN) as response,
    ):
        assert response.status == 200
        data: dict[str, Any] = await response.json()
        return data


async def test_reload_serves_an_added_model_and_refuses_a_removed_user(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    assert (await chat(server, "gpt-test", USER))[0] == 200
    assert (await chat(server, "gpt-new"))[0] == 400  # not a model yet

    new = copy.deepcopy(raw)
    new["models"]["gpt-new"] = {"backends": [{"provider": "up1", "model": "up-model"}]}
    del new["users"]["restricted"]
    write(config_file, new)
    status, answer = await reload(server)

    assert status == 200, answer
    assert answer["reloaded"] is True
    assert answer["config_generation"] == 2
    assert answer["changes"]["models"] == {"added": ["gpt-new"], "removed": [], "changed": []}
    assert answer["changes"]["users"]["removed"] == ["restricted"]
    assert answer["restart_required"] == []
    assert (await chat(server, "gpt-new"))[0] == 200
    status, error = await chat(server, "gpt-test", USER)
    assert status == 401, error
    assert error["error"]["code"] == "invalid_token"
    stats = await system_stats(server)
    assert stats["config_generation"] == 2
    assert stats["config_reloads"] == {"success": 1, "failed": 0}


async def test_a_broken_file_is_refused_with_every_error_and_the_old_config_serves(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    broken = copy.deepcopy(raw)
    broken["models"]["gpt-test"]["backends"][0]["provider"] = "nowhere"
    broken["users"]["admin"]["token"] = "short"
    write(config_file, broken)

    status, answer = await reload(server)

    assert status == 400
    error = answer["error"]
    assert error["code"] == "invalid_config"
    assert error["details"]["config_generation"] == 1
    text = " ".join(error["details"]["errors"])
    assert "nowhere" in text
    assert "token" in text
    assert len(error["details"]["errors"]) >= 2
    assert (await chat(server))[0] == 200  # the old config, old token included
    stats = await system_stats(server)
    assert stats["config_generation"] == 1
    assert stats["config_reloads"] == {"success": 0, "failed": 1}

    config_file.write_text("models: [unclosed\n")  # noqa: ASYNC240  # not even YAML; tiny
    status, answer = await reload(server)
    assert status == 400
    assert answer["error"]["details"]["errors"]
    assert (await chat(server))[0] == 200


async def test_reload_needs_an_admin_token(
    start_reloadable: Reloadable, upstream: FakeUpstream
) -> None:
    server = await start_reloadable(gateway_config(upstream))
    status, answer = await reload(server, USER_TOKEN)
    assert status == 403
    assert answer["error"]["code"] == "admin_required"
    assert gateway_of(server).runtime.generation == 1


async def test_state_carries_over_for_unchanged_backends_and_not_for_changed_providers(
    start_reloadable: Reloadable,
    config_file: Path,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
) -> None:
    raw = gateway_config(upstream, upstream2, circuit_breaker_failure_threshold=1)
    server = await start_reloadable(raw)
    upstream.mode = "reset"  # up1's provider breaker opens; up2 serves
    before = gateway_of(server).runtime
    up1, up2 = before.pool.backends["gpt-test"]
    # The router picks at random: until it has tried up1 (at most 64 requests).
    for _ in range(64):
        assert (await chat(server))[0] == 200
        if up1.provider.breaker.state is BreakerState.OPEN:
            break
    assert up1.provider.breaker.state is BreakerState.OPEN
    served_by_up2 = up2.stats.successful_requests
    confidence = up1.confidence
    assert served_by_up2 >= 1

    new = copy.deepcopy(raw)
    new["models"]["gpt-test"]["backends"][1]["weight"] = 3  # a backend's weight only
    new["providers"]["up2"]["idle_timeout_seconds"] = 3  # up2's provider config changes
    write(config_file, new)
    assert (await reload(server))[0] == 200

    after = gateway_of(server).runtime
    assert after is not before
    new_up1, new_up2 = after.pool.backends["gpt-test"]
    # up1 is unchanged: its breaker, stats and confidence are the same objects.
    assert new_up1.provider is up1.provider
    assert new_up1.provider.breaker.state is BreakerState.OPEN
    assert new_up1.stats is up1.stats
    assert new_up1.confidence is confidence
    # up2's provider changed: it starts afresh, with the new weight.
    assert new_up2.provider is not up2.provider
    assert new_up2.stats.total_requests == 0
    assert new_up2.config.weight == 3
    # Model totals outlive the reload.
    assert after.pool.model_stats["gpt-test"] is before.pool.model_stats["gpt-test"]
    assert new_up1.recovery is up1.recovery
    # The open breaker still keeps requests off up1.
    upstream.requests.clear()
    assert (await chat(server))[0] == 200
    assert upstream.requests == []


async def test_rate_limit_windows_carry_over(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["users"]["restricted"]["rate_limit"] = {"requests_per_minute": 2}
    server = await start_reloadable(raw)
    assert (await chat(server, "gpt-test", USER))[0] == 200
    assert (await chat(server, "gpt-test", USER))[0] == 200

    new = copy.deepcopy(raw)
    new["models"]["gpt-new"] = {"backends": [{"provider": "up1", "model": "up-model"}]}
    write(config_file, new)
    assert (await reload(server))[0] == 200

    status, error = await chat(server, "gpt-test", USER)
    assert status == 429, error
    assert error["error"]["details"]["limit"] == "requests_per_minute"


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    upstream.mode = "gated"
    async with (
        server_session(server) as session,
        session.post(
            "/v1/chat/completions",
            data=chat_body(stream=True),
            headers={"Content-Type": "application/json", **ADMIN},
        ) as response,
    ):
        assert response.status == 200
        await upstream.first_chunk_sent.wait()
        new = copy.deepcopy(raw)
        del new["models"]["gpt-test"]  # its model is gone from the new config
        new["models"]["gpt-new"] = {"backends": [{"provider": "up1", "model": "up-model"}]}
        new["users"]["restricted"]["allowed_models"] = ["gpt-new"]
        write(config_file, new)
        status, answer = await reload(server)
        assert status == 200, answer
        assert answer["changes"]["models"]["removed"] == ["gpt-test"]
        upstream.gate.set()
        body = await response.read()
    assert body.rstrip().endswith(b"data: [DONE]")
    assert (await chat(server, "gpt-test"))[0] == 400  # new requests: the new config
    assert (await chat(server, "gpt-new"))[0] == 200


async def test_concurrent_reloads_run_one_at_a_time(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    server = await start_reloadable(gateway_config(upstream))
    results = await asyncio.gather(*(reload(server) for _ in range(5)))
    assert sorted(answer["config_generation"] for _, answer in results) == [2, 3, 4, 5, 6]
    assert gateway_of(server).runtime.generation == 6


async def test_reload_without_a_config_file_says_so(
    serve_app: AppServer, upstream: FakeUpstream
) -> None:
    server = await serve_app(
        create_app(build_config(gateway_config(upstream), env={}), health_checks=False)
    )
    status, answer = await reload(server)
    assert status == 400
    assert "not started from a config file" in answer["error"]["details"]["errors"][0]


async def test_reload_counts_both_outcomes_in_prometheus(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    assert (await reload(server))[0] == 200
    config_file.write_text("providers: 7\n")  # noqa: ASYNC240  # a tiny file
    assert (await reload(server))[0] == 400
    async with server_session(server) as session, session.get("/prometheus") as response:
        text = await response.text()
    assert 'berry_config_reloads_total{result="success"} 1.0' in text
    assert 'berry_config_reloads_total{result="failed"} 1.0' in text


def test_diff_names_ids_and_keys_never_values() -> None:
    raw: dict[str, Any] = {
        "providers": {
            "p": {"type": "openai", "base_url": "http://127.0.0.1:9", "api_key": "sk-old"}
        },
        "models": {"m": {"backends": [{"provider": "p", "model": "x"}]}},
        "users": {"u": {"token": "t" * 20}},
    }
    old = build_config(raw, env={})
    new_raw = copy.deepcopy(raw)
    new_raw["providers"]["p"]["api_key"] = "sk-new-secret"
    new_raw["server"] = {"port": 4000, "public_status": False}
    new_raw["settings"] = {"max_retries": 5}
    new = build_config(new_raw, env={})
    found = changes(old, new)
    assert found["providers"]["changed"] == ["p"]
    assert found["server"] == ["server.port", "server.public_status"]
    assert found["settings"] == ["settings.max_retries"]
    assert "sk-" not in orjson.dumps(found).decode()
    assert restart_required(old, new) == ["server.port"]


async def test_a_breaker_an_old_request_opens_is_expedited_by_the_running_prober(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    first = gateway_of(server).runtime
    for _ in range(2):
        assert (await reload(server))[0] == 200
    current = gateway_of(server).runtime
    provider = first.pool.providers["up1"]  # kept: the same object in every generation
    assert current.pool.providers["up1"] is provider
    assert first.pool.on_provider_opened is not None
    first.pool.on_provider_opened(provider)  # as a generation-1 request opening it would
    assert "up1" in current.prober.next_due
    assert "up1" not in first.prober.next_due


async def test_the_running_prober_ignores_a_provider_its_config_no_longer_has(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    raw["providers"]["spare"] = {"type": "openai", "base_url": upstream.url}
    raw["models"]["spare-model"] = {"backends": [{"provider": "spare", "model": "up-model"}]}
    server = await start_reloadable(raw)
    old = gateway_of(server).runtime
    new = copy.deepcopy(raw)
    del new["providers"]["spare"], new["models"]["spare-model"]
    write(config_file, new)
    assert (await reload(server))[0] == 200
    assert old.pool.on_provider_opened is not None
    old.pool.on_provider_opened(old.pool.providers["spare"])
    # A schedule for a provider it never probes would make its loop spin.
    assert "spare" not in gateway_of(server).runtime.prober.next_due


async def test_the_recovery_stage_is_one_object_across_reloads(
    start_reloadable: Reloadable, config_file: Path, upstream: FakeUpstream
) -> None:
    raw = gateway_config(upstream)
    server = await start_reloadable(raw)
    (old,) = gateway_of(server).runtime.pool.backends["gpt-test"]
    assert (await reload(server))[0] == 200
    (new,) = gateway_of(server).runtime.pool.backends["gpt-test"]
    assert new is not old
    old.recovery_successes = 0  # a breaker opened by a request of the old config
    assert new.recovery_successes == 0


async def test_a_reload_that_finishes_after_the_drain_began_is_not_applied(
    start_reloadable: Reloadable,
    config_file: Path,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = await start_reloadable(gateway_config(upstream))
    gateway = gateway_of(server)

    def load_then_stop(path: str) -> Any:
        config = load_config(path)
        gateway.drain.begin()  # SIGTERM while the file was being read
        return config

    monkeypatch.setattr("berry_proxy.runtime.load_config", load_then_stop)
    result = await gateway.reload()
    assert not result.ok
    assert "shutting down" in result.errors[0]
    assert gateway.runtime.generation == 1


async def test_a_valid_file_that_cannot_be_applied_answers_500_and_keeps_the_old_config(
    start_reloadable: Reloadable,
    config_file: Path,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug while building the new runtime is the gateway's fault, not the file's: 500
    ``reload_failed``, not 400 ``invalid_config``."""
    raw = gateway_config(upstream, upstream2)
    server = await start_reloadable(raw)
    before = gateway_of(server).runtime

    def broken_build(*_args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway_of(server), "_build", broken_build)
    status, body = await reload(server)
    assert status == 500
    assert body["error"]["code"] == "reload_failed"
    assert body["error"]["details"]["config_generation"] == before.generation
    assert gateway_of(server).runtime is before
    assert (await chat(server))[0] == 200
