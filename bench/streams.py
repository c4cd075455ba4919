"""Streams as models send them: the per-event path, and thousands of streams open at once.

`make bench` runs this after the CPU tables (`run.py --streams-only` alone). The upstream
is bench/slow_upstream.py, which writes small SSE events with real gaps between them, one
write per event, each stamped with the time it was written; the load client is
bench/stream_load.py, which times every event. Both run in processes of their own, beside
the bare pass-through and the gateway (`run.py`'s production-like config: auth, a rate
limit, SmartAI, metrics, the JSON access log), each server measured in turn.

1. **Realistic stream**: 16 connections each sending streams of 200 events 2 ms apart,
   back to back. CPU per stream and per event of each server (from /proc, as in the CPU
   tables), and how long an event takes from the upstream's write to the client's read,
   at p50 and p99, through each server: the difference is the time an event spends in
   the gateway beyond what any aiohttp proxy takes. Goal: gateway ÷ bare CPU at most 1.25 times.
2. **Open streams**: 1000 streams (``--open-streams 1000,5000`` adds a 5000 run) opened at
   once, 50 events 20 ms apart each. Errors (goal 0), time to the first content event at p50
   (goal: within 1.5 times the bare proxy's), and the server's RSS: idle before (goal
   ≤ 60 MB), at the peak (goal ≤ 120 MB at 1000 streams), 3 s after the streams closed,
   and the memory each open stream holds.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from run import (
    BENCH_DIR,
    PASSTHROUGH,
    TIMES,
    TOKEN,
    BenchError,
    Settings,
    Supervisor,
    cpu_seconds,
    free_port,
    gateway_document,
    gateway_executable,
    process_tree,
    wait_ready,
)

SLOW_UPSTREAM = BENCH_DIR / "slow_upstream.py"
STREAM_LOAD = BENCH_DIR / "stream_load.py"

REALISTIC_EVENTS, REALISTIC_GAP_MS, REALISTIC_CONNECTIONS = 200, 2, 16
OPEN_EVENTS, OPEN_GAP_MS = 50, 20
CPU_GOAL = 1.25  # gateway ÷ bare CPU per stream, realistic stream
TTFB_GOAL = 1.5  # gateway ÷ bare time to first event at p50, open streams
IDLE_RSS_GOAL_MB = 60.0
PEAK_RSS_GOAL_MB = 120.0  # at 1000 open streams
RSS_SAMPLE_S = 0.02
SETTLE_S = 3.0  # after the open streams closed, before RSS is read again
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Server:
    """A proxy under test: its stream URL per model and the process that pays for it."""

    name: str
    pid: int
    urls: dict[str, str]  # model -> chat completions URL


@dataclass
class StreamRow:
    """One server's realistic-stream result (medians over rounds)."""

    target: str
    streams: int
    events: int
    seconds: float
    errors: int
    ttfb_p50_ms: float | None
    event_p50_ms: float | None
    event_p99_ms: float | None
    cpu_ms_per_stream: float | None
    cpu_us_per_event: float | None
    client_core_pct: float


@dataclass
class OpenRow:
    """One server's open-streams result."""

    target: str
    count: int
    streams: int
    errors: int
    error_kinds: dict[str, int]
    seconds: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    rss_idle_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    client_core_pct: float

    @property
    def per_stream_kb(self) -> float:
        return (self.rss_peak_mb - self.rss_idle_mb) * 1024 / self.count


@dataclass
class StreamsResult:
    realistic: list[StreamRow]
    open_streams: list[OpenRow]
    rss_at_start_mb: dict[str, float]

    @property
    def valid(self) -> bool:
        """No errors anywhere: otherwise the numbers measure failures."""
        return not any(r.errors for r in self.realistic) and not any(
            r.errors for r in self.open_streams
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "realistic": [asdict(r) for r in self.realistic],
            "open_streams": [
                asdict(r) | {"per_stream_kb": r.per_stream_kb} for r in self.open_streams
            ],
            "rss_at_start_mb": self.rss_at_start_mb,
        }


def path_of(events: int, gap_ms: int) -> str:
    """The upstream path that streams ``events`` events ``gap_ms`` apart."""
    return f"/{events}x{gap_ms}/v1"


