"""Benchmark: what does the gateway cost per request, compared with a bare Python proxy?

`make bench` runs this file. It starts three servers on loopback ports, each in its own
process group, all inside one temporary directory:

- a fake OpenAI upstream: nginx answering from memory (`bench/nginx.conf.template`);
- the bare pass-through (`bench/passthrough.py`): aiohttp, one shared session, no logic;
- the gateway (`berry-proxy serve`) with auth, routing, JSON access log and metrics on,

then drives each target (nginx directly, bare, gateway) with wrk for three scenarios
(non-stream at 1 and 16 connections, stream at 16) and prints requests/s, p50/p99 latency
and each server's CPU-seconds per 1000 requests, read from /proc/PID/stat around each run.
CPU per request is the headline: on a small shared machine req/s and latency move with the
neighbours' load, but the CPU a process burns per request barely does. See bench/README.md.

After the CPU tables it runs the failover scenario of bench/failover.py (two backends, one
failing 30 % of requests: client-visible error rate and the latency failover adds);
`--no-failover` skips it, `--failover-only` runs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "post.lua"
NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.template"
PASSTHROUGH = BENCH_DIR / "passthrough.py"

TOKEN = "bench-token-0123456789abcdef"  # noqa: S105 - a fixed token of a throw-away config
CPU_GOAL = 1.25  # issue 12: gateway CPU per request <= 1.25x the bare pass-through
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
APT_TIMEOUT_S = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_NAMES = ("direct", "bare", "gateway")
# The multiplication sign, by name: ruff flags the literal character as a look-alike of x.
TIMES = "\N{MULTIPLICATION SIGN}"


class BenchError(Exception):
    """A failure that makes the numbers meaningless; main() prints it and exits 1."""


@dataclass(frozen=True)
class Scenario:
    """One load shape: streamed or not, and how many concurrent connections wrk keeps open."""

    key: str
    title: str
    stream: bool
    connections: int


SCENARIOS = (
    Scenario("nonstream-c1", "non-stream, 1 connection", stream=False, connections=1),
    Scenario("nonstream-c16", "non-stream, 16 connections", stream=False, connections=16),
    Scenario("stream-c16", "stream, 16 connections", stream=True, connections=16),
)


@dataclass(frozen=True)
class Target:
    """A server under test: where to send requests and which process pays for them."""

    name: str
    base_url: str
    pid: int
    # nginx serves the stream body under /stream/...; the gateway picks the stream upstream
    # from the model name instead, so its paths are the plain OpenAI ones.
    stream_prefix: str

    def url(self, stream: bool) -> str:
        """The chat completions URL to load for this scenario."""
        prefix = self.stream_prefix if stream else ""
        return f"{self.base_url}{prefix}/v1/chat/completions"


@dataclass
class Row:
    """One target's result in one scenario."""

    scenario: str
    target: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1000: float | None
    errors: dict[str, int]
    loadgen_core_pct: float

    @property
    def error_total(self) -> int:
        """Non-2xx/3xx responses plus socket errors: anything but a clean answer."""
        return sum(self.errors.values())


@dataclass
class Settings:
    """Command-line choices."""

    duration: int
    warmup: int
    targets: list[str]
    json_path: Path | None
    keep_temp: bool
    asyncio_bare: bool
    rounds: int
    baseline: Path | None = None  # a checkout whose gateway runs beside this one
    cpu: bool = True  # the CPU-per-request tables
    failover: bool = True  # bench/failover.py's scenario
    streams: bool = True  # bench/streams.py's scenarios
    open_streams: tuple[int, ...] = (1000,)  # how many streams the open-streams runs open


# ---------------------------------------------------------------------------- requests


