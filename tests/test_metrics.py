"""``/metrics`` and ``/prometheus``: each number moves by exactly what happened, the
exposition passes ``promtool check metrics``, and a real Prometheus server scrapes it.

promtool and prometheus are Debian's ``prometheus`` package (``.ci/run`` installs it).
Without them those tests are skipped, except where ``BERRY_REQUIRE_PROMETHEUS=1``
(``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from berry_proxy import keys
from berry_proxy.context import RequestContext
from berry_proxy.metrics import EXPORTED_METRICS, HISTOGRAMS, Metrics

from .conftest import (
    ADMIN_TOKEN,
    UPSTREAM_KEY,
    USER_TOKEN,
    FakeUpstream,
    GatewayFactory,
    base_url,
    gateway_config,
    required_tool,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def get(server: TestServer, path: str, headers: dict[str, str] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url(server) + path, headers=headers or {}) as response,
    ):
        return response.status, response.headers, await response.read()


async def chat(server: TestServer, token: str = ADMIN_TOKEN, **fields: Any) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(server) + "/v1/chat/completions",
            json={**CHAT, **fields},
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        await response.read()
        return response.status


async def scrape(server: TestServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/prometheus``, by name and sorted labels."""
    status, _, body = await get(server, "/prometheus")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def two_providers(first: FakeUpstream, second: FakeUpstream, **settings: Any) -> dict[str, Any]:
    """``gpt-test`` tries up1 first, then up2 (strategy failover)."""
    raw = gateway_config(first, second, **settings)
    raw["models"]["gpt-test"]["strategy"] = "failover"
    raw["models"]["gpt-test"]["backends"][1]["priority"] = 1
    return raw


# --------------------------------------------------------------------------------------
# /metrics: the seed's JSON, moved by exactly what happened
# --------------------------------------------------------------------------------------


