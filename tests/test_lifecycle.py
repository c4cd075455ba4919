"""``berry-proxy serve`` as its own process, driven by real signals and a fake systemd.

SIGHUP during a long stream, a broken file on SIGHUP, SIGTERM during open streams (they
complete; new connections are refused; exit code 0), a drain that runs out (the stream's
``draining`` error event), a second SIGTERM, and the ``sd_notify`` messages a unix
datagram socket bound by the test receives as ``$NOTIFY_SOCKET``.

The upstream is a ``FakeUpstream`` in this test's event loop whose ``gated`` mode holds a
stream open after its first content event until the test opens the gate: every step
waits on an event, never on a guess of how long something takes. Waiting on the other
process (its log, its listening socket) polls, bounded.
"""

from __future__ import annotations

import asyncio
import copy
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    FakeUpstream,
    GatewayProcess,
    ProcessFactory,
    chat_body,
    gateway_config,
)

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
WITHIN = 15.0  # seconds: the bound on waiting for the other process


def long_config(upstream: FakeUpstream, **server: Any) -> dict[str, Any]:
    raw = gateway_config(upstream)
    raw["providers"]["up1"]["first_byte_timeout_seconds"] = 30
    raw["providers"]["up1"]["idle_timeout_seconds"] = 30
    raw["server"].update(server)
    return raw


async def until(check: Callable[[], bool], what: str, within: float = WITHIN) -> None:
    """Poll ``check`` (about the other process) until it holds, at most ``within`` s."""
    try:
        async with asyncio.timeout(within):
            while not check():  # noqa: ASYNC110  # another process: no event to await
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def logged(gateway: GatewayProcess, event: str) -> Callable[[], bool]:
    return lambda: any(line.get("event") == event for line in gateway.log_lines())


def refuses_connections(gateway: GatewayProcess) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", gateway.port)) != 0


async def exit_code(gateway: GatewayProcess, within: float = WITHIN) -> int:
    await until(lambda: gateway.process.poll() is not None, "the process to exit", within)
    code = gateway.process.returncode
    assert code is not None
    return code


async def open_stream(
    session: aiohttp.ClientSession, gateway: GatewayProcess, upstream: FakeUpstream
) -> aiohttp.ClientResponse:
    """A chat stream through ``gateway``, held open by the gated upstream."""
    upstream.first_chunk_sent.clear()
    response = await session.post(
        gateway.url + "/v1/chat/completions", data=chat_body(stream=True), headers=HEADERS
    )
    assert response.status == 200
    await upstream.first_chunk_sent.wait()
    return response


def last_event(body: bytes) -> bytes:
    return [e for e in body.split(b"\n\n") if e][-1]


async def chat_status(gateway: GatewayProcess, model: str = "gpt-test") -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions", data=chat_body(model=model), headers=HEADERS
        ) as response,
    ):
        return response.status


async def generation(gateway: GatewayProcess) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/admin/system-stats", headers=HEADERS) as response,
    ):
        value: int = (await response.json())["config_generation"]
        return value