def request_body(stream: bool) -> bytes:
    """The chat request every target receives (the gateway maps the model to a backend)."""
    body: dict[str, Any] = {
        "model": "bench-stream" if stream else "bench-model",
        "messages": [{"role": "user", "content": "Say hello"}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


# ----------------------------------------------------------------- fake upstream bodies

WORDS = ("Hello", "!", " How", " can", " I", " help", " you", " today?")
CREATED = 1732170000


def chat_completion_json() -> str:
    """A realistic OpenAI chat.completion, as a non-streaming upstream answers."""
    return compact(
        {
            "id": "chatcmpl-bench0000000000000000000000001",
            "object": "chat.completion",
            "created": CREATED,
            "model": "bench-model",
            "system_fingerprint": "fp_bench0001",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage(),
        }
    )


def usage() -> dict[str, Any]:
    """Token usage as OpenAI reports it."""
    return {
        "prompt_tokens": 9,
        "completion_tokens": len(WORDS),
        "total_tokens": 9 + len(WORDS),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    """One chat.completion.chunk event payload."""
    return {
        "id": "chatcmpl-bench0000000000000000000000002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "bench-stream",
        "system_fingerprint": "fp_bench0001",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def chat_sse() -> str:
    """A realistic SSE stream: role, one event per word, finish, usage, [DONE]."""
    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": word}, None) for word in WORDS]
    events.append(chunk({}, "stop"))
    # The gateway always asks for usage (SPEC §5), so a real upstream sends this chunk too.
    usage_event = chunk({}, None) | {"choices": [], "usage": usage()}
    events.append(usage_event)
    return "".join(f"data: {compact(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def models_json() -> str:
    """An OpenAI model list, for health probes and readiness checks."""
    data = [
        {"id": name, "object": "model", "created": CREATED, "owned_by": "bench"}
        for name in ("bench-model", "bench-stream")
    ]
    return compact({"object": "list", "data": data})


def compact(value: Any) -> str:
    """JSON without spaces, as OpenAI sends it."""
    return json.dumps(value, separators=(",", ":"))


def nginx_quote(text: str) -> str:
    """Escape text for a single-quoted nginx string (nginx turns \\n back into a newline)."""
    # `return` bodies are nginx complex values: a `$` would be read as a variable.
    if "$" in text:
        raise BenchError("fake upstream body must not contain '$'")
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def nginx_config(tmp: Path, port: int) -> str:
    """Fill the nginx template for this run's temp dir and port."""
    values = {
        "@@DIR@@": str(tmp),
        "@@PORT@@": str(port),
        "@@CHAT_JSON@@": nginx_quote(chat_completion_json()),
        "@@CHAT_SSE@@": nginx_quote(chat_sse()),
        "@@MODELS_JSON@@": nginx_quote(models_json()),
    }
    text = NGINX_TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def gateway_config(port: int, upstream_port: int) -> str:
    """The gateway's YAML (SPEC §1): two providers on the fake upstream, one user.

    JSON is valid YAML, so the file is written with json.dumps and needs no YAML library.
    """
    upstream = f"http://127.0.0.1:{upstream_port}"
    document = gateway_document(
        port,
        {"bench-model": f"{upstream}/v1", "bench-stream": f"{upstream}/stream/v1"},
    )
    return json.dumps(document, indent=2) + "\n"


def gateway_document(port: int, models: dict[str, str]) -> dict[str, Any]:
    """A production-like gateway config: per model name, one provider at that base URL.

    Everything a production config has is on: auth (one user with a bearer token), a rate
    limit on that user, SmartAI routing, metrics and the JSON access log (always on).
    """
    providers = {
        f"{name}-provider": {"type": "openai", "base_url": base_url, "api_key": "bench-key"}
        for name, base_url in models.items()
    }
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": providers,
        "models": {name: model_config(name, f"{name}-provider") for name in models},
        # A production config limits its users: the limiter (memory store) is on the
        # bench's path, with limits far above what the bench can send.
        "users": {
            "bench": {
                "name": "Bench",
                "token": TOKEN,
                "rate_limit": {
                    "requests_per_minute": 1_000_000_000,
                    "tokens_per_minute": 1_000_000_000_000,
                },
            }
        },
    }


def model_config(name: str, provider: str) -> dict[str, Any]:
    """One model with a single backend on the given provider, routed by SmartAI (the
    default strategy: its confidence and latency bookkeeping run on every request)."""
    return {
        "name": name,
        "strategy": "smart_ai",
        "backends": [{"provider": provider, "model": name}],
    }


# ------------------------------------------------------------------------- processes


class Supervisor:
    """Starts the bench's servers and guarantees they all stop, by PID, whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start cmd in its own process group, output to <tmp>/<name>.log."""
        log = self.log_path(name).open("wb")
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.tmp,
            # Own group: the whole tree (nginx master + worker) can be signalled by one id,
            # and a Ctrl-C at the terminal reaches only this runner, which then cleans up.
            start_new_session=True,
        )
        self.procs.append((name, proc, log))
        return proc

    def log_path(self, name: str) -> Path:
        """Where a server's stdout/stderr go."""
        return self.tmp / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a server's log, for error messages."""
        path = self.log_path(name)
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def assert_running(self) -> None:
        """Raise if any server we started has exited."""
        for name, proc, _log in self.procs:
            if proc.poll() is not None:
                raise BenchError(
                    f"{name} exited with code {proc.returncode} during the bench; log:\n"
                    + self.log_tail(name)
                )

    def stop_all(self) -> None:
        """SIGTERM every group we started, newest first; SIGKILL what outlives the timeout."""
        for _name, proc, log in reversed(self.procs):
            stop_group(proc)
            log.close()
        self.procs.clear()


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate one process group we started (its leader's pid is the group id)."""
    # returncode is None until we reap the leader; while it is unreaped its pid (and so the
    # group id) cannot belong to anyone else, so signalling the group is safe.
    if proc.returncode is not None:
        return
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Signal a process group, ignoring one that is already gone."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A loopback port the kernel considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(
    name: str,
    url: str,
    proc: subprocess.Popen[bytes],
    sup: Supervisor,
    timeout: float = READY_TIMEOUT_S,
) -> None:
    """Poll url until it answers 200, the process dies, or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"{name} exited with code {proc.returncode} during start-up; log:\n"
                + sup.log_tail(name)
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:  # noqa: S310 - loopback URL
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise BenchError(
        f"{name} not ready after {timeout:.0f} s at {url} ({last_error}); log:\n"
        + sup.log_tail(name)
    )


def start_nginx(sup: Supervisor, nginx: str) -> Target:
    """Start the fake upstream and wait until it answers."""
    port = free_port()
    conf = sup.tmp / "nginx.conf"
    conf.write_text(nginx_config(sup.tmp, port))
    proc = sup.start("nginx", [nginx, "-p", str(sup.tmp), "-c", str(conf), "-e", "stderr"])
    base = f"http://127.0.0.1:{port}"
    wait_ready("nginx", f"{base}/v1/models", proc, sup)
    return Target("direct", base, proc.pid, stream_prefix="/stream")


def start_bare(sup: Supervisor, upstream: str, loop: str = "uvloop") -> Target:
    """Start the bare aiohttp pass-through in front of the fake upstream."""
    port = free_port()
    name = "bare" if loop == "uvloop" else f"bare-{loop}"
    cmd = [sys.executable, str(PASSTHROUGH), "--upstream", upstream, "--port", str(port)]
    proc = sup.start(name, [*cmd, "--loop", loop])
    base = f"http://127.0.0.1:{port}"
    wait_ready(name, f"{base}/v1/models", proc, sup)
    return Target(name, base, proc.pid, stream_prefix="/stream")


def start_gateway(sup: Supervisor, upstream_port: int, source: Path | None = None) -> Target:
    """Start `berry-proxy serve` on a generated config; its access log goes to a file.

    With ``source`` (a checkout of another commit, ``--baseline``) the same console script
    imports ``berry_proxy`` from there instead: the target is named ``baseline``.
    """
    name = "gateway" if source is None else "baseline"
    port = free_port()
    config = sup.tmp / f"berry-{name}.yaml"
    config.write_text(gateway_config(port, upstream_port))
    exe = gateway_executable()
    cmd = [exe, "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source.resolve())}
    proc = sup.start(name, cmd, env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(name, f"{base}/v1/health", proc, sup)
    return Target(name, base, proc.pid, stream_prefix="")


def gateway_executable() -> str:
    """The venv's berry-proxy console script (it runs Python in-process: its pid is ours)."""
    beside = Path(sys.executable).parent / "berry-proxy"
    if beside.exists():
        return str(beside)
    found = shutil.which("berry-proxy")
    if found is None:
        raise BenchError("berry-proxy is not installed; run `make bench` (it installs it)")
    return found


# ----------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    """Find an executable, also in the sbin directories a non-root PATH may lack."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))


def ensure_tools() -> tuple[str, str]:
    """Return (wrk, nginx), installing them with apt-get when root and missing."""
    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    if wrk and nginx:
        return wrk, nginx
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError("the bench needs wrk and nginx: `sudo apt-get install -y wrk nginx-light`")
    print("installing wrk and nginx-light with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "wrk", "nginx-light"]):
        try:
            subprocess.run(cmd, check=True, env=env, timeout=APT_TIMEOUT_S)
        except subprocess.SubprocessError as exc:
            raise BenchError(f"{' '.join(cmd)} failed: {exc}") from exc
    wrk, nginx = find_tool("wrk"), find_tool("nginx")
    if not (wrk and nginx):
        raise BenchError("apt-get ran but wrk or nginx is still missing")
    return wrk, nginx


# ------------------------------------------------------------------- checks and load


def check_target(target: Target) -> None:
    """One request per scenario kind, so that a bench of 401s or 404s cannot pass as fast."""
    for stream, marker in ((False, b'"chat.completion"'), (True, b"data: [DONE]")):
        req = urllib.request.Request(  # noqa: S310 - loopback URL
            target.url(stream),
            data=request_body(stream),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=10.0) as resp:  # noqa: S310
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise BenchError(f"{target.name}: {target.url(stream)} failed: {exc}") from exc
        if status != 200 or marker not in body:
            raise BenchError(
                f"{target.name}: POST {target.url(stream)} (stream={stream}) answered "
                f"{status}: {body[:500]!r}"
            )


RESULT_RE = re.compile(r"^BENCH_RESULT (.*)$", re.MULTILINE)


@dataclass
class WrkRun:
    """What one wrk run reports, plus the CPU wrk itself used."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    loadgen_cpu_s: float
    output: str


def run_wrk(wrk: str, url: str, connections: int, seconds: int, stream: bool) -> WrkRun:
    """Run wrk (one thread) against url and parse the line post.lua's done() prints."""
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA_SCRIPT)]
    env = {**os.environ, "BENCH_BODY": request_body(stream).decode(), "BENCH_TOKEN": TOKEN}
    before = children_cpu_s()
    try:
        proc = subprocess.run(
            [*cmd, url], env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30} s against {url}") from exc
    # wrk is the only child reaped during the run, so the children's rusage delta is wrk's.
    loadgen_cpu = children_cpu_s() - before
    match = RESULT_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    fields = {k: float(v) for k, v in (item.split("=") for item in match.group(1).split())}
    errors = {k: int(fields[k]) for k in ("status", "connect", "read", "write", "timeout")}
    return WrkRun(
        requests=int(fields["requests"]),
        seconds=fields["duration_us"] / 1e6,
        p50_ms=fields["p50_us"] / 1e3,
        p99_ms=fields["p99_us"] / 1e3,
        errors=errors,
        loadgen_cpu_s=loadgen_cpu,
        output=proc.stdout,
    )


def children_cpu_s() -> float:
    """User + system CPU of all reaped children of this runner."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (nginx master + worker; a proxy and any helper)."""
    tree = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            tree += process_tree(int(child))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) summed over pids, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # Field 2 (comm) may contain spaces; everything after its closing ')' is fixed.
        after_comm = stat.rsplit(")", 1)[1].split()
        ticks += int(after_comm[11]) + int(after_comm[12])
    return ticks / CLK_TCK


def measure(wrk: str, target: Target, scenario: Scenario, settings: Settings) -> Row:
    """Warm up, then one measured wrk run with the target's CPU read before and after."""
    url = target.url(scenario.stream)
    if settings.warmup > 0:
        run_wrk(wrk, url, scenario.connections, settings.warmup, scenario.stream)
    pids = process_tree(target.pid)
    cpu_before = cpu_seconds(pids)
    run = run_wrk(wrk, url, scenario.connections, settings.duration, scenario.stream)
    cpu = cpu_seconds(pids) - cpu_before
    return Row(
        scenario=scenario.key,
        target=target.name,
        requests=run.requests,
        seconds=run.seconds,
        rps=run.requests / run.seconds if run.seconds else 0.0,
        p50_ms=run.p50_ms,
        p99_ms=run.p99_ms,
        cpu_s_per_1000=cpu / run.requests * 1000 if run.requests else None,
        errors=run.errors,
        loadgen_core_pct=100 * run.loadgen_cpu_s / run.seconds if run.seconds else 0.0,
    )


def measure_scenario(
    wrk: str, targets: Sequence[Target], scenario: Scenario, settings: Settings
) -> list[Row]:
    """Each target in turn, `rounds` times; a target's row is the median of its rounds."""
    # Rounds go round-robin over the targets so that a slow patch of the shared machine
    # hits every target alike instead of one target's whole series.
    runs: dict[str, list[Row]] = {t.name: [] for t in targets}
    for _ in range(settings.rounds):
        for target in targets:
            runs[target.name].append(measure(wrk, target, scenario, settings))
    return [median_row(runs[t.name]) for t in targets]


def median_row(rows: Sequence[Row]) -> Row:
    """Per-metric median of several runs of one target; counts and errors are summed."""
    first = rows[0]
    cpus = [r.cpu_s_per_1000 for r in rows if r.cpu_s_per_1000 is not None]
    return Row(
        scenario=first.scenario,
        target=first.target,
        requests=sum(r.requests for r in rows),
        seconds=sum(r.seconds for r in rows),
        rps=statistics.median(r.rps for r in rows),
        p50_ms=statistics.median(r.p50_ms for r in rows),
        p99_ms=statistics.median(r.p99_ms for r in rows),
        cpu_s_per_1000=statistics.median(cpus) if cpus else None,
        errors={k: sum(r.errors[k] for r in rows) for k in first.errors},
        loadgen_core_pct=statistics.median(r.loadgen_core_pct for r in rows),
    )


# ---------------------------------------------------------------------------- report


def print_table(scenario: Scenario, rows: Sequence[Row], settings: Settings) -> None:
    """One table: a row per target."""
    runs = f"median of {settings.rounds} runs of" if settings.rounds > 1 else "one run of"
    print(f"\n{scenario.title} ({runs} {settings.duration} s per target)")
    header = (
        f"  {'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'CPU-s/1000 req':>16}{'errors':>8}{'wrk CPU':>9}"
    )
    print(header)
    for row in rows:
        cpu = "-" if row.cpu_s_per_1000 is None else f"{row.cpu_s_per_1000:.3f}"
        print(
            f"  {row.target:<14}{row.rps:>9.0f}{row.p50_ms:>9.3f}{row.p99_ms:>9.3f}"
            f"{cpu:>16}{row.error_total:>8}{row.loadgen_core_pct:>8.0f}%"
        )


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing."""
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass(frozen=True)
class Ratio:
    """Gateway ÷ bare in one scenario; None where a side has no number."""

    scenario: str
    title: str
    cpu: float | None
    p50: float | None


def gateway_ratios(
    rows: Sequence[Row], numerator: str = "gateway", denominator: str = "bare"
) -> list[Ratio]:
    """Per scenario: numerator ÷ denominator (gateway ÷ bare unless told) for CPU per
    request and for p50."""
    out = []
    for scenario in SCENARIOS:
        by_target = {r.target: r for r in rows if r.scenario == scenario.key}
        top, bottom = by_target.get(numerator), by_target.get(denominator)
        if top is not None and bottom is not None:
            cpu = ratio(top.cpu_s_per_1000, bottom.cpu_s_per_1000)
            p50 = ratio(top.p50_ms, bottom.p50_ms)
            out.append(Ratio(scenario.key, scenario.title, cpu, p50))
    return out


def fmt_ratio(value: float | None) -> str:
    """Format as 1.23 followed by the multiplication sign, or "-" when missing."""
    return "-" if value is None else f"{value:.2f}{TIMES}"


def verdict(ratios: Sequence[Ratio]) -> str:
    """One line: does the gateway meet the CPU goal in every scenario?"""
    measured = [r for r in ratios if r.cpu is not None]
    if not measured:
        return "verdict: gateway not measured (no gateway ÷ bare CPU ratio)"
    worst = max(measured, key=lambda r: r.cpu or 0.0)
    best = min(measured, key=lambda r: r.cpu or 0.0)
    state = "MET" if (worst.cpu or 0.0) <= CPU_GOAL else "NOT MET"
    return (
        f"verdict: gateway CPU per request is {fmt_ratio(best.cpu)} to {fmt_ratio(worst.cpu)} "
        f"the bare pass-through (goal ≤ {fmt_ratio(CPU_GOAL)}): {state}; "
        f"worst: {worst.title}"
    )


def print_summary(rows: Sequence[Row], ratios: Sequence[Ratio]) -> None:
    """Ratios, error warnings and the verdict."""
    print()
    for r in ratios:
        print(f"gateway ÷ bare, {r.title}: CPU {fmt_ratio(r.cpu)}, p50 {fmt_ratio(r.p50)}")
    # With --baseline: where the other checkout stands, and this one against it directly.
    for top, bottom in (("baseline", "bare"), ("gateway", "baseline")):
        for r in gateway_ratios(rows, top, bottom):
            print(f"{top} ÷ {bottom}, {r.title}: CPU {fmt_ratio(r.cpu)}, p50 {fmt_ratio(r.p50)}")
    for row in rows:
        if row.error_total:
            print(f"ERRORS: {row.target} / {row.scenario}: {row.errors}: these numbers are invalid")
    print(verdict(ratios))


def write_json(
    path: Path,
    rows: Sequence[Row],
    ratios: Sequence[Ratio],
    settings: Settings,
    extra: dict[str, Any] | None = None,
) -> None:
    """Machine-readable results, for comparing runs over time."""
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "duration_s": settings.duration,
        "warmup_s": settings.warmup,
        "rounds": settings.rounds,
        "cpu_goal": CPU_GOAL,
        "rows": [asdict(r) for r in rows],
        "gateway_vs_bare": [asdict(r) for r in ratios],
        "verdict": verdict(ratios),
    }
    doc.update({k: v for k, v in (extra or {}).items() if v is not None})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {path}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """--duration, --warmup, --quick, --rounds, --targets, --json, --keep-temp, --asyncio-bare,
    --baseline, --no-failover, --failover-only."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per run")
    parser.add_argument("--quick", action="store_true", help="2 s runs (a smoke test)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per target and scenario; the median is shown"
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help="comma-separated subset of direct,bare,gateway (default: all)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--asyncio-bare",
        action="store_true",
        help="add a bare pass-through on the stock asyncio loop (what uvloop buys)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run the gateway of another checkout (e.g. `git worktree add /tmp/b "
        "COMMIT`), round-robin with this one, and print gateway ÷ baseline",
    )
    parser.add_argument(
        "--no-failover", action="store_true", help="skip the failover scenario (bench/failover.py)"
    )
    parser.add_argument(
        "--no-streams", action="store_true", help="skip the stream scenarios (bench/streams.py)"
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--failover-only", action="store_true", help="run only the failover scenario")
    only.add_argument("--streams-only", action="store_true", help="run only the stream scenarios")
    parser.add_argument(
        "--open-streams",
        default="1000",
        help="comma-separated stream counts of the open-streams scenario (e.g. 1000,5000)",
    )
    args = parser.parse_args(argv)
    if (args.failover_only and args.no_failover) or (args.streams_only and args.no_streams):
        parser.error("--X-only and --no-X contradict each other")
    counts = [c.strip() for c in args.open_streams.split(",") if c.strip()]
    if not counts or not all(c.isdigit() and int(c) > 0 for c in counts):
        parser.error("--open-streams: positive counts, e.g. 1000,5000")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGET_NAMES)
    if unknown or not targets:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose from {TARGET_NAMES}")
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be >= 1, --warmup >= 0")
    if args.baseline is not None and not (args.baseline / "berry_proxy").is_dir():
        parser.error(f"--baseline: {args.baseline} holds no berry_proxy package")
    return Settings(
        duration=2 if args.quick else args.duration,
        warmup=args.warmup,
        targets=targets,
        json_path=args.json,
        keep_temp=args.keep_temp,
        asyncio_bare=args.asyncio_bare,
        rounds=args.rounds,
        baseline=args.baseline,
        cpu=not (args.failover_only or args.streams_only),
        failover=not (args.no_failover or args.streams_only),
        streams=not (args.no_streams or args.failover_only),
        open_streams=tuple(int(c) for c in counts),
    )


@contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    """The run's private directory (configs, logs, nginx temp files)."""
    path = Path(tempfile.mkdtemp(prefix="berry-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def start_targets(sup: Supervisor, nginx: str, settings: Settings) -> list[Target]:
    """Start the upstream and the proxies that were asked for, in table order."""
    direct = start_nginx(sup, nginx)
    upstream_port = int(direct.base_url.rsplit(":", 1)[1])
    targets = [direct] if "direct" in settings.targets else []
    if "bare" in settings.targets:
        targets.append(start_bare(sup, direct.base_url))
    if settings.asyncio_bare:
        targets.append(start_bare(sup, direct.base_url, loop="asyncio"))
    if "gateway" in settings.targets:
        targets.append(start_gateway(sup, upstream_port))
    if settings.baseline is not None:
        targets.append(start_gateway(sup, upstream_port, settings.baseline))
    return targets


def run_bench(settings: Settings, wrk: str, nginx: str, tmp: Path) -> list[Row]:
    """Start everything, check it answers correctly, measure, always stop it all."""
    sup = Supervisor(tmp)
    try:
        targets = start_targets(sup, nginx, settings)
        for target in targets:
            check_target(target)
        print(f"targets: {', '.join(f'{t.name} (pid {t.pid})' for t in targets)}")
        rows = []
        for scenario in SCENARIOS:
            scenario_rows = measure_scenario(wrk, targets, scenario, settings)
            print_table(scenario, scenario_rows, settings)
            rows += scenario_rows
        # A server that died mid-run would leave numbers that look fine but measure nothing.
        sup.assert_running()
        return rows
    finally:
        sup.stop_all()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `make bench`; returns the exit status."""
    settings = parse_args(argv)
    # SIGTERM (e.g. from a CI timeout) must still run the finally blocks that stop servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows: list[Row] = []
    failover_valid = streams_valid = True
    try:
        wrk, nginx = ensure_tools()
        with temp_dir(settings.keep_temp) as tmp:
            if settings.cpu:
                rows = run_bench(settings, wrk, nginx, tmp)
                print_summary(rows, gateway_ratios(rows))
                from redis_latency import run_redis_latency  # noqa: PLC0415  # as failover

                run_redis_latency(tmp)
            streams_doc = None
            if settings.streams:
                from streams import run_streams  # noqa: PLC0415  # as failover

                streams_result = run_streams(settings, tmp)
                streams_doc, streams_valid = streams_result.to_json(), streams_result.valid
            failover_doc = None
            if settings.failover:
                # Imported here, not at the top: failover.py imports this module's helpers.
                from failover import run_failover  # noqa: PLC0415

                result = run_failover(settings, wrk, nginx, tmp)
                failover_doc, failover_valid = result.to_json(), result.valid
            if settings.json_path is not None:
                extra = {"failover": failover_doc, "streams": streams_doc}
                write_json(settings.json_path, rows, gateway_ratios(rows), settings, extra)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The finally blocks have already stopped the servers; no traceback needed.
        print("bench interrupted", file=sys.stderr)
        return 130
    valid = failover_valid and streams_valid and not any(r.error_total for r in rows)
    return 0 if valid else 1


if __name__ == "__main__":
    # Run as the module `run`, not as `__main__`: bench/failover.py imports this file's
    # helpers as `run`, and one copy of the module means one BenchError, one Settings.
    import run

    sys.exit(run.main())
