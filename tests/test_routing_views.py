"""The routing views over HTTP: ``/admin/*``, ``/smart-ai/*``, ``/health`` and ``/models``.

SPEC §2 (endpoint table: who may call what), §5 "Admin and SmartAI JSON" (the shapes),
§5 "public_status: false", and "weights shown anywhere are exactly the weights the
selector uses": every effective weight a view shows must equal what
``Router.breakdowns`` (the formula the router draws with) gives for that backend.

A real gateway serves real fake upstreams over 127.0.0.1; the gateway's monotonic and
wall clocks are injected (``TickingClock``), so weights do not drift between a view and
the test's own computation, and timestamps are known.
"""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from berry_proxy import __version__, keys
from berry_proxy.breaker import BreakerState
from berry_proxy.weights import WeightBreakdown

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    USER_TOKEN,
    FakeUpstream,
    GatewayFactory,
    ServerFactory,
    base_url,
    gateway_config,
)

WALL_START = 1_700_000_000.0
WALL_START_ISO = "2023-11-14T22:13:20Z"
MESSAGES = [{"role": "user", "content": "Say hello"}]
# Bounds the request loops that wait for a random draw to reach a given backend.
MAX_REQUESTS = 40

ADMIN_PATHS = ["/admin/model-weights", "/admin/backend-health", "/admin/system-stats"]
STATUS_PATHS = ["/health", "/smart-ai/weights", "/smart-ai/models/gpt-test/weights"]
BREAKER_STATES = {s.value for s in BreakerState}

MODEL_WEIGHTS_KEYS = {
    "provider",
    "model",
    "weight",
    "effective_weight",
    "priority",
    "healthy",
    "circuit_breaker_state",
    "tags",
    "billing_mode",
}
BACKEND_HEALTH_KEYS = {
    "provider",
    "model",
    "healthy",
    "circuit_breaker_state",
    "consecutive_failures",
    "total_requests",
    "failed_requests",
    "last_check",
    "last_error",
    "last_success",
    "last_failure",
}
SYSTEM_STATS_KEYS = {
    "version",
    "uptime_seconds",
    "config_generation",
    "in_flight",
    "total_requests",
    "models",
    "timestamp",
}
SMART_AI_KEYS = {
    "provider",
    "model",
    "weight",
    "confidence",
    "health_factor",
    "latency_factor",
    "error_factor",
    "effective_weight",
}
SMART_AI_SETTINGS = {
    "initial_confidence": 0.7,
    "min_confidence": 0.1,
    "exploration_ratio": 0.15,
    "enable_time_decay": True,
    "non_premium_stability_bonus": 1.2,
    "confidence_adjustments": {"success_boost": 0.05, "server_error_penalty": 0.25},
}


