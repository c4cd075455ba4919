"""Failover bench: what a backend failing 30 % of requests costs the gateway's clients.

`bench/run.py` runs this after its CPU tables (`--no-failover` skips it, `--failover-only`
runs nothing else). It starts, in the run's temporary directory and each in its own process
group:

- one nginx (`bench/nginx-failover.conf.template`) listening on three loopback ports, each
  port a fake OpenAI upstream: `healthy` and `twin` always answer; `flaky` answers HTTP 500
  with an OpenAI error body to 30 % of chat completion requests, drawn independently per
  request (nginx `split_clients` on the random `$request_id`);
- one gateway per setup, each with one model of two equal-weight backends, A on `healthy`
  and B on the second upstream, `settings.max_retries: 3`, circuit breaker at defaults:
  `baseline` (B on `twin`: both healthy), `failing` (B on `flaky`) with the
  `weighted_random` strategy, `failing` again with `smart_ai` (the gateway's default), and
  `failing` with the breaker kept closed (every failure of B failed over: the pure cost),

then drives each gateway with wrk in run.py's scenarios and prints, per setup: requests,
client-visible errors (non-2xx responses and socket errors) and their rate, p50/p99
latency, the gateway's CPU per request, what each upstream received (counted from nginx's
access log), how many requests the gateway had to retry and how often a circuit breaker
opened (both from the gateway's own log); then the latency failover adds (failing minus
baseline, p50 and p99) and one verdict line against the target: no client-visible error
while B fails.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from run import (
    BENCH_DIR,
    SCENARIOS,
    TIMES,
    TOKEN,
    BenchError,
    Row,
    Scenario,
    Settings,
    Supervisor,
    Target,
    chat_completion_json,
    chat_sse,
    check_target,
    compact,
    free_port,
    gateway_executable,
    measure,
    median_row,
    models_json,
    nginx_quote,
    run_wrk,
    wait_ready,
)

TEMPLATE = BENCH_DIR / "nginx-failover.conf.template"
FAIL_PERCENT = 30  # share of B's chat completion requests answered with HTTP 500
MAX_RETRIES = 3  # settings.max_retries of the gateway under test
# After a wrk run the gateway may still finish the attempts of requests wrk dropped; wait
# for them before reading the logs, so they count in the run they belong to.
SETTLE_S = 0.3
UPSTREAM_LOG = "upstream-access.log"
UPSTREAMS = ("healthy", "twin", "flaky")
MAX_EXAMPLES = 5  # gateway log lines shown per row when requests failed
# What OpenAI answers when it fails on its side (HTTP 500).
ERROR_JSON = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@dataclass(frozen=True)
class Setup:
    """One gateway under test: where backend B points and which strategy routes."""

    key: str
    second: str  # the upstream of backend B: "twin" (healthy) or "flaky"
    strategy: str
    # None: the gateway's default. A huge threshold keeps B's breaker closed, so every
    # one of its failures is failed over: the pure cost of failover, not hidden by ejection.
    breaker_threshold: int | None = None

    @property
    def failing(self) -> bool:
        """Whether backend B fails FAIL_PERCENT % of its requests in this setup."""
        return self.second == "flaky"

    @property
    def label(self) -> str:
        """Row label in the tables."""
        state = f"B fails {FAIL_PERCENT}%" if self.failing else "both healthy"
        breaker = ", breaker off" if self.breaker_threshold else ""
        return f"{state}, {self.strategy}{breaker}"


BASELINE = Setup("baseline", "twin", "weighted_random")
SETUPS = (
    BASELINE,
    Setup("failing", "flaky", "weighted_random"),
    Setup("failing-smart_ai", "flaky", "smart_ai"),
    Setup("failing-no-breaker", "flaky", "weighted_random", breaker_threshold=1_000_000),
)

LABEL_WIDTH = max(len(setup.label) for setup in SETUPS) + 2


# ---------------------------------------------------------------------------- configs


def nginx_config(tmp: Path, ports: dict[str, int]) -> str:
    """Fill the failover nginx template for this run's temp dir and ports."""
    values = {
        "@@DIR@@": str(tmp),
        "@@HEALTHY_PORT@@": str(ports["healthy"]),
        "@@TWIN_PORT@@": str(ports["twin"]),
        "@@FLAKY_PORT@@": str(ports["flaky"]),
        "@@FAIL_PERCENT@@": str(FAIL_PERCENT),
        "@@CHAT_JSON@@": nginx_quote(chat_completion_json()),
        "@@CHAT_SSE@@": nginx_quote(chat_sse()),
        "@@MODELS_JSON@@": nginx_quote(models_json()),
        "@@ERROR_JSON@@": nginx_quote(compact(ERROR_JSON)),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def gateway_config(port: int, ports: dict[str, int], setup: Setup) -> str:
    """The gateway's config (JSON, which is YAML): two models of two backends, A and B.

    `bench-model` and `bench-stream` each have backend A on the healthy upstream and B on
    the setup's second upstream, weight 1 each; the stream model's providers point at the
    upstreams' `/stream/v1`, where nginx keeps the SSE answer.
    """
    providers: dict[str, Any] = {}
    for upstream in ("healthy", setup.second):
        base = f"http://127.0.0.1:{ports[upstream]}"
        for suffix, path in (("", "/v1"), ("-stream", "/stream/v1")):
            providers[upstream + suffix] = {
                "type": "openai",
                "base_url": base + path,
                "api_key": "bench-key",
            }

    def model(name: str, suffix: str) -> dict[str, Any]:
        backends = [
            {"provider": upstream + suffix, "model": name, "weight": 1}
            for upstream in ("healthy", setup.second)
        ]
        return {"name": name, "strategy": setup.strategy, "backends": backends}

    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": providers,
        "models": {
            "bench": model("bench-model", ""),
            "bench-stream": model("bench-stream", "-stream"),
        },
        "users": {"bench": {"name": "Bench", "token": TOKEN}},
        # Nothing else: health checks and retries within a backend stay at the gateway's
        # defaults, and so does the circuit breaker unless the setup turns it off.
        "settings": {"max_retries": MAX_RETRIES},
    }
    if setup.breaker_threshold is not None:
        config["settings"]["circuit_breaker_failure_threshold"] = setup.breaker_threshold
    return json.dumps(config, indent=2) + "\n"