MODELS = {
    "bench-realistic": path_of(REALISTIC_EVENTS, REALISTIC_GAP_MS),
    "bench-open": path_of(OPEN_EVENTS, OPEN_GAP_MS),
}


def start_servers(sup: Supervisor) -> list[Server]:
    """The slow upstream, then the bare pass-through and the gateway in front of it."""
    up_port = free_port()
    upstream = sup.start(
        "slow-upstream", [sys.executable, str(SLOW_UPSTREAM), "--port", str(up_port)]
    )
    base = f"http://127.0.0.1:{up_port}"
    wait_ready("slow-upstream", f"{base}/1x1/v1/models", upstream, sup)

    bare_port = free_port()
    bare = sup.start(
        "streams-bare",
        [sys.executable, str(PASSTHROUGH), "--upstream", base, "--port", str(bare_port)],
    )
    bare_base = f"http://127.0.0.1:{bare_port}"
    wait_ready("streams-bare", f"{bare_base}/1x1/v1/models", bare, sup)

    gw_port = free_port()
    config = sup.tmp / "berry-streams.yaml"
    document = gateway_document(gw_port, {m: base + p for m, p in MODELS.items()})
    for provider in document["providers"].values():
        # 5000 open streams on one provider: above its default slot limit (4096), which
        # would make the gateway refuse the rest, as configured, not measure them.
        provider["max_connections"] = 10_000
    config.write_text(json.dumps(document, indent=2) + "\n")
    gateway = sup.start("streams-gateway", [gateway_executable(), "serve", "--config", str(config)])
    gw_base = f"http://127.0.0.1:{gw_port}"
    wait_ready("streams-gateway", f"{gw_base}/v1/health", gateway, sup)
    return [
        Server(
            "bare",
            bare.pid,
            {m: f"{bare_base}{p}/chat/completions" for m, p in MODELS.items()},
        ),
        Server(
            "gateway",
            gateway.pid,
            {m: f"{gw_base}/v1/chat/completions" for m in MODELS},
        ),
    ]


