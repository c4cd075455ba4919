"""Shared fixtures: a fake OpenAI-compatible upstream with fault modes, and the gateway.

``FakeUpstream`` is a real aiohttp server on 127.0.0.1; each test sets its ``mode`` to
choose how it answers (see ``FakeUpstream.respond``). The gateway runs as a real server
too (``aiohttp_server``), so tests drive it over HTTP with the ``openai`` SDK or aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from berry_proxy.app import create_app
from berry_proxy.config import Config, build_config
from berry_proxy.errors import UpstreamFailure
from berry_proxy.log import ACCESS_LOG
from berry_proxy.pool import Backend, BackendPool
from berry_proxy.server import GatewayRunner

ADMIN_TOKEN = "test-admin-token-0123456789"
USER_TOKEN = "test-user-token-0123456789"
DISABLED_TOKEN = "test-disabled-token-0123456"
UPSTREAM_KEY = "sk-upstream-secret-key-42"

CHAT_CONTENT = ["Hello", " there", ", friend", "!"]
UPSTREAM_ERROR_EVENT = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'


def chat_chunk(delta: dict[str, Any], finish: str | None = None, model: str = "up-model") -> bytes:
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage_chunk(prompt: int = 11, completion: int = 4) -> bytes:
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "up-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_events(include_usage: bool) -> list[bytes]:
    events = [chat_chunk({"role": "assistant", "content": ""})]
    events += [chat_chunk({"content": text}) for text in CHAT_CONTENT]
    events.append(chat_chunk({}, "stop"))
    if include_usage:
        events.append(usage_chunk())
    events.append(b"data: [DONE]\n\n")
    return events


def chat_completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(CHAT_CONTENT)},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
    }


class FakeClock:
    """A clock tests move by hand (``clock.now += 5``); pass it where a clock is injected."""

    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def served(pool: BackendPool, backend: Backend, latency: float = 0.1, stream: bool = False) -> None:
    """One attempt on ``backend`` that succeeds (a stream, or not), recorded as the proxy
    records it."""
    admission = pool.begin(backend)
    assert admission is not None, "a breaker refused the attempt"
    try:
        pool.record_success(backend, latency, admission, stream)
    finally:
        pool.end(backend, admission)


def failed(
    pool: BackendPool, backend: Backend, failure: UpstreamFailure, stream: bool = False
) -> None:
    """One attempt on ``backend`` that fails (a stream, or not), recorded as the proxy
    records it."""
    admission = pool.begin(backend)
    assert admission is not None, "a breaker refused the attempt"
    try:
        pool.record_failure(backend, failure, admission, stream=stream)
    finally:
        pool.end(backend, admission)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any
    peer: Any = None  # the gateway's (host, port): one value means one reused connection


@dataclass
class FakeUpstream:
    """An OpenAI-compatible server whose behaviour each test chooses.

    Modes: ``ok``; ``status`` (answer ``status_code`` with ``error_body`` and
    ``extra_headers``); ``reset`` (drop the connection before answering); ``stall`` (never
    answer); ``not_json`` (200 text); ``break_after`` (stream ``break_after`` content
    events, then drop the connection); ``gated`` (stream the first content event, then wait
    for ``gate`` before the rest); ``error_mid_stream`` (one content event, an error event,
    then ``[DONE]``); ``done_no_eof`` (the whole stream, then keep the connection open).
    """

    mode: str = "ok"
    status_code: int = 500
    error_body: bytes = b'{"error": {"message": "boom", "type": "server_error"}}'
    extra_headers: dict[str, str] = field(default_factory=dict)
    break_after: int = 2
    requests: list[Recorded] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk_sent: asyncio.Event = field(default_factory=asyncio.Event)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/{endpoint:.*}", self.respond)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "up-model"}]})

    async def respond(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append(Recorded(request.path, dict(request.headers), body, peer))
        self.received.set()
        mode = self.mode
        if mode == "status":
            return web.Response(
                status=self.status_code,
                body=self.error_body,
                content_type="application/json",
                headers=self.extra_headers,
            )
        if mode == "reset":
            assert request.transport is not None
            request.transport.close()
            await asyncio.sleep(3600)
        if mode == "stall":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.disconnected.set()
                raise
        if mode == "not_json":
            return web.Response(text="<html>gateway hiccup</html>", content_type="text/html")
        if request.path.endswith("/embeddings"):
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": body["model"],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                }
            )
        if not body.get("stream"):
            return web.json_response(chat_completion(body["model"]))
        return await self._stream(request, body)

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        events = stream_events(bool(options.get("include_usage")))
        if self.mode == "error_mid_stream":
            events = [*events[:2], UPSTREAM_ERROR_EVENT, b"data: [DONE]\n\n"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for index, event in enumerate(events):
                if self.mode == "break_after" and index > self.break_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(event)
                if index == 1:
                    self.first_chunk_sent.set()
                    if self.mode == "gated":
                        await self.gate.wait()
            if self.mode == "done_no_eof":
                await asyncio.sleep(3600)  # [DONE] sent, connection left open
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnected.set()
            raise
        await response.write_eof()
        return response


ServerFactory = Callable[..., Awaitable[TestServer]]


def chat_body(stream: bool = False, **extra: Any) -> bytes:
    """A chat completion request body for ``gpt-test`` (``extra``: more members)."""
    body: dict[str, Any] = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


class AccessLines(list[dict[str, Any]]):
    """The access lines an in-process gateway wrote, parsed (a stream for ``ACCESS_LOG``)."""

    def write(self, line: bytes) -> None:
        self.append(orjson.loads(line))

    def flush(self) -> None:
        pass


@pytest.fixture
def access_lines(monkeypatch: pytest.MonkeyPatch) -> AccessLines:
    """Collects the access lines written while the test runs."""
    lines = AccessLines()
    ACCESS_LOG.flush()  # what an earlier test left pending goes to its own stream
    monkeypatch.setattr(ACCESS_LOG, "stream", lines)
    monkeypatch.setattr(ACCESS_LOG, "buffered", False)  # each line at once, for the test
    return lines


@pytest.fixture
async def upstream(aiohttp_server: ServerFactory) -> FakeUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app())
    return fake


@pytest.fixture
async def upstream2(aiohttp_server: ServerFactory) -> FakeUpstream:
    fake = FakeUpstream()
    fake.server = await aiohttp_server(fake.app())
    return fake


def gateway_config(*upstreams: FakeUpstream, **settings: Any) -> dict[str, Any]:
    """A config with one provider per fake upstream serving model ``gpt-test``."""
    providers = {
        f"up{i}": {
            "type": "openai",
            "base_url": fake.url,  # no /v1: the gateway must add it
            "api_key": UPSTREAM_KEY,
            "headers": {"X-Provider-Extra": f"up{i}"},
            "first_byte_timeout_seconds": 2,
            "idle_timeout_seconds": 2,
        }
        for i, fake in enumerate(upstreams, start=1)
    }
    return {
        "server": {"max_body_bytes": 64 * 1024},
        "providers": providers,
        "models": {
            "gpt-test": {
                "name": "gpt-test",
                "strategy": "weighted_random",
                "backends": [{"provider": pid, "model": "up-model"} for pid in providers],
            },
            "other-model": {
                "backends": [{"provider": next(iter(providers)), "model": "up-other"}],
            },
        },
        "users": {
            "admin": {"token": ADMIN_TOKEN, "allowed_models": []},
            "restricted": {"token": USER_TOKEN, "allowed_models": ["gpt-test"]},
            "gone": {"token": DISABLED_TOKEN, "enabled": False},
        },
        "settings": settings,
    }


GatewayFactory = Callable[..., Awaitable[TestServer]]
AppServer = Callable[[web.Application], Awaitable[TestServer]]


class GatewayTestServer(TestServer):
    """``TestServer`` running the app as the CLI does: through ``GatewayRunner``."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def serve_app() -> AsyncIterator[AppServer]:
    """Serve a gateway app on 127.0.0.1 for the test; closed at its end."""
    servers: list[TestServer] = []

    async def serve(app: web.Application) -> TestServer:
        server = GatewayTestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return server

    yield serve
    while servers:
        await servers.pop().close()