async def test_metrics_json_counts_exactly_what_happened(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    server = await start_gateway(two_providers(upstream, upstream2, max_internal_retries=0))
    assert await chat(server) == 200  # 1: up1 serves
    upstream.mode = "status"  # up1 answers 500 from now on
    assert await chat(server) == 200  # 2: up1 fails (twice: a 5xx is retried once), up2 serves
    assert await chat(server, token="not-a-real-token-at-all") == 401  # 3: refused
    assert await chat(server, stream=True) == 200  # 4: up1 fails, up2 streams
    status, _, body = await get(server, "/metrics")
    assert status == 200
    metrics = orjson.loads(body)
    assert set(metrics) == {
        "timestamp",
        "uptime_seconds",
        "providers",
        "models",
        "load_balancer",
        "authentication",
    }
    up1_attempts = len([r for r in upstream.requests])
    up2_attempts = len(upstream2.requests)
    assert up2_attempts == 2
    up1 = metrics["providers"]["up1"]
    assert up1["total_requests"] == up1_attempts
    assert up1["successful_requests"] == 1
    assert up1["failed_requests"] == up1_attempts - 1
    assert up1["last_failure"] is not None
    assert up1["last_success"] is not None
    up2 = metrics["providers"]["up2"]
    assert (up2["total_requests"], up2["successful_requests"], up2["failed_requests"]) == (2, 2, 0)
    assert up2["success_rate"] == 1.0
    assert set(up2) == {
        "healthy",
        "total_requests",
        "successful_requests",
        "failed_requests",
        "success_rate",
        "average_latency_ms",
        "last_success",
        "last_failure",
        "circuit_breaker_state",
    }
    model = metrics["models"]["gpt-test"]
    assert (model["total_requests"], model["successful_requests"], model["failed_requests"]) == (
        3,
        3,
        0,
    )
    assert metrics["load_balancer"] == {
        "total_selections": up1_attempts + up2_attempts,
        "strategy_usage": {"failover": up1_attempts + up2_attempts},
    }
    auth = metrics["authentication"]
    # The /metrics call itself needed no token (public_status): not an authentication.
    assert auth == {
        "total_requests": 4,
        "successful_authentications": 3,
        "failed_authentications": 1,
        "success_rate": 0.75,
    }


async def test_two_apps_count_apart(start_gateway: GatewayFactory, upstream: FakeUpstream) -> None:
    """Metrics live per app: a test (or a reload) that builds another starts from zero."""
    first = await start_gateway(gateway_config(upstream))
    second = await start_gateway(gateway_config(upstream))
    assert await chat(first) == 200
    assert await chat(first) == 200
    assert await chat(second) == 200
    served = {
        "route": "/v1/chat/completions",
        "model": "gpt-test",
        "user": "admin",
        "status": "200",
    }
    assert value(await scrape(first), "berry_requests_total", **served) == 2
    assert value(await scrape(second), "berry_requests_total", **served) == 1


# --------------------------------------------------------------------------------------
# /prometheus: every family, bounded labels, what the router sees
# --------------------------------------------------------------------------------------


async def test_prometheus_counts_requests_attempts_failovers_tokens_and_auth(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    server = await start_gateway(two_providers(upstream, upstream2, max_internal_retries=0))
    before = await scrape(server)
    assert await chat(server) == 200
    # A stream whose client did not ask for usage: the gateway did, and counts it.
    assert await chat(server, stream=True) == 200
    upstream.mode = "status"
    assert await chat(server) == 200
    assert await chat(server, token="not-a-real-token-at-all") == 401
    after = await scrape(server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/v1/chat/completions"
    assert (
        moved("berry_requests_total", route=route, model="gpt-test", user="admin", status="200")
        == 3
    )
    assert moved("berry_requests_total", route=route, model="", user="", status="401") == 1
    assert moved("berry_auth_failures_total", reason="invalid_token") == 1
    assert (
        moved("berry_upstream_requests_total", provider="up1", model="gpt-test", outcome="success")
        == 2
    )
    failed = moved(
        "berry_upstream_requests_total", provider="up1", model="gpt-test", outcome="server_error"
    )
    assert failed == len(upstream.requests) - 2 >= 1
    assert (
        moved("berry_upstream_requests_total", provider="up2", model="gpt-test", outcome="success")
        == 1
    )
    assert moved("berry_failovers_total", model="gpt-test", reason="server_error") == failed
    assert (
        moved("berry_lb_selections_total", model="gpt-test", strategy="failover", provider="up1")
        == 2 + failed
    )
    # Usage of the two served non-streams (11 + 4 each) and of the stream (11 + 4).
    assert moved("berry_tokens_total", user="admin", model="gpt-test", type="prompt") == 33
    assert moved("berry_tokens_total", user="admin", model="gpt-test", type="completion") == 12
    assert moved("berry_request_duration_seconds_count", route=route, model="gpt-test") == 3
    assert moved("berry_time_to_first_token_seconds_count", model="gpt-test", provider="up1") == 1
    assert moved("berry_overhead_seconds_count", route=route) == 3
    assert value(after, "berry_build_info", version=__import__("berry_proxy").__version__) == 1


async def test_every_spec_family_is_exported_with_bounded_config_labels(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(gateway_config(upstream))
    assert await chat(server) == 200
    assert await chat(server, token=USER_TOKEN, model="other-model") == 403
    status, headers, body = await get(server, "/prometheus")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    declared = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.MULTILINE)}
    missing = EXPORTED_METRICS - declared
    assert not missing, missing
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= declared
    # Nothing a client sent, and no secret or upstream address, is ever a label value.
    for secret in (ADMIN_TOKEN, USER_TOKEN, UPSTREAM_KEY, upstream.url):
        assert secret not in text
    assert upstream.server is not None
    assert f":{upstream.server.port}" not in text
    assert "hi" not in re.findall(r'"([^"]*)"', text)


async def test_openmetrics_when_the_scraper_asks_for_it(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    server = await start_gateway(gateway_config(upstream))
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, headers, body = await get(server, "/prometheus", {"Accept": accept})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.rstrip().endswith(b"# EOF")


async def test_state_gauges_show_what_the_router_sees(
    start_gateway: GatewayFactory, upstream: FakeUpstream, upstream2: FakeUpstream
) -> None:
    server = await start_gateway(
        two_providers(upstream, upstream2, circuit_breaker_failure_threshold=1)
    )
    upstream.mode = "reset"  # a connection failure: up1's provider breaker opens
    assert await chat(server) == 200  # served by up2
    samples = await scrape(server)
    assert value(samples, "berry_circuit_breaker_state", provider="up1") == 2
    assert value(samples, "berry_circuit_breaker_state", provider="up2") == 0
    assert value(samples, "berry_backend_healthy", provider="up1", model="up-model") == 0
    assert value(samples, "berry_backend_healthy", provider="up2", model="up-model") == 1
    app = server.app
    pool, router = app[keys.GATEWAY].runtime.pool, app[keys.GATEWAY].runtime.router
    model = app[keys.GATEWAY].runtime.config.models["gpt-test"]
    backends = pool.backends["gpt-test"]
    for backend, weight in zip(backends, router.breakdowns(model, backends), strict=True):
        shown = value(
            samples,
            "berry_backend_effective_weight",
            model="gpt-test",
            provider=backend.provider.id,
            backend_model=backend.config.model,
        )
        assert shown == pytest.approx(weight.effective_weight)
    assert (
        value(
            samples,
            "berry_backend_effective_weight",
            model="gpt-test",
            provider="up1",
            backend_model="up-model",
        )
        == 0
    )
    # The scrape itself is the only request in flight while it is answered.
    assert value(samples, "berry_in_flight_requests", route="/prometheus") == 1
    assert value(samples, "berry_in_flight_requests", route="/v1/chat/completions") == 0


@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/prometheus", "/smart-ai/weights"])
async def test_public_status_false_puts_every_status_view_behind_an_admin_token(
    start_gateway: GatewayFactory, upstream: FakeUpstream, path: str
) -> None:
    raw = gateway_config(upstream)
    raw["server"]["public_status"] = False
    server = await start_gateway(raw)
    assert (await get(server, path))[0] == 401
    assert (await get(server, path, {"Authorization": f"Bearer {USER_TOKEN}"}))[0] == 403
    assert (await get(server, path, ADMIN))[0] == 200
    assert (await get(server, "/v1/health"))[0] == 200


# --------------------------------------------------------------------------------------
# The real tools: promtool, and a Prometheus server scraping the gateway
# --------------------------------------------------------------------------------------


def tool(name: str) -> str:
    return required_tool((name,), "BERRY_REQUIRE_PROMETHEUS", "prometheus")


async def mixed_traffic(server: TestServer, upstream: FakeUpstream, failing: int) -> None:
    """Successes, a stream, a bad token, an unknown model, and a request whose upstream
    answers 500 (``failing``: what the client then gets)."""
    assert await chat(server) == 200
    assert await chat(server, stream=True) == 200
    assert await chat(server, token="not-a-real-token-at-all") == 401
    assert await chat(server, model="no-such-model") == 400
    upstream.mode = "status"
    assert await chat(server) == failing
    upstream.mode = "ok"


async def test_promtool_finds_no_problem_in_a_real_scrape(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    promtool = tool("promtool")
    server = await start_gateway(gateway_config(upstream))
    await mixed_traffic(server, upstream, failing=502)
    # promtool lints the text format (it reads OpenMetrics as text, and misreads it).
    _, _, body = await get(server, "/prometheus")
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(30):
        out, _ = await process.communicate(body)
    assert process.returncode == 0, out.decode()
    assert out.decode().strip() == "", out.decode()


ALERT_RULES = Path(__file__).resolve().parent.parent / "config/prometheus/berry-proxy-alerts.yml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def query(port: int, promql: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": promql}) as r,
    ):
        answer = await r.json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


async def test_a_real_prometheus_scrapes_the_gateway(
    start_gateway: GatewayFactory,
    upstream: FakeUpstream,
    upstream2: FakeUpstream,
    tmp_path: Path,
) -> None:
    prometheus = tool("prometheus")
    server = await start_gateway(
        two_providers(upstream, upstream2, circuit_breaker_failure_threshold=1)
    )
    assert upstream.server is not None
    await upstream.server.close()  # up1 is gone: probes fail too, its breaker stays open
    assert await chat(server) == 200  # up1's breaker opens; up2 serves
    await mixed_traffic(server, upstream2, failing=502)  # up2 alone now
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERT_RULES)],  # the shipped rules load into a real server
        "scrape_configs": [
            {
                "job_name": "berry-proxy",
                "metrics_path": "/prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_bytes(orjson.dumps(config))  # JSON is YAML
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        prometheus,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(40):
            while True:  # until the first scrape is in (bounded by the timeout)
                with contextlib.suppress(aiohttp.ClientError, AssertionError):
                    scraped = await query(port, 'up{job="berry-proxy"} == 1')
                    if scraped and await query(port, "berry_requests_total"):
                        break
                await asyncio.sleep(0.25)
        requests = await query(
            port, 'sum by (status) (berry_requests_total{route="/v1/chat/completions"})'
        )
        by_status = {r["metric"]["status"]: float(r["value"][1]) for r in requests}
        assert by_status == {"200": 3, "401": 1, "400": 1, "502": 1}
        tokens = await query(port, 'berry_tokens_total{type="completion",model="gpt-test"}')
        assert float(tokens[0]["value"][1]) > 0
        breaker = await query(port, 'berry_circuit_breaker_state{provider="up1"}')
        assert float(breaker[0]["value"][1]) == 2
        ttft = await query(
            port, "histogram_quantile(0.5, sum by (le) (berry_time_to_first_token_seconds_bucket))"
        )
        assert ttft
        assert float(ttft[0]["value"][1]) > 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        async with asyncio.timeout(10):
            await process.wait()


def test_histogram_families_are_histograms() -> None:
    assert all(spec.buckets for spec in HISTOGRAMS)
    assert all(name.startswith("berry_") for name in EXPORTED_METRICS)


# --------------------------------------------------------------------------------------
# Each attempt counted once, whatever ended it
# --------------------------------------------------------------------------------------


async def test_a_client_leaving_mid_stream_is_one_client_gone_attempt_of_a_200(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode = "gated"  # the first content, then nothing until the gate opens
    server = await start_gateway(gateway_config(upstream))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url(server) + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=ADMIN,
        ) as response,
    ):
        assert response.status == 200
        await response.content.readany()  # the first event: committed
    # The client has left; the gateway notices and ends the request.
    async with asyncio.timeout(10):
        while True:
            samples = await scrape(server)
            if value(samples, "berry_in_flight_requests", route="/v1/chat/completions") == 0:
                break
            await asyncio.sleep(0.02)
    outcomes = {
        dict(labels)["outcome"]: count
        for (name, labels), count in samples.items()
        if name == "berry_upstream_requests_total"
    }
    assert outcomes == {"client_gone": 1}
    route = "/v1/chat/completions"
    assert (
        value(
            samples,
            "berry_requests_total",
            route=route,
            model="gpt-test",
            user="admin",
            status="200",
        )
        == 1
    )


async def test_a_streamed_caller_error_is_no_time_to_first_token(
    start_gateway: GatewayFactory, upstream: FakeUpstream
) -> None:
    upstream.mode, upstream.status_code = "status", 400
    upstream.error_body = b'{"error": {"message": "bad", "type": "invalid_request_error"}}'
    server = await start_gateway(gateway_config(upstream))
    assert await chat(server, stream=True) == 400
    samples = await scrape(server)
    assert (
        value(samples, "berry_time_to_first_token_seconds_count", model="gpt-test", provider="up1")
        == 0
    )
    outcome = value(
        samples,
        "berry_upstream_requests_total",
        provider="up1",
        model="gpt-test",
        outcome="client_error",
    )
    assert outcome == 1


def test_negative_token_counts_never_make_the_counter_go_down() -> None:
    metrics = Metrics()
    ctx = RequestContext("req_x", 0.0)
    ctx.route, ctx.model, ctx.user, ctx.status = "/v1/chat/completions", "m", "u", 200
    ctx.prompt_tokens, ctx.completion_tokens = -5, 3
    metrics.request_started(ctx.route)
    metrics.request_ended(ctx, 0.1)
    assert metrics.tokens == {("u", "m", "completion"): 3}