async def test_sighup_during_a_long_stream_reloads_and_the_stream_completes(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    raw = long_config(upstream)
    gateway = await gateway_process(raw)
    upstream.mode = "gated"
    async with aiohttp.ClientSession() as session:
        response = await open_stream(session, gateway, upstream)
        new = copy.deepcopy(raw)
        new["models"]["gpt-new"] = {"backends": [{"provider": "up1", "model": "up-model"}]}
        gateway.config_path.write_bytes(orjson.dumps(new))
        gateway.process.send_signal(signal.SIGHUP)
        await until(logged(gateway, "config_reloaded"), "the reload")
        upstream.mode = "ok"
        assert await chat_status(gateway, "gpt-new") == 200  # the next request: new config
        assert await generation(gateway) == 2
        upstream.gate.set()
        body = await response.read()
        response.release()
    assert last_event(body) == b"data: [DONE]"
    assert gateway.process.poll() is None  # SIGHUP did not end it (the original's did)


async def test_a_broken_file_on_sighup_is_logged_and_the_old_config_serves(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(long_config(upstream))
    gateway.config_path.write_text("providers:\n  up1: {type: openai}\nmodels: 3\n")
    gateway.process.send_signal(signal.SIGHUP)
    await until(logged(gateway, "config_reload_failed"), "the failed reload")
    (line,) = [x for x in gateway.log_lines() if x.get("event") == "config_reload_failed"]
    assert line["level"] == "error"
    assert line["error_count"] == len(line["errors"]) >= 2
    assert line["generation"] == 1
    assert await chat_status(gateway) == 200
    assert await generation(gateway) == 1


async def test_sigterm_drains_two_open_streams_refuses_new_connections_and_exits_0(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(long_config(upstream, drain_timeout_seconds=30))
    upstream.mode = "gated"
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as two:
        first = await open_stream(one, gateway, upstream)
        second = await open_stream(two, gateway, upstream)
        gateway.process.send_signal(signal.SIGTERM)
        await until(lambda: refuses_connections(gateway), "the listener to close")
        await until(logged(gateway, "draining"), "the drain to start")
        assert gateway.process.poll() is None  # still serving the two streams
        upstream.gate.set()
        bodies = [await first.read(), await second.read()]
        first.release()
        second.release()
    assert [last_event(b) for b in bodies] == [b"data: [DONE]", b"data: [DONE]"]
    assert await exit_code(gateway) == 0
    assert logged(gateway, "drained")()


async def test_a_drain_that_runs_out_ends_the_stream_with_the_draining_event(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(long_config(upstream, drain_timeout_seconds=1))
    upstream.mode = "gated"  # never opened: the stream outlives the drain
    async with aiohttp.ClientSession() as session:
        response = await open_stream(session, gateway, upstream)
        gateway.process.send_signal(signal.SIGTERM)
        body = await response.read()
        response.release()
    error = orjson.loads(last_event(body).removeprefix(b"data: "))["error"]
    assert error["code"] == "draining"
    assert await exit_code(gateway) == 0
    assert logged(gateway, "drain_timeout")()
    await upstream.disconnected.wait()  # the provider's connection was closed


async def test_a_second_sigterm_ends_the_drain_at_once(
    gateway_process: ProcessFactory, upstream: FakeUpstream
) -> None:
    gateway = await gateway_process(long_config(upstream, drain_timeout_seconds=600))
    upstream.mode = "gated"
    async with aiohttp.ClientSession() as session:
        response = await open_stream(session, gateway, upstream)
        gateway.process.send_signal(signal.SIGTERM)
        await until(logged(gateway, "draining"), "the drain to start")
        gateway.process.send_signal(signal.SIGTERM)
        body = await response.read()
        response.release()
    assert b'"draining"' in last_event(body)
    assert await exit_code(gateway, within=5) == 0  # not the 600 s drain
    assert logged(gateway, "drain_cut_short")()


# --------------------------------------------------------------------------------------
# systemd's notify protocol, received on a socket this test binds
# --------------------------------------------------------------------------------------


@pytest.fixture
async def notify_socket(tmp_path: Path) -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def receive(sock: socket.socket, within: float = WITHIN) -> dict[str, str]:
    """The next datagram that is not a watchdog ping, as its ``KEY=VALUE`` fields."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        while True:
            data = await loop.sock_recv(sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if fields != {"WATCHDOG": "1"}:
                return fields


async def test_notify_socket_receives_ready_reloading_ready_stopping_in_order(
    gateway_process: ProcessFactory,
    upstream: FakeUpstream,
    notify_socket: socket.socket,
) -> None:
    address = notify_socket.getsockname()
    gateway = await gateway_process(
        long_config(upstream), env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    )
    ready = await receive(notify_socket)
    assert ready["READY"] == "1"
    assert "Serving 2 models" in ready["STATUS"]

    gateway.process.send_signal(signal.SIGHUP)
    reloading = await receive(notify_socket)
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    again = await receive(notify_socket)
    assert again["READY"] == "1"
    assert "generation 2" in again["STATUS"]

    gateway.process.send_signal(signal.SIGTERM)
    stopping = await receive(notify_socket)
    assert stopping["STOPPING"] == "1"
    assert "Draining" in stopping["STATUS"]
    assert await exit_code(gateway) == 0


async def test_watchdog_pings_keep_arriving_when_watchdog_usec_is_set(
    gateway_process: ProcessFactory, upstream: FakeUpstream, notify_socket: socket.socket
) -> None:
    gateway = await gateway_process(
        long_config(upstream),
        env={"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "200000"},
    )
    loop = asyncio.get_running_loop()
    pings = 0
    async with asyncio.timeout(WITHIN):
        while pings < 5:  # 0.1 s apart: well within the bound
            if await loop.sock_recv(notify_socket, 4096) == b"WATCHDOG=1":
                pings += 1
    assert gateway.process.poll() is None