@pytest.fixture
def start_gateway(serve_app: AppServer) -> GatewayFactory:
    async def start(raw: dict[str, Any] | Config, **options: Any) -> TestServer:
        """Serve ``raw`` (a config dict or Config); ``options`` go to ``create_app``.

        The background health prober is off unless ``health_checks=True``: tests that
        need probes call ``app[keys.GATEWAY].runtime.prober.probe_once()`` at the moment
        they choose.
        """
        config = raw if isinstance(raw, Config) else build_config(raw, env={})
        options.setdefault("health_checks", False)
        return await serve_app(create_app(config, **options))

    return start


@pytest.fixture
async def gateway(start_gateway: GatewayFactory, upstream: FakeUpstream) -> TestServer:
    return await start_gateway(gateway_config(upstream))


def base_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def sdk(gateway: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=base_url(gateway) + "/v1", api_key=ADMIN_TOKEN, max_retries=0
    )
    yield client
    await client.close()


def sdk_for(server: TestServer, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key=token, max_retries=0)


# --------------------------------------------------------------------------------------
# The gateway as a separate process, for tests that measure its memory
# --------------------------------------------------------------------------------------


def serve_command(config: Path, port: int) -> list[str]:
    """``berry-proxy serve`` for ``config`` on 127.0.0.1:``port``, with this interpreter."""
    return [
        sys.executable,
        "-m",
        "berry_proxy",
        "serve",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    """``berry-proxy serve`` running as its own process (started and stopped by PID)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def status_kib(self, field: str) -> int:
        """A memory field of ``/proc/PID/status`` in KiB (``VmRSS``, ``VmHWM``...)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    @property
    def rss_mib(self) -> float:
        return self.status_kib("VmRSS") / 1024

    @property
    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                lines.append(orjson.loads(raw))
        return lines

    def stop(self, timeout: float = 10.0) -> int:
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode


class ProcessFactory(Protocol):
    def __call__(
        self, raw: dict[str, Any], env: dict[str, str] | None = None
    ) -> Awaitable[GatewayProcess]: ...


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[ProcessFactory]:
    """Start ``berry-proxy serve`` on a free loopback port with a config dict (and more
    environment variables: ``env``); each one is stopped (SIGTERM by its PID, SIGKILL if
    it hangs) when the test ends."""
    started: list[GatewayProcess] = []

    async def start(raw: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
        index = len(started)
        config = tmp_path / f"gateway-{index}.yaml"
        config.write_bytes(orjson.dumps(raw))  # JSON is YAML
        port = free_port()
        log_path = tmp_path / f"gateway-{index}.log"
        with log_path.open("wb") as log:
            # Popen only forks and execs (no waiting); S603: our own interpreter and module.
            process = subprocess.Popen(  # noqa: ASYNC220, S603
                serve_command(config, port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if env is None else {**os.environ, **env},
            )
        gateway = GatewayProcess(process, port, log_path, config)
        started.append(gateway)
        await _until_ready(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


async def _until_ready(gateway: GatewayProcess, within: float = 15.0) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(within):
        while True:
            if gateway.process.poll() is not None:
                raise AssertionError(f"berry-proxy exited early: {gateway.log_path.read_text()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(gateway.url + "/v1/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)  # polling another process: nothing to await


# --------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium; .ci/run installs it)
# --------------------------------------------------------------------------------------

# As the machine's notes say Chromium must start here: without the background-networking
# flags it keeps trying (and failing) to reach Google's hosts.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
)


def required_tool(names: tuple[str, ...], flag: str, package: str) -> str:
    """The path of the first of ``names`` installed; without one the test is skipped,
    unless ``$flag`` is ``1`` (``.ci/run`` sets it) and makes that a failure."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    if os.environ.get(flag) == "1":
        pytest.fail(f"{names[0]} is required here ({flag}=1) but not installed")
    pytest.skip(f"{names[0]} is not installed (Debian package {package}; .ci/run installs it)")


def chromium() -> str:
    """Chromium's path (``BERRY_REQUIRE_BROWSER=1``: required)."""
    return required_tool(("chromium", "chromium-browser"), "BERRY_REQUIRE_BROWSER", "chromium")
