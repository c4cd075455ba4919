"""Soak: mixed traffic through one gateway process for minutes, with reloads; RSS over time.

`make soak` runs it for 10 minutes (`make soak SOAK_ARGS="--minutes 2"` for a shorter run;
`--seconds` for a very short one). In one temporary directory it starts:

- two fake OpenAI upstreams, served by this process (aiohttp): `steady`, which always
  answers, and `flaky`, which answers 25 % of requests with HTTP 500 and drops the
  connection before answering for another 10 % (every failure happens before the first
  byte: another backend can always save the request);
- `berry-proxy serve` (its own process group, stopped by PID) with one model over both
  upstreams (`smart_ai`, `max_retries: 3`, the breaker at defaults) and a rate-limited user.

Then ``--workers`` concurrent clients loop until the time is up, each request drawn at
random: a stream of ~30 events read to its end (45 %), a plain completion (35 %), an
embedding (10 %), or a stream the client leaves after its second event (10 %). Every
``--reload-every`` seconds the config file is rewritten (the steady backend's weight
alternates) and the gateway gets SIGHUP; each reload must be logged as
``config_reloaded``.

Every ``--sample-every`` seconds it prints the gateway's RSS, requests so far and errors.
An error is anything a client did not get whole: a non-200 answer, a stream without
``[DONE]``, a socket error (streams the client itself leaves are not errors). At the end
it prints the RSS trend after warm-up (the first quarter of the run, at least 30 s): the
least-squares slope in MiB per minute and the growth from the first to the last sample
after warm-up. Exit status 1 when any request failed, a reload was not applied, or RSS grew
by more than ``--max-growth-mib`` after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from run import Supervisor, free_port, gateway_executable, wait_ready

TOKEN = "soak-client-token-0123456789"  # noqa: S105  # a test token on loopback
STREAM_EVENTS = 30
EVENT_GAP_SECONDS = 0.005
FLAKY_500 = 0.25
FLAKY_RESET = 0.10


# ------------------------------------------------------------------------ upstreams


def completion(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-soak",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return event(
        {
            "id": "chatcmpl-soak",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


@dataclass
class Upstream:
    """A fake OpenAI upstream; ``flaky`` fails some requests before answering."""

    name: str
    flaky: bool
    rng: random.Random
    received: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.models)
        return app

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "soak-model"}]})

    def _fail(self, request: web.Request) -> web.Response | None:
        if not self.flaky:
            return None
        draw = self.rng.random()
        if draw < FLAKY_500:
            self.received["500"] += 1
            return web.json_response(
                {"error": {"message": "flaky", "type": "server_error"}}, status=500
            )
        if draw < FLAKY_500 + FLAKY_RESET:
            self.received["reset"] += 1
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the closed connection
        return None

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        failed = self._fail(request)
        if failed is not None:
            return failed
        self.received["ok"] += 1
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1] * 8}],
                "model": body["model"],
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            }
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        failed = self._fail(request)
        if failed is not None:
            return failed
        self.received["ok"] += 1
        model = body["model"]
        if not body.get("stream"):
            return web.json_response(completion(model))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await response.write(chunk(model, {"role": "assistant", "content": ""}))
            for index in range(STREAM_EVENTS):
                await response.write(chunk(model, {"content": f"t{index} "}))
                await asyncio.sleep(EVENT_GAP_SECONDS)  # a model emitting tokens
            await response.write(chunk(model, {}, "stop"))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the gateway closed it: its client left
        return response


# -------------------------------------------------------------------------- gateway


def gateway_config(port: int, steady: int, flaky: int, steady_weight: int) -> dict[str, Any]:
    provider = {"type": "openai", "api_key": "", "first_byte_timeout_seconds": 5}
    return {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout_seconds": 5},
        "providers": {
            "steady": {**provider, "base_url": f"http://127.0.0.1:{steady}"},
            "flaky": {**provider, "base_url": f"http://127.0.0.1:{flaky}"},
        },
        "models": {
            "soak": {
                "strategy": "smart_ai",
                "backends": [
                    {"provider": "steady", "model": "soak-model", "weight": steady_weight},
                    {"provider": "flaky", "model": "soak-model", "weight": 2},
                ],
            }
        },
        "users": {
            "client": {
                "token": TOKEN,
                "allowed_models": ["soak"],
                "rate_limit": {"requests_per_minute": 1_000_000, "max_concurrent": 1000},
            }
        },
        "settings": {"max_retries": 3, "health_check_interval_seconds": 5},
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def reloads_applied(log: Path) -> int:
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"config_reloaded"' in line:
            count += 1
    return count


# ---------------------------------------------------------------------------- load


@dataclass
class Tally:
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


async def one_request(session: aiohttp.ClientSession, base: str, kind: str, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    tally.requests += 1
    tally.kinds[kind] += 1
    payload: dict[str, Any]
    if kind == "embedding":
        path, payload = "/v1/embeddings", {"model": "soak", "input": "hello"}
    else:
        payload = {
            "model": "soak",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": kind in ("stream", "leave"),
        }
        path = "/v1/chat/completions"
    try:
        async with session.post(base + path, json=payload, headers=headers) as response:
            if response.status != 200:
                tally.errors[f"HTTP {response.status}"] += 1
                await response.read()
                return
            if kind == "leave":
                seen = 0
                async for _ in response.content.iter_any():
                    seen += 1
                    if seen >= 2:
                        break
                response.close()  # the client leaves mid-stream
                return
            body = await response.read()
            if kind == "stream" and not body.rstrip().endswith(b"data: [DONE]"):
                tally.errors["stream without [DONE]"] += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.errors[type(exc).__name__] += 1


async def worker(base: str, until: float, rng: random.Random, tally: Tally) -> None:
    kinds = ("stream", "plain", "embedding", "leave")
    weights = (45, 35, 10, 10)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            await one_request(session, base, rng.choices(kinds, weights)[0], tally)


# ----------------------------------------------------------------------------- run


@dataclass
class Sample:
    elapsed: float
    rss: float
    requests: int
    errors: int


def trend(samples: list[Sample], warmup: float) -> tuple[float, float]:
    """(slope in MiB per minute, growth in MiB) of the samples after ``warmup`` seconds."""
    after = [s for s in samples if s.elapsed >= warmup]
    if len(after) < 2:
        return 0.0, 0.0
    slope = statistics.linear_regression([s.elapsed for s in after], [s.rss for s in after])
    return slope.slope * 60, after[-1].rss - after[0].rss


async def start_upstreams(upstreams: list[Upstream]) -> tuple[list[web.AppRunner], list[int]]:
    runners, ports = [], []
    for upstream in upstreams:
        runner = web.AppRunner(upstream.app(), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        ports.append(port)
    return runners, ports


@dataclass
class Run:
    """What one soak measured."""

    tally: Tally
    samples: list[Sample]
    reloads_sent: int
    reloads_applied: int


async def drive(
    args: argparse.Namespace, tmp: Path, sup: Supervisor, ports: list[int], rng: random.Random
) -> Run:
    """Start the gateway, load it until the time is up, reloading and sampling RSS."""
    port = free_port()
    config = tmp / "berry.yaml"
    weight = 2

    def write_config() -> None:
        config.write_text(json.dumps(gateway_config(port, ports[0], ports[1], weight)))

    write_config()
    proc = sup.start("gateway", [gateway_executable(), "serve", "--config", str(config)])
    base = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_ready, "gateway", f"{base}/v1/health", proc, sup)
    tally = Tally()
    started = time.monotonic()
    until = started + args.duration
    workers = [
        asyncio.create_task(worker(base, until, random.Random(rng.random()), tally))
        for _ in range(args.workers)
    ]
    samples: list[Sample] = []
    reloads_sent = 0
    next_reload = started + args.reload_every
    print(
        f"soak: {args.duration:.0f} s, {args.workers} clients, reload every "
        f"{args.reload_every:.0f} s; gateway pid {proc.pid}"
    )
    print(f"{'elapsed':>8} {'RSS MiB':>8} {'requests':>9} {'errors':>7}")
    while True:
        now = time.monotonic()
        sample = Sample(now - started, rss_mib(proc.pid), tally.requests, tally.error_count)
        samples.append(sample)
        print(f"{sample.elapsed:8.0f} {sample.rss:8.1f} {sample.requests:9d} {sample.errors:7d}")
        if now >= until:
            break
        while next_reload <= now:
            weight = 3 - weight  # 2, 1, 2, ...: a real change every time
            write_config()
            proc.send_signal(signal.SIGHUP)
            reloads_sent += 1
            next_reload += args.reload_every
        await asyncio.sleep(min(args.sample_every, max(0.0, until - now)))
        sup.assert_running()
    await asyncio.gather(*workers)
    await asyncio.sleep(1.0)  # let the last reload's log line land
    return Run(tally, samples, reloads_sent, reloads_applied(sup.log_path("gateway")))


def report(args: argparse.Namespace, run: Run, upstreams: list[Upstream]) -> int:
    tally, samples = run.tally, run.samples
    warmup = max(30.0, args.duration / 4)
    slope, growth = trend(samples, warmup)
    rate = tally.requests / max(args.duration, 1e-9)
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(tally.kinds.items()))
    print()
    print(f"requests: {tally.requests} ({rate:.0f}/s): {kinds}")
    print(f"flaky upstream: {dict(upstreams[1].received)}; steady: {dict(upstreams[0].received)}")
    print(f"errors: {tally.error_count}" + (f" {dict(tally.errors)}" if tally.errors else ""))
    print(f"reloads: {run.reloads_sent} sent, {run.reloads_applied} applied")
    print(
        f"RSS after {warmup:.0f} s warm-up: {slope:+.2f} MiB/min, {growth:+.1f} MiB "
        f"(first {samples[0].rss:.1f}, peak {max(s.rss for s in samples):.1f}, "
        f"last {samples[-1].rss:.1f} MiB)"
    )
    failed = []
    if tally.error_count:
        failed.append(f"{tally.error_count} request(s) failed")
    if run.reloads_applied != run.reloads_sent:
        failed.append(f"{run.reloads_sent - run.reloads_applied} reload(s) not applied")
    if growth > args.max_growth_mib:
        failed.append(f"RSS grew {growth:.1f} MiB after warm-up (limit {args.max_growth_mib})")
    print("verdict: " + ("; ".join(failed) if failed else "OK: no failed request, RSS flat"))
    return 1 if failed else 0


async def soak(args: argparse.Namespace, tmp: Path, sup: Supervisor) -> int:
    rng = random.Random(args.seed)  # traffic mix, not cryptography
    upstreams = [Upstream("steady", False, random.Random(1)), Upstream("flaky", True, rng)]
    runners, ports = await start_upstreams(upstreams)
    try:
        run = await drive(args, tmp, sup, ports, rng)
    finally:
        for runner in runners:
            await runner.cleanup()
    return report(args, run, upstreams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=10.0)
    length.add_argument("--seconds", type=float)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--reload-every", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--max-growth-mib", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    args.duration = args.seconds if args.seconds is not None else args.minutes * 60
    with tempfile.TemporaryDirectory(prefix="berry-soak-") as name:
        sup = Supervisor(Path(name))
        try:
            return asyncio.run(soak(args, Path(name), sup))
        finally:
            sup.stop_all()


if __name__ == "__main__":
    sys.exit(main())