def run_load(
    server: Server, model: str, args: Sequence[str], on_open: Any = None
) -> dict[str, Any]:
    """Run bench/stream_load.py against ``server``; its JSON result, plus ``client_cpu_s``.

    ``on_open`` is called when a burst reports all its streams open (``OPEN`` on stderr).
    """
    cmd = [sys.executable, str(STREAM_LOAD), "--url", server.urls[model], "--token", TOKEN]
    events = REALISTIC_EVENTS if model == "bench-realistic" else OPEN_EVENTS
    cmd += ["--model", model, "--events", str(events), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    assert proc.stderr is not None  # piped
    assert proc.stdout is not None  # piped
    try:
        stderr_lines = []
        for line in proc.stderr:
            if line.strip() == "OPEN" and on_open is not None:
                on_open()
            else:
                stderr_lines.append(line)
        out = proc.stdout.read()
        proc.wait(timeout=LOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise BenchError(f"the stream load against {server.name} did not finish") from exc
    if proc.returncode != 0 or not out.strip():
        raise BenchError(
            f"stream_load.py failed ({proc.returncode}) against {server.name}: "
            + "".join(stderr_lines[-20:])
        )
    result: dict[str, Any] = json.loads(out)
    return result


def measure_realistic(server: Server, seconds: int, warmup: int) -> StreamRow:
    """One measured run of the realistic-stream scenario against one server."""
    connections = ["--connections", str(REALISTIC_CONNECTIONS)]
    if warmup > 0:
        run_load(server, "bench-realistic", [*connections, "--seconds", str(warmup)])
    pids = process_tree(server.pid)
    before = cpu_seconds(pids)
    load = run_load(server, "bench-realistic", [*connections, "--seconds", str(seconds)])
    cpu = cpu_seconds(pids) - before
    streams, events = load["streams"], load["events"]
    return StreamRow(
        target=server.name,
        streams=streams,
        events=events,
        seconds=load["seconds"],
        errors=load["errors"],
        ttfb_p50_ms=load["ttfb_p50_ms"],
        event_p50_ms=load["event_p50_ms"],
        event_p99_ms=load["event_p99_ms"],
        cpu_ms_per_stream=cpu * 1000 / streams if streams else None,
        cpu_us_per_event=cpu * 1e6 / events if events else None,
        client_core_pct=100 * load["cpu_s"] / load["seconds"],
    )


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_stream_row(rows: Sequence[StreamRow]) -> StreamRow:
    return StreamRow(
        target=rows[0].target,
        streams=sum(r.streams for r in rows),
        events=sum(r.events for r in rows),
        seconds=sum(r.seconds for r in rows),
        errors=sum(r.errors for r in rows),
        ttfb_p50_ms=median_of([r.ttfb_p50_ms for r in rows]),
        event_p50_ms=median_of([r.event_p50_ms for r in rows]),
        event_p99_ms=median_of([r.event_p99_ms for r in rows]),
        cpu_ms_per_stream=median_of([r.cpu_ms_per_stream for r in rows]),
        cpu_us_per_event=median_of([r.cpu_us_per_event for r in rows]),
        client_core_pct=statistics.median(r.client_core_pct for r in rows),
    )


def rss_mb(pid: int) -> float:
    """Resident set size of one process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


class PeakSampler:
    """Samples a process's RSS every ``RSS_SAMPLE_S`` in a thread; ``peak`` is the max."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_mb(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.sample()


def measure_open(server: Server, count: int) -> OpenRow:
    """``count`` streams at once against one server, its RSS followed throughout."""
    idle = rss_mb(server.pid)
    with PeakSampler(server.pid) as sampler:
        load = run_load(server, "bench-open", ["--burst", str(count)], on_open=sampler.sample)
    time.sleep(SETTLE_S)
    return OpenRow(
        target=server.name,
        count=count,
        streams=load["streams"],
        errors=load["errors"],
        error_kinds=load["error_kinds"],
        seconds=load["seconds"],
        ttfb_p50_ms=load["ttfb_p50_ms"],
        ttfb_p99_ms=load["ttfb_p99_ms"],
        rss_idle_mb=idle,
        rss_peak_mb=sampler.peak,
        rss_after_mb=rss_mb(server.pid),
        client_core_pct=100 * load["cpu_s"] / load["seconds"],
    )


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_realistic(rows: Sequence[StreamRow], settings: Settings) -> None:
    runs = f"median of {settings.rounds} runs of" if settings.rounds > 1 else "one run of"
    print(
        f"\nrealistic stream: {REALISTIC_EVENTS} events {REALISTIC_GAP_MS} ms apart, "
        f"{REALISTIC_CONNECTIONS} connections ({runs} {settings.duration} s per target)"
    )
    print(
        f"  {'target':<10}{'streams/s':>10}{'events/s':>10}{'ttfb p50':>10}"
        f"{'event p50':>11}{'event p99':>11}{'CPU-ms/stream':>15}{'CPU-µs/event':>14}"
        f"{'errors':>8}{'client CPU':>12}"
    )
    for r in rows:
        print(
            f"  {r.target:<10}{r.streams / r.seconds:>10.1f}{r.events / r.seconds:>10.0f}"
            f"{fmt(r.ttfb_p50_ms):>10}{fmt(r.event_p50_ms, '.3f'):>11}"
            f"{fmt(r.event_p99_ms, '.3f'):>11}{fmt(r.cpu_ms_per_stream, '.3f'):>15}"
            f"{fmt(r.cpu_us_per_event, '.1f'):>14}{r.errors:>8}{r.client_core_pct:>11.0f}%"
        )
    by = {r.target: r for r in rows}
    bare, gateway = by.get("bare"), by.get("gateway")
    if bare is None or gateway is None:
        return
    cpu = ratio(gateway.cpu_ms_per_stream, bare.cpu_ms_per_stream)
    state = "-" if cpu is None else ("MET" if cpu <= CPU_GOAL else "NOT MET")
    goal = f"goal ≤ {CPU_GOAL}{TIMES}"
    print(f"gateway ÷ bare, realistic stream: CPU {fmt(cpu)}{TIMES} ({goal}): {state}")
    for label, top, bottom in (
        ("p50", gateway.event_p50_ms, bare.event_p50_ms),
        ("p99", gateway.event_p99_ms, bare.event_p99_ms),
    ):
        if top is not None and bottom is not None:
            print(
                f"  an event, upstream write to client read, {label}: gateway {top:.3f} ms, "
                f"bare {bottom:.3f} ms: the gateway adds {(top - bottom) * 1000:+.0f} µs"
            )


def print_open(rows: Sequence[OpenRow], rss_at_start: dict[str, float]) -> None:
    for count in sorted({r.count for r in rows}):
        group = [r for r in rows if r.count == count]
        after = "" if count == min(r.count for r in rows) else " (RSS idle: after the run before)"
        print(
            f"\nopen streams: {count} at once, {OPEN_EVENTS} events {OPEN_GAP_MS} ms apart{after}"
        )
        print(
            f"  {'target':<10}{'streams':>8}{'errors':>8}{'ttfb p50':>10}{'ttfb p99':>10}"
            f"{'seconds':>9}{'RSS idle':>10}{'RSS peak':>10}{'RSS after':>11}"
            f"{'per stream':>12}{'client CPU':>12}"
        )
        for r in group:
            print(
                f"  {r.target:<10}{r.streams:>8}{r.errors:>8}{fmt(r.ttfb_p50_ms):>10}"
                f"{fmt(r.ttfb_p99_ms):>10}{r.seconds:>9.2f}{r.rss_idle_mb:>9.1f}M"
                f"{r.rss_peak_mb:>9.1f}M{r.rss_after_mb:>10.1f}M{r.per_stream_kb:>9.1f} KB"
                f"{r.client_core_pct:>11.0f}%"
            )
            if r.error_kinds:
                print(f"  ERRORS: {r.target}: {r.error_kinds}")
        by = {r.target: r for r in group}
        bare, gateway = by.get("bare"), by.get("gateway")
        if bare is None or gateway is None:
            continue
        ttfb = ratio(gateway.ttfb_p50_ms, bare.ttfb_p50_ms)
        checks = [
            ("errors 0", gateway.errors == 0),
            (
                f"ttfb p50 {fmt(ttfb)}{TIMES} ≤ {TTFB_GOAL}{TIMES}",
                ttfb is not None and ttfb <= TTFB_GOAL,
            ),
        ]
        if count == min(r.count for r in rows):
            # Later runs start where the previous one left the process, not idle.
            checks.append(
                (
                    f"RSS idle {gateway.rss_idle_mb:.0f} MB ≤ {IDLE_RSS_GOAL_MB:.0f}",
                    gateway.rss_idle_mb <= IDLE_RSS_GOAL_MB,
                )
            )
        if count <= 1000:
            checks.append(
                (
                    f"RSS peak {gateway.rss_peak_mb:.0f} MB ≤ {PEAK_RSS_GOAL_MB:.0f}",
                    gateway.rss_peak_mb <= PEAK_RSS_GOAL_MB,
                )
            )
        line = "; ".join(f"{text}: {'met' if ok else 'NOT MET'}" for text, ok in checks)
        print(f"gateway, {count} open streams: {line}")
        retained = gateway.rss_after_mb - gateway.rss_idle_mb
        print(
            f"  {SETTLE_S:.0f} s after they closed the gateway holds {retained:+.1f} MB over "
            f"idle ({gateway.per_stream_kb:.1f} KB per open stream at the peak); RSS at start "
            f"{rss_at_start.get('gateway', 0.0):.1f} MB"
        )


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def raise_fd_limit() -> None:
    """Let this runner's children (servers and client) open as many sockets as allowed:
    5000 streams need 5000 client sockets and twice that in a proxy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_streams(settings: Settings, tmp: Path) -> StreamsResult:
    """Start the slow upstream and both proxies, run both scenarios, stop everything."""
    raise_fd_limit()
    sup = Supervisor(tmp)
    try:
        servers = start_servers(sup)
        rss_at_start = {s.name: rss_mb(s.pid) for s in servers}
        print(f"\nstreams: {', '.join(f'{s.name} (pid {s.pid})' for s in servers)}")
        runs: dict[str, list[StreamRow]] = {s.name: [] for s in servers}
        for _ in range(settings.rounds):
            for server in servers:
                runs[server.name].append(
                    measure_realistic(server, settings.duration, settings.warmup)
                )
        realistic = [median_stream_row(runs[s.name]) for s in servers]
        print_realistic(realistic, settings)
        open_rows = [
            measure_open(server, count) for count in settings.open_streams for server in servers
        ]
        print_open(open_rows, rss_at_start)
        sup.assert_running()
        return StreamsResult(realistic, open_rows, rss_at_start)
    finally:
        sup.stop_all()