class TickingClock:
    """A fake clock: ``step`` seconds pass on every reading (0: frozen)."""

    def __init__(self, now: float, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        now = self.now
        self.now += self.step
        return now


@dataclass
class Gateway:
    server: TestServer
    clock: TickingClock
    wall: TickingClock

    @property
    def url(self) -> str:
        return base_url(self.server)


@dataclass
class Fetched:
    status: int
    text: str
    body: Any


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def start(start_gateway: GatewayFactory, raw: dict[str, Any]) -> Gateway:
    clock = TickingClock(1_000.0)
    wall = TickingClock(WALL_START)
    server = await start_gateway(raw, clock=clock, wall_clock=wall, rng=random.Random(11))
    return Gateway(server, clock, wall)


async def fetch(
    session: aiohttp.ClientSession, gw: Gateway, path: str, token: str | None = ADMIN_TOKEN
) -> Fetched:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with session.get(gw.url + path, headers=headers) as response:
        text = await response.text()
        return Fetched(response.status, text, orjson.loads(text))


async def chat(
    session: aiohttp.ClientSession, gw: Gateway, model: str = "gpt-test"
) -> tuple[int, str | None]:
    async with session.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        await response.read()
        return response.status, response.headers.get("X-Berry-Provider")


def views_config(*fakes: FakeUpstream, **settings: Any) -> dict[str, Any]:
    """``gateway_config`` with gpt-test on smart_ai and other-model on round_robin."""
    raw = gateway_config(*fakes, **settings)
    raw["models"]["gpt-test"]["strategy"] = "smart_ai"
    raw["models"]["other-model"]["strategy"] = "round_robin"
    return raw


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_iso(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    datetime.fromisoformat(value)
    return True


def is_iso_or_none(value: Any) -> bool:
    return value is None or is_iso(value)


def error_of(fetched: Fetched) -> dict[str, Any]:
    """The error object of an error response, after checking the envelope."""
    assert set(fetched.body) == {"error"}
    error: dict[str, Any] = fetched.body["error"]
    assert {"type", "code", "message", "param"} <= set(error)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def find(backends: Iterable[dict[str, Any]], provider: str, model: str) -> dict[str, Any]:
    found = [b for b in backends if b["provider"] == provider and b["model"] == model]
    assert len(found) == 1, (provider, model, backends)
    return found[0]


def breakdowns(gw: Gateway, model_id: str) -> list[WeightBreakdown]:
    """What the router's formula gives now for each of ``model_id``'s backends."""
    app = gw.server.app
    model = app[keys.GATEWAY].runtime.config.models[model_id]
    return app[keys.GATEWAY].runtime.router.breakdowns(
        model, app[keys.GATEWAY].runtime.pool.backends[model_id]
    )


def assert_no_leak(text: str, *fakes: FakeUpstream, ports: Iterable[int] = ()) -> None:
    """``text`` names no upstream address, port or key."""
    assert UPSTREAM_KEY not in text
    assert "127.0.0.1" not in text
    assert "http://" not in text
    all_ports = [*ports, *(f.server.port for f in fakes if f.server and f.server.port)]
    for port in all_ports:
        assert f":{port}" not in text
        assert re.search(rf"(?<![\d.]){port}(?!\d)", text) is None, port


# --------------------------------------------------------------------------------------
# Shapes (SPEC §5 "Admin and SmartAI JSON")
# --------------------------------------------------------------------------------------


async def test_admin_model_weights_shape(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    raw = views_config(upstream, upstream2)
    backends = raw["models"]["gpt-test"]["backends"]
    backends[0].update(weight=3, priority=1, tags=["premium", "eu"])
    backends[1]["billing_mode"] = "per_request"
    gw = await start(start_gateway, raw)

    fetched = await fetch(session, gw, "/admin/model-weights")
    assert fetched.status == 200
    body = fetched.body
    assert {"models", "timestamp"} <= set(body)
    assert body["timestamp"] == WALL_START_ISO
    assert set(body["models"]) == {"gpt-test", "other-model"}
    gpt = body["models"]["gpt-test"]
    assert gpt["strategy"] == "smart_ai"
    assert body["models"]["other-model"]["strategy"] == "round_robin"
    for model in body["models"].values():
        for backend in model["backends"]:
            assert set(backend) >= MODEL_WEIGHTS_KEYS
            assert isinstance(backend["provider"], str)
            assert isinstance(backend["model"], str)
            assert is_number(backend["weight"])
            assert is_number(backend["effective_weight"])
            assert isinstance(backend["priority"], int)
            assert isinstance(backend["healthy"], bool)
            assert backend["circuit_breaker_state"] in BREAKER_STATES
            assert isinstance(backend["tags"], list)
            assert backend["billing_mode"] in ("per_token", "per_request")
    first, second = gpt["backends"]
    assert (first["provider"], first["model"]) == ("up1", "up-model")
    assert (first["weight"], first["priority"], first["tags"]) == (3, 1, ["premium", "eu"])
    assert (first["billing_mode"], second["billing_mode"]) == ("per_token", "per_request")
    assert (first["healthy"], first["circuit_breaker_state"]) == (True, "closed")
    assert (second["weight"], second["priority"], second["tags"]) == (1, 0, [])
    assert_no_leak(fetched.text, upstream, upstream2)


async def test_admin_backend_health_shape(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    gw = await start(start_gateway, views_config(upstream, upstream2))
    fetched = await fetch(session, gw, "/admin/backend-health")
    assert fetched.status == 200
    body = fetched.body
    assert {"backends", "timestamp"} <= set(body)
    assert body["timestamp"] == WALL_START_ISO
    assert isinstance(body["backends"], list)
    assert [(b["provider"], b["model"]) for b in body["backends"]] == [
        ("up1", "up-model"),
        ("up2", "up-model"),
        ("up1", "up-other"),
    ]
    for backend in body["backends"]:
        assert set(backend) >= BACKEND_HEALTH_KEYS
        assert isinstance(backend["healthy"], bool)
        assert backend["circuit_breaker_state"] in BREAKER_STATES
        for count in ("consecutive_failures", "total_requests", "failed_requests"):
            assert isinstance(backend[count], int)
            assert backend[count] == 0
        # Nothing happened yet: no probe, no request.
        for when in ("last_check", "last_error", "last_success", "last_failure"):
            assert backend[when] is None


async def test_admin_system_stats_shape(
    start_gateway: GatewayFactory, upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await start(start_gateway, views_config(upstream))
    gw.wall.now += 42
    fetched = await fetch(session, gw, "/admin/system-stats")
    assert fetched.status == 200
    body = fetched.body
    assert set(body) >= SYSTEM_STATS_KEYS
    assert body["version"] == __version__
    assert body["uptime_seconds"] == 42
    assert isinstance(body["config_generation"], int)
    assert (body["in_flight"], body["total_requests"]) == (0, 0)
    assert body["timestamp"] == "2023-11-14T22:14:02Z"
    assert set(body["models"]) == {"gpt-test", "other-model"}
    for stats in body["models"].values():
        assert isinstance(stats, dict)
        assert stats["total_requests"] == 0


async def test_smart_ai_weights_lists_smart_ai_models_with_their_settings(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    raw = views_config(upstream, upstream2, smart_ai=SMART_AI_SETTINGS)
    # A model without a strategy is smart_ai too (the default); one on failover is not.
    raw["models"]["defaulted"] = {"backends": [{"provider": "up2", "model": "up-default"}]}
    raw["models"]["ordered"] = {
        "strategy": "failover",
        "backends": [{"provider": "up2", "model": "up-ordered"}],
    }
    gw = await start(start_gateway, raw)

    fetched = await fetch(session, gw, "/smart-ai/weights", token=None)
    assert fetched.status == 200
    body = fetched.body
    assert {"models", "settings", "timestamp"} <= set(body)
    assert body["timestamp"] == WALL_START_ISO
    assert set(body["models"]) == {"gpt-test", "defaulted"}
    for model in body["models"].values():
        assert set(model) >= {"backends"}
        for backend in model["backends"]:
            assert set(backend) >= SMART_AI_KEYS
            assert isinstance(backend["provider"], str)
            assert isinstance(backend["model"], str)
            for number in SMART_AI_KEYS - {"provider", "model"}:
                assert is_number(backend[number]), number
    assert [(b["provider"], b["model"]) for b in body["models"]["gpt-test"]["backends"]] == [
        ("up1", "up-model"),
        ("up2", "up-model"),
    ]

    settings = body["settings"]
    assert settings == asdict(gw.server.app[keys.GATEWAY].runtime.config.settings.smart_ai)
    for name, value in SMART_AI_SETTINGS.items():
        if name != "confidence_adjustments":
            assert settings[name] == value, name
    adjustments = settings["confidence_adjustments"]
    assert adjustments["success_boost"] == 0.05
    assert adjustments["server_error_penalty"] == 0.25
    assert adjustments["auth_error_penalty"] == 0.8  # a default fills the rest
    for backend in body["models"]["gpt-test"]["backends"]:
        assert backend["confidence"] == 0.7  # initial_confidence, as configured
    assert_no_leak(fetched.text, upstream, upstream2)


async def test_smart_ai_one_model_and_unknown_model(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    gw = await start(start_gateway, views_config(upstream, upstream2))
    every = (await fetch(session, gw, "/smart-ai/weights", token=None)).body

    fetched = await fetch(session, gw, "/smart-ai/models/gpt-test/weights", token=None)
    assert fetched.status == 200
    assert {"model", "backends"} <= set(fetched.body)
    assert fetched.body["model"] == "gpt-test"
    assert fetched.body["backends"] == every["models"]["gpt-test"]["backends"]

    for unknown in ("no-such-model", "gpt-test-2", "a/b"):
        missing = await fetch(session, gw, f"/smart-ai/models/{unknown}/weights", token=None)
        assert missing.status == 404
        error = error_of(missing)
        assert error["type"] == "invalid_request"
        assert error["code"] in ("not_found", "model_not_found")
        assert unknown in missing.text


# --------------------------------------------------------------------------------------
# Who may call them
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ADMIN_PATHS)
async def test_admin_views_need_an_admin_token(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    session: aiohttp.ClientSession,
    path: str,
) -> None:
    gw = await start(start_gateway, views_config(upstream))

    missing = await fetch(session, gw, path, token=None)
    assert missing.status == 401
    error = error_of(missing)
    assert (error["type"], error["code"]) == ("authentication_error", "missing_token")

    invalid = await fetch(session, gw, path, token="not-a-token-of-anyone-here")
    assert invalid.status == 401
    assert error_of(invalid)["code"] == "invalid_token"

    restricted = await fetch(session, gw, path, token=USER_TOKEN)
    assert restricted.status == 403
    error = error_of(restricted)
    assert (error["type"], error["code"]) == ("permission_error", "admin_required")

    assert (await fetch(session, gw, path)).status == 200


@pytest.mark.parametrize("path", [*STATUS_PATHS, "/v1/health"])
async def test_status_views_are_public_by_default(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    session: aiohttp.ClientSession,
    path: str,
) -> None:
    gw = await start(start_gateway, views_config(upstream))
    for token in (None, USER_TOKEN, ADMIN_TOKEN):
        fetched = await fetch(session, gw, path, token=token)
        assert fetched.status == 200, (token, fetched.text)


@pytest.mark.parametrize("path", STATUS_PATHS)
async def test_status_views_need_an_admin_token_when_not_public(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    session: aiohttp.ClientSession,
    path: str,
) -> None:
    raw = views_config(upstream)
    raw["server"]["public_status"] = False
    gw = await start(start_gateway, raw)

    missing = await fetch(session, gw, path, token=None)
    assert missing.status == 401
    assert error_of(missing)["code"] == "missing_token"
    restricted = await fetch(session, gw, path, token=USER_TOKEN)
    assert restricted.status == 403
    assert error_of(restricted)["code"] == "admin_required"
    assert (await fetch(session, gw, path)).status == 200

    # /v1/health stays public whatever public_status says.
    v1 = await fetch(session, gw, "/v1/health", token=None)
    assert v1.status == 200
    assert v1.body == {"status": "ok", "timestamp": WALL_START_ISO}


# --------------------------------------------------------------------------------------
# What they show
# --------------------------------------------------------------------------------------


async def test_effective_weight_shown_is_the_routers_formula(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    """After failures on up2, its smart_ai weight drops, identically in every view."""
    raw = views_config(upstream, upstream2, circuit_breaker_failure_threshold=100)
    gw = await start(start_gateway, raw)

    async def shown() -> list[list[dict[str, Any]]]:
        admin = (await fetch(session, gw, "/admin/model-weights")).body
        every = (await fetch(session, gw, "/smart-ai/weights", token=None)).body
        one = (await fetch(session, gw, "/smart-ai/models/gpt-test/weights", token=None)).body
        return [
            admin["models"]["gpt-test"]["backends"],
            every["models"]["gpt-test"]["backends"],
            one["backends"],
        ]

    def check(views: list[list[dict[str, Any]]]) -> list[float]:
        """Every view equals the router's formula now; returns the effective weights."""
        expected = breakdowns(gw, "gpt-test")
        for view in views:
            assert [b["provider"] for b in view] == ["up1", "up2"]
            assert [b["effective_weight"] for b in view] == [w.effective_weight for w in expected]
        for view in views[1:]:
            for backend, weights in zip(view, expected, strict=True):
                assert backend["confidence"] == weights.confidence
                assert backend["health_factor"] == weights.health_factor
                assert backend["latency_factor"] == weights.latency_factor
                assert backend["error_factor"] == weights.error_factor
        return [w.effective_weight for w in expected]

    before = check(await shown())
    assert before[0] == before[1] > 0

    upstream2.mode = "status"  # HTTP 500 on every call
    gw.clock.step = 0.001  # time passes while requests run: latencies are measured
    for _ in range(MAX_REQUESTS):
        assert (await chat(session, gw)) == (200, "up1")
        if len(upstream2.requests) >= 2:
            break
    assert len(upstream2.requests) >= 2
    gw.clock.step = 0.0  # frozen: the views and the test compute at the same instant

    after = check(await shown())
    assert after[1] < before[1]
    assert after[1] < after[0]
    assert (
        gw.server.app[keys.GATEWAY].runtime.pool.backends["gpt-test"][1].stats.consecutive_failures
        >= 2
    )


async def test_backend_health_counts_real_traffic(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    raw = views_config(upstream, upstream2, circuit_breaker_failure_threshold=100)
    raw["models"]["gpt-test"]["strategy"] = "weighted_random"
    gw = await start(start_gateway, raw)
    # The failing upstream's own error names its address and key: never repeated.
    upstream2.mode = "status"
    upstream2.error_body = orjson.dumps(
        {"error": {"message": f"boom at {upstream2.url}/v1 with key {UPSTREAM_KEY}"}}
    )

    await gw.server.app[keys.GATEWAY].runtime.prober.probe_once()
    sent = 10
    for _ in range(sent):
        assert (await chat(session, gw)) == (200, "up1")
    assert upstream2.requests, "no request tried up2"

    fetched = await fetch(session, gw, "/admin/backend-health")
    assert fetched.status == 200
    backends = fetched.body["backends"]
    good = find(backends, "up1", "up-model")
    bad = find(backends, "up2", "up-model")
    unused = find(backends, "up1", "up-other")

    failures = len(upstream2.requests)
    assert bad["total_requests"] == bad["failed_requests"] == failures
    assert bad["consecutive_failures"] == failures
    assert bad["healthy"] is True  # below the threshold, probes pass
    assert bad["circuit_breaker_state"] == "closed"
    assert isinstance(bad["last_error"], str)
    assert "500" in bad["last_error"]
    assert bad["last_failure"] == WALL_START_ISO
    assert bad["last_success"] is None

    assert good["total_requests"] == len(upstream.requests) == sent
    assert (good["failed_requests"], good["consecutive_failures"]) == (0, 0)
    assert good["last_error"] is None
    assert good["last_success"] == WALL_START_ISO
    assert good["last_failure"] is None

    assert (unused["total_requests"], unused["failed_requests"]) == (0, 0)
    for backend in backends:
        assert backend["last_check"] == WALL_START_ISO
        assert is_iso_or_none(backend["last_success"])
    assert_no_leak(fetched.text, upstream, upstream2)


async def test_system_stats_counts_requests_and_in_flight(
    start_gateway: GatewayFactory, upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    gw = await start(start_gateway, views_config(upstream))
    for _ in range(2):
        assert (await chat(session, gw)) == (200, "up1")
    stats = (await fetch(session, gw, "/admin/system-stats")).body
    assert (stats["total_requests"], stats["in_flight"]) == (2, 0)

    upstream.mode = "gated"
    async with session.post(
        gw.url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as response:
        assert response.status == 200
        await upstream.first_chunk_sent.wait()
        stats = (await fetch(session, gw, "/admin/system-stats")).body
        assert (stats["total_requests"], stats["in_flight"]) == (3, 1)
        upstream.gate.set()
        assert b"data: [DONE]" in await response.read()

    stats = (await fetch(session, gw, "/admin/system-stats")).body
    assert (stats["total_requests"], stats["in_flight"]) == (3, 0)
    assert stats["models"]["gpt-test"]["total_requests"] == 3
    assert stats["models"]["other-model"]["total_requests"] == 0


async def test_models_shows_backend_with_open_breaker_unhealthy(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    raw = views_config(upstream, upstream2, circuit_breaker_failure_threshold=2)
    raw["models"]["gpt-test"]["strategy"] = "weighted_random"
    gw = await start(start_gateway, raw)
    upstream2.mode = "status"  # 500s: the breaker of up2's upstream model opens
    breaker = gw.server.app[keys.GATEWAY].runtime.pool.backends["gpt-test"][1].breaker
    for _ in range(MAX_REQUESTS):
        assert (await chat(session, gw)) == (200, "up1")
        if breaker.state is BreakerState.OPEN:
            break
    assert breaker.state is BreakerState.OPEN

    fetched = await fetch(session, gw, "/models", token=USER_TOKEN)
    assert fetched.status == 200
    (gpt,) = [m for m in fetched.body["models"] if m["name"] == "gpt-test"]
    by_provider = {b["provider"]: b for b in gpt["backends"]}
    assert by_provider["up1"]["healthy"] is True
    assert by_provider["up2"]["healthy"] is False
    assert by_provider["up2"]["enabled"] is True

    admin = (await fetch(session, gw, "/admin/model-weights")).body
    shown = find(admin["models"]["gpt-test"]["backends"], "up2", "up-model")
    assert (shown["healthy"], shown["circuit_breaker_state"]) == (False, "open")
    assert shown["effective_weight"] == 0
    smart = (await fetch(session, gw, "/smart-ai/models/gpt-test/weights", token=None)).body
    assert find(smart["backends"], "up2", "up-model")["health_factor"] == 0

    health = await fetch(session, gw, "/health", token=None)
    assert (health.status, health.body["status"]) == (200, "degraded")
    # up2 answers (500s): its connection-level breaker stays closed, its model's opened.
    assert health.body["providers"]["up2"]["circuit_breaker_state"] == "closed"
    assert health.body["models"]["gpt-test"]["healthy_backends"] == 1


async def test_no_view_leaks_upstream_address_or_key(
    aiohttp_server: ServerFactory,
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    session: aiohttp.ClientSession,
) -> None:
    """After failing traffic and failed probes, no view names an upstream or a key."""
    dead = FakeUpstream()
    dead.server = await aiohttp_server(dead.app())
    raw = views_config(upstream, upstream2, dead, circuit_breaker_failure_threshold=100)
    raw["models"]["gpt-test"]["strategy"] = "weighted_random"
    gw = await start(start_gateway, raw)
    upstream2.mode = "status"
    upstream2.error_body = orjson.dumps(
        {"error": {"message": f"boom at {upstream2.url}/v1 key {UPSTREAM_KEY}"}}
    )
    dead_port = dead.server.port
    assert dead_port is not None
    await dead.server.close()  # connections to it are refused from now on

    prober = gw.server.app[keys.GATEWAY].runtime.prober
    assert (await prober.probe_once())["up3"] is not None
    for _ in range(12):
        assert (await chat(session, gw)) == (200, "up1")

    paths = [
        *ADMIN_PATHS,
        *STATUS_PATHS,
        "/models",
        "/v1/models",
        "/v1/health",
        "/smart-ai/models/other-model/weights",
        "/smart-ai/models/unknown/weights",
    ]
    for path in paths:
        fetched = await fetch(session, gw, path)
        assert fetched.status in (200, 404), (path, fetched.text)
        assert_no_leak(fetched.text, upstream, upstream2, ports=[dead_port])
    backend_health = (await fetch(session, gw, "/admin/backend-health")).body["backends"]
    assert find(backend_health, "up2", "up-model")["last_error"]
    assert find(backend_health, "up3", "up-model")["last_error"]
