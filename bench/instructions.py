"""Instructions per request: the gateway against the bare pass-through, without the noise.

CPU seconds per request (`run.py`) move with what else the machine runs: on a shared 2-core
VM one run's gateway ÷ bare ratio spreads by ±0.25. This counts instead the user-space
instructions each server executes per request, under valgrind's cachegrind (no cache
simulation, some 30 times slower than native), which repeats to within 1 % from run to
run however busy the machine is. It is the measure for deciding whether a change made the hot path
dearer; `run.py`'s CPU tables stay the measure of what a request costs in time.

Each server runs twice under cachegrind, serving N1 and then N2 requests (an aiohttp client
in this process keeps `connections` requests in flight); the instructions per request are
the difference of the two totals divided by N2 - N1, so start-up and shutdown cancel out.
Syscalls run in the kernel, which cachegrind does not see: a change that adds a syscall per
request shows in `run.py`, not here.

    .venv/bin/python bench/instructions.py                       # bare and gateway
    .venv/bin/python bench/instructions.py --baseline /tmp/base  # also another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from run import (
    PASSTHROUGH,
    SCENARIOS,
    TIMES,
    TOKEN,
    BenchError,
    Scenario,
    Supervisor,
    ensure_tools,
    free_port,
    gateway_config,
    gateway_executable,
    request_body,
    start_nginx,
    temp_dir,
    wait_ready,
)

READY_TIMEOUT_S = 120.0  # a Python server starts ~30x slower under valgrind
SUMMARY_RE = re.compile(r"^summary: (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Server:
    """How to start one server under test on a port (``{port}``, ``{upstream}``)."""

    name: str
    health_path: str
    stream_prefix: str
    source: Path | None = None  # a checkout to import berry_proxy from (``--baseline``)

    def command(self, port: int, upstream: str, config: Path) -> list[str]:
        if self.name == "bare":
            return [sys.executable, str(PASSTHROUGH), "--upstream", upstream, "--port", str(port)]
        return [gateway_executable(), "serve", "--config", str(config), "--port", str(port)]


def count_instructions(
    sup: Supervisor, server: Server, upstream: str, scenario: Scenario, requests: int
) -> int:
    """Total instructions of one server process that served ``requests`` requests."""
    port = free_port()
    upstream_port = int(upstream.rsplit(":", 1)[1])
    config = sup.tmp / f"{server.name}-{port}.yaml"
    config.write_text(gateway_config(port, upstream_port))
    out = sup.tmp / f"{server.name}-{scenario.key}-{requests}.cachegrind"
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"]
    env = None
    if server.source is not None:
        env = {**os.environ, "PYTHONPATH": str(server.source.resolve())}
    name = f"{server.name}-{scenario.key}-{requests}"
    proc = sup.start(name, [*valgrind, *server.command(port, upstream, config)], env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(name, f"{base}{server.health_path}", proc, sup, READY_TIMEOUT_S)
    url = f"{base}{server.stream_prefix if scenario.stream else ''}/v1/chat/completions"
    asyncio.run(drive(url, scenario, requests))
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=READY_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{name} did not stop; log:\n{sup.log_tail(name)}") from exc
    match = SUMMARY_RE.search(out.read_text()) if out.exists() else None
    if match is None:
        raise BenchError(f"{name}: no cachegrind summary; log:\n{sup.log_tail(name)}")
    return int(match.group(1))


async def drive(url: str, scenario: Scenario, requests: int) -> None:
    """Send exactly ``requests`` requests, ``scenario.connections`` at a time, each
    checked: a 200 whose body is a chat completion or a stream ending in ``[DONE]``."""
    body = request_body(scenario.stream)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    marker = b"data: [DONE]" if scenario.stream else b'"chat.completion"'
    left = requests
    connector = aiohttp.TCPConnector(limit=scenario.connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.read()
                if response.status != 200 or marker not in answer:
                    raise BenchError(f"{url} answered {response.status}: {answer[:300]!r}")

        await asyncio.gather(*(worker() for _ in range(scenario.connections)))


def per_request(
    sup: Supervisor, server: Server, upstream: str, scenario: Scenario, counts: tuple[int, int]
) -> float:
    """Instructions per request: the difference of two runs over their request counts."""
    low, high = counts
    first = count_instructions(sup, server, upstream, scenario, low)
    second = count_instructions(sup, server, upstream, scenario, high)
    return (second - first) / (high - low)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline", type=Path, metavar="CHECKOUT", help="also count another checkout's gateway"
    )
    parser.add_argument(
        "--requests",
        default="200,600",
        help="the two request counts whose difference is measured (default 200,600)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(s.key for s in SCENARIOS),
        help="comma-separated subset of the scenarios (default: all)",
    )
    parser.add_argument(
        "--no-bare",
        action="store_true",
        help="count only the gateway (and --baseline): for A/B runs, where the bare "
        "proxy's count is already known",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and outputs")
    args = parser.parse_args(argv)
    keys = {s.key: s for s in SCENARIOS}
    chosen = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    if not chosen or any(k not in keys for k in chosen):
        parser.error(f"--scenarios: choose from {', '.join(keys)}")
    args.chosen = [keys[k] for k in chosen]
    low, _, high = args.requests.partition(",")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) < int(high)):
        parser.error("--requests: two counts, the first smaller, e.g. 200,600")
    args.counts = (int(low), int(high))
    if args.baseline is not None and not (args.baseline / "berry_proxy").is_dir():
        parser.error(f"--baseline: {args.baseline} holds no berry_proxy package")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers = [Server("gateway", "/v1/health", "")]
    if not args.no_bare:
        servers.insert(0, Server("bare", "/v1/models", "/stream"))
    if args.baseline is not None:
        servers.append(Server("baseline", "/v1/health", "", args.baseline))
    try:
        if shutil.which("valgrind") is None:
            raise BenchError("needs valgrind: `sudo apt-get install -y valgrind`")
        _, nginx = ensure_tools()
        with temp_dir(args.keep_temp) as tmp:
            sup = Supervisor(tmp)
            try:
                upstream = start_nginx(sup, nginx).base_url
                for scenario in args.chosen:
                    report(scenario, servers, upstream, sup, args.counts)
            finally:
                sup.stop_all()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


def report(
    scenario: Scenario,
    servers: Sequence[Server],
    upstream: str,
    sup: Supervisor,
    counts: tuple[int, int],
) -> None:
    """One scenario: thousands of instructions per request per server, and the ratios."""
    counted = {s.name: per_request(sup, s, upstream, scenario, counts) for s in servers}
    line = ", ".join(f"{name} {value / 1000:.0f}k" for name, value in counted.items())
    print(f"{scenario.title}: instructions per request: {line}", flush=True)
    bare = counted.get("bare")
    for name in ("gateway", "baseline"):
        if name in counted and bare is not None:
            print(f"  {name} ÷ bare: {counted[name] / bare:.3f}{TIMES}", flush=True)
    if "baseline" in counted:
        print(f"  gateway ÷ baseline: {counted['gateway'] / counted['baseline']:.3f}{TIMES}")


if __name__ == "__main__":
    sys.exit(main())