# ------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Gateway:
    """A running gateway of one setup and the file its JSON access log goes to."""

    setup: Setup
    target: Target
    log: Path


def start_upstreams(sup: Supervisor, nginx: str) -> dict[str, int]:
    """Start the one nginx serving all three upstreams; return each upstream's port."""
    ports = {name: free_port() for name in UPSTREAMS}
    if len(set(ports.values())) != len(ports):
        raise BenchError(f"the kernel handed out the same port twice: {ports}")
    conf = sup.tmp / "nginx-failover.conf"
    conf.write_text(nginx_config(sup.tmp, ports))
    name = "nginx-failover"
    proc = sup.start(name, [nginx, "-p", str(sup.tmp), "-c", str(conf), "-e", "stderr"])
    for port in ports.values():
        wait_ready(name, f"http://127.0.0.1:{port}/v1/models", proc, sup)
    return ports


def start_gateway(sup: Supervisor, ports: dict[str, int], setup: Setup) -> Gateway:
    """Start `berry-proxy serve` for one setup; its access log is its stdout's log file."""
    port = free_port()
    name = f"gateway-{setup.key}"
    config = sup.tmp / f"berry-{setup.key}.yaml"
    config.write_text(gateway_config(port, ports, setup))
    cmd = [gateway_executable(), "serve", "--config", str(config)]
    proc = sup.start(name, [*cmd, "--host", "127.0.0.1", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    wait_ready(name, f"{base}/v1/health", proc, sup)
    return Gateway(setup, Target(name, base, proc.pid, stream_prefix=""), sup.log_path(name))


# ----------------------------------------------------------------------------- logs


def read_from(path: Path, offset: int) -> list[str]:
    """The complete lines appended to path since byte offset."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return data.decode(errors="replace").splitlines()


def size(path: Path) -> int:
    """Current length of a log file (0 while it does not exist yet)."""
    return path.stat().st_size if path.exists() else 0


@dataclass
class UpstreamCounts:
    """Chat completion requests each upstream received during one measured run."""

    a_requests: int = 0  # to backend A (the healthy upstream)
    b_requests: int = 0  # to backend B (twin or flaky)
    b_failed: int = 0  # of those, answered with HTTP 500

    def add(self, other: UpstreamCounts) -> None:
        """Sum another run's counts into these (rounds)."""
        self.a_requests += other.a_requests
        self.b_requests += other.b_requests
        self.b_failed += other.b_failed


def count_upstreams(lines: Sequence[str], ports: dict[str, int], setup: Setup) -> UpstreamCounts:
    """Count nginx's '<port> <status>' lines by backend."""
    fields = (line.split() for line in lines)
    by_port = Counter((f[0], f[1]) for f in fields if len(f) >= 2)
    counts = UpstreamCounts()
    a_port, b_port = str(ports["healthy"]), str(ports[setup.second])
    for (port, status), n in by_port.items():
        if port == a_port:
            counts.a_requests += n
        elif port == b_port:
            counts.b_requests += n
            if status == "500":
                counts.b_failed += n
    return counts


@dataclass
class GatewayLog:
    """What the gateway's access log says about one measured run's requests."""

    requests: int = 0
    retried: int = 0  # answered after more than one attempt
    trips: int = 0  # circuit breaker openings ("circuit_open" lines), B's: A never fails
    # Requests the gateway did not answer with a clean 200 (client departures at the end of
    # a wrk run aside), with up to MAX_EXAMPLES of their log lines.
    failed: int = 0
    examples: list[str] = field(default_factory=list)
    # Durations (ms) of successful requests: first attempt served, or after a failover.
    first_try_ms: list[float] = field(default_factory=list)
    retried_ms: list[float] = field(default_factory=list)

    def add(self, other: GatewayLog) -> None:
        """Merge another run's log (rounds)."""
        self.requests += other.requests
        self.retried += other.retried
        self.trips += other.trips
        self.failed += other.failed
        self.examples += other.examples[: MAX_EXAMPLES - len(self.examples)]
        self.first_try_ms += other.first_try_ms
        self.retried_ms += other.retried_ms

    @property
    def retry_extra_ms(self) -> float | None:
        """Median duration of a failed-over request minus that of a first-try one."""
        if not self.first_try_ms or not self.retried_ms:
            return None
        return statistics.median(self.retried_ms) - statistics.median(self.first_try_ms)


def parse_gateway_log(lines: Sequence[str]) -> GatewayLog:
    """Read the access-log lines of chat completion requests, and count breaker trips."""
    out = GatewayLog()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "circuit_open":
            out.trips += 1
        if entry.get("event") != "request":
            continue
        if entry.get("route") != "/v1/chat/completions":
            continue
        abort = entry.get("abort_reason")
        if abort == "client_disconnected":
            continue  # wrk stopped with this request in flight: not counted by wrk either
        out.requests += 1
        attempts = int(entry.get("attempts", 0))
        if attempts > 1:
            out.retried += 1
        if entry.get("status") == 200 and abort is None:
            duration = float(entry.get("duration_ms", 0.0))
            (out.retried_ms if attempts > 1 else out.first_try_ms).append(duration)
        else:
            out.failed += 1
            if len(out.examples) < MAX_EXAMPLES:
                out.examples.append(line)
    return out


# ---------------------------------------------------------------------------- measure


@dataclass
class FailoverRow:
    """One setup's result in one scenario."""

    scenario: str
    setup: Setup
    wrk: Row
    upstream: UpstreamCounts
    gateway: GatewayLog

    @property
    def attempted(self) -> int:
        """Requests wrk got an outcome for: responses plus socket errors."""
        socket_errors = self.wrk.error_total - self.wrk.errors["status"]
        return self.wrk.requests + socket_errors

    @property
    def error_rate(self) -> float:
        """Client-visible errors per request wrk sent."""
        return self.wrk.error_total / self.attempted if self.attempted else 0.0


def measure_once(
    wrk: str,
    gw: Gateway,
    ports: dict[str, int],
    scenario: Scenario,
    settings: Settings,
) -> FailoverRow:
    """Warm up, then one measured run (run.measure) with both logs read around it."""
    if settings.warmup > 0:
        url = gw.target.url(scenario.stream)
        run_wrk(wrk, url, scenario.connections, settings.warmup, scenario.stream)
        time.sleep(SETTLE_S)
    upstream_log = gw.log.parent / UPSTREAM_LOG
    upstream_at, gateway_at = size(upstream_log), size(gw.log)
    row = measure(wrk, gw.target, scenario, replace(settings, warmup=0))
    time.sleep(SETTLE_S)
    return FailoverRow(
        scenario=scenario.key,
        setup=gw.setup,
        wrk=row,
        upstream=count_upstreams(read_from(upstream_log, upstream_at), ports, gw.setup),
        gateway=parse_gateway_log(read_from(gw.log, gateway_at)),
    )


def measure_scenario(
    wrk: str,
    gateways: Sequence[Gateway],
    ports: dict[str, int],
    scenario: Scenario,
    settings: Settings,
) -> list[FailoverRow]:
    """Each setup in turn, `rounds` times round-robin; medians of latency, sums of counts."""
    runs: dict[str, list[FailoverRow]] = {g.setup.key: [] for g in gateways}
    for _ in range(settings.rounds):
        for gw in gateways:
            runs[gw.setup.key].append(measure_once(wrk, gw, ports, scenario, settings))
    out = []
    for gw in gateways:
        rows = runs[gw.setup.key]
        upstream, gateway = UpstreamCounts(), GatewayLog()
        for r in rows:
            upstream.add(r.upstream)
            gateway.add(r.gateway)
        wrk_row = median_row([r.wrk for r in rows])
        out.append(FailoverRow(scenario.key, gw.setup, wrk_row, upstream, gateway))
    return out


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Extra:
    """What failover adds in one scenario: a failing setup against the baseline."""

    scenario: str
    setup: str  # the failing setup's label
    p50_ms: float
    p99_ms: float
    p50_ratio: float | None
    p99_ratio: float | None
    retry_extra_ms: float | None  # gateway log: failed-over minus first-try request, median


def extras(rows: Sequence[FailoverRow]) -> list[Extra]:
    """Failing minus baseline, per scenario and failing setup."""
    out = []
    for scenario in SCENARIOS:
        in_scenario = [r for r in rows if r.scenario == scenario.key]
        base = next((r for r in in_scenario if r.setup == BASELINE), None)
        if base is None:
            continue
        for r in in_scenario:
            if not r.setup.failing:
                continue
            out.append(
                Extra(
                    scenario=scenario.key,
                    setup=r.setup.label,
                    p50_ms=r.wrk.p50_ms - base.wrk.p50_ms,
                    p99_ms=r.wrk.p99_ms - base.wrk.p99_ms,
                    p50_ratio=r.wrk.p50_ms / base.wrk.p50_ms if base.wrk.p50_ms else None,
                    p99_ratio=r.wrk.p99_ms / base.wrk.p99_ms if base.wrk.p99_ms else None,
                    retry_extra_ms=r.gateway.retry_extra_ms,
                )
            )
    return out


def fmt_ratio(value: float | None) -> str:
    """1.23 and the multiplication sign, or "-"."""
    return "-" if value is None else f"{value:.2f}{TIMES}"


def fmt_ms(value: float | None) -> str:
    """A signed millisecond difference, or "-"."""
    return "-" if value is None else f"{value:+.3f} ms"


def print_table(scenario: Scenario, rows: Sequence[FailoverRow], settings: Settings) -> None:
    """One table per scenario: a row per setup, then what failover adds."""
    runs = f"median of {settings.rounds} runs of" if settings.rounds > 1 else "one run of"
    print(f"\n{scenario.title} ({runs} {settings.duration} s per setup)")
    print(
        f"  {'setup':<{LABEL_WIDTH}}{'requests':>9}{'errors':>7}{'err %':>7}"
        f"{'p50 ms':>8}{'p99 ms':>8}{'CPU-s/1000':>11}"
        f"{'to A':>8}{'to B':>8}{'B 500s':>8}{'retried':>8}{'trips':>6}"
    )
    for r in rows:
        cpu = "-" if r.wrk.cpu_s_per_1000 is None else f"{r.wrk.cpu_s_per_1000:.3f}"
        print(
            f"  {r.setup.label:<{LABEL_WIDTH}}{r.wrk.requests:>9}{r.wrk.error_total:>7}"
            f"{100 * r.error_rate:>7.2f}{r.wrk.p50_ms:>8.3f}{r.wrk.p99_ms:>8.3f}{cpu:>11}"
            f"{r.upstream.a_requests:>8}{r.upstream.b_requests:>8}{r.upstream.b_failed:>8}"
            f"{r.gateway.retried:>8}{r.gateway.trips:>6}"
        )
    for e in extras(rows):
        print(
            f"  failover adds ({e.setup}): p50 {fmt_ms(e.p50_ms)} ({fmt_ratio(e.p50_ratio)}), "
            f"p99 {fmt_ms(e.p99_ms)} ({fmt_ratio(e.p99_ratio)}); "
            f"a retried request takes {fmt_ms(e.retry_extra_ms)} over a first-try one"
        )


def verdict(rows: Sequence[FailoverRow]) -> str:
    """One line: did any client see an error while backend B was failing?"""
    failing = [r for r in rows if r.setup.failing]
    if not failing:
        return "failover verdict: no failing-backend run"
    errors = sum(r.wrk.error_total for r in failing)
    sent = sum(r.attempted for r in failing)
    absorbed = sum(r.upstream.b_failed for r in failing)
    state = "MET" if errors == 0 else "NOT MET"
    return (
        f"failover verdict: client-visible error rate {100 * errors / max(sent, 1):.3f}% "
        f"({errors} of {sent} requests) while backend B failed {absorbed} attempts "
        f"(target 0): {state}"
    )


def flaky_share(rows: Sequence[FailoverRow]) -> str:
    """How often B really failed, to check the fake upstream against FAIL_PERCENT."""
    got = sum(r.upstream.b_requests for r in rows if r.setup.failing)
    failed = sum(r.upstream.b_failed for r in rows if r.setup.failing)
    share = 100 * failed / got if got else 0.0
    return (
        f"backend B (flaky upstream) answered HTTP 500 to {failed} of the {got} chat requests "
        f"it received: {share:.1f}% (set: {FAIL_PERCENT}%)"
    )


def print_summary(rows: Sequence[FailoverRow]) -> bool:
    """Share check, errors with the gateway's own account, verdict; True if numbers valid."""
    print()
    print(flaky_share(rows))
    valid = True
    for r in rows:
        if r.wrk.error_total or r.gateway.failed:
            what = "these numbers are invalid" if not r.setup.failing else "client-visible"
            print(
                f"ERRORS: {r.setup.label} / {r.scenario}: wrk {r.wrk.errors}, "
                f"gateway log {r.gateway.failed} failed requests: {what}"
            )
            for line in r.gateway.examples:
                print(f"  {line}")
            valid = valid and r.setup.failing
    print(verdict(rows))
    return valid


@dataclass
class FailoverResult:
    """The scenario's rows; `valid` is False when the healthy baseline saw errors."""

    rows: list[FailoverRow]
    valid: bool

    def to_json(self) -> dict[str, Any]:
        """For run.py's --json file."""
        return {
            "fail_percent": FAIL_PERCENT,
            "max_retries": MAX_RETRIES,
            "rows": [
                {
                    "scenario": r.scenario,
                    "setup": r.setup.key,
                    "backend_b": r.setup.second,
                    "strategy": r.setup.strategy,
                    "requests": r.wrk.requests,
                    "rps": r.wrk.rps,
                    "p50_ms": r.wrk.p50_ms,
                    "p99_ms": r.wrk.p99_ms,
                    "cpu_s_per_1000": r.wrk.cpu_s_per_1000,
                    "errors": r.wrk.errors,
                    "error_rate": r.error_rate,
                    "upstream_a_requests": r.upstream.a_requests,
                    "upstream_b_requests": r.upstream.b_requests,
                    "upstream_b_failed": r.upstream.b_failed,
                    "gateway_requests": r.gateway.requests,
                    "gateway_retried": r.gateway.retried,
                    "breaker_trips": r.gateway.trips,
                    "gateway_failed": r.gateway.failed,
                    "retry_extra_ms": r.gateway.retry_extra_ms,
                }
                for r in self.rows
            ],
            "failover_adds": [asdict(e) for e in extras(self.rows)],
            "flaky_share": flaky_share(self.rows),
            "verdict": verdict(self.rows),
        }


# ------------------------------------------------------------------------------ main


def run_failover(settings: Settings, wrk: str, nginx: str, tmp: Path) -> FailoverResult:
    """Start upstreams and one gateway per setup, measure every scenario, stop them all."""
    print(
        f"\nfailover: one model, backends A and B (weight 1 each), max_retries {MAX_RETRIES}, "
        'breaker at defaults (unless "breaker off"); '
        f"B fails {FAIL_PERCENT}% of requests (HTTP 500) or, in the baseline, none"
    )
    sup = Supervisor(tmp)
    try:
        ports = start_upstreams(sup, nginx)
        gateways = [start_gateway(sup, ports, setup) for setup in SETUPS]
        for gw in gateways:
            check_target(gw.target)
        listed = ", ".join(f"{g.setup.key} (pid {g.target.pid})" for g in gateways)
        print(f"gateways: {listed}; upstream ports {ports}")
        rows: list[FailoverRow] = []
        for scenario in SCENARIOS:
            scenario_rows = measure_scenario(wrk, gateways, ports, scenario, settings)
            print_table(scenario, scenario_rows, settings)
            rows += scenario_rows
        sup.assert_running()
    finally:
        sup.stop_all()
    valid = print_summary(rows)
    return FailoverResult(rows, valid)
