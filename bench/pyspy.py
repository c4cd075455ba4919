"""Where the gateway's time goes: a py-spy sampling profile of `berry-proxy serve` under wrk.

Starts the bench's fake upstream (nginx) and the gateway with the bench's config (the same
helpers as `run.py`), drives one scenario with wrk while `py-spy record` samples the
gateway, and prints the functions that hold the most samples: by self time (the frame
running; also summed per file) and inclusive (anywhere on the stack), as percentages of
the busy samples. py-spy leaves out the samples in which the process was idle (in epoll);
a coroutine's frames are on the stack only while it runs, and what runs from a C
callback of uvloop (a protocol's ``data_received``) has no caller above it. The collapsed
stacks are kept with `--out`, for a flame graph (`flamegraph.pl`, speedscope).

    .venv/bin/python bench/pyspy.py                      # stream, 16 connections, 10 s
    .venv/bin/python bench/pyspy.py --scenario nonstream-c1 --seconds 20
    .venv/bin/python bench/pyspy.py --out /tmp/stacks.txt

py-spy (`pip install py-spy`) must be able to read the gateway's memory: run as root, or
with ptrace allowed. Sampling costs the gateway some speed, not its proportions.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from run import (
    SCENARIOS,
    BenchError,
    Supervisor,
    check_target,
    ensure_tools,
    run_wrk,
    start_gateway,
    start_nginx,
)

SAMPLE_RATE_HZ = 997  # not a multiple of the event loop's timers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", default="stream-c16", choices=[s.key for s in SCENARIOS], help="load shape"
    )
    parser.add_argument("--seconds", type=int, default=10, help="how long to sample")
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    parser.add_argument("--out", type=Path, help="also keep the collapsed stacks here")
    return parser.parse_args(argv)


LINE_RE = re.compile(r":\d+\)$")
FILE_RE = re.compile(r"\(([^:)]*)")


def frames_of(line: str) -> tuple[list[str], int]:
    """One collapsed-stack line ("f (file.py:12);g (file.py:3) 12") as its frames,
    outermost first and without line numbers ("f (file.py)"), and its sample count."""
    stack, _, count = line.rpartition(" ")
    return [LINE_RE.sub(")", frame) for frame in stack.split(";")], int(count)


def summarize(lines: Sequence[str], top: int) -> None:
    """Print self shares per file, then self and inclusive shares of the busiest
    functions."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in lines:
        if not line.strip():
            continue
        frames, count = frames_of(line)
        total += count
        leaf = frames[-1]
        own[leaf] += count
        match = FILE_RE.search(leaf)
        files[match.group(1) if match else "(native)"] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        raise BenchError("py-spy recorded no samples")
    print(f"{total} samples of the gateway at work\n")
    for title, counter in (("self, per file", files), ("self", own), ("inclusive", inclusive)):
        print(f"{title}:")
        for frame, count in counter.most_common(top):
            print(f"  {count / total:6.1%}  {frame}")
        print()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = next(s for s in SCENARIOS if s.key == args.scenario)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 1
    wrk, nginx = ensure_tools()
    tmp = Path(tempfile.mkdtemp(prefix="berry-profile-"))
    sup = Supervisor(tmp)
    try:
        upstream = start_nginx(sup, nginx)
        gateway = start_gateway(sup, int(upstream.base_url.rsplit(":", 1)[1]))
        check_target(gateway)
        url = gateway.url(scenario.stream)
        run_wrk(wrk, url, scenario.connections, 1, scenario.stream)  # warm-up
        stacks = args.out or tmp / "stacks.txt"
        record = subprocess.Popen(
            [
                *(py_spy, "record", "--pid", str(gateway.pid), "--rate", str(SAMPLE_RATE_HZ)),
                *("--duration", str(args.seconds), "--format", "raw", "--output", str(stacks)),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        result = run_wrk(wrk, url, scenario.connections, args.seconds, scenario.stream)
        try:
            _, err = record.communicate(timeout=args.seconds + 30)
        except subprocess.TimeoutExpired as exc:
            record.kill()
            record.wait()
            raise BenchError("py-spy did not finish") from exc
        if record.returncode != 0:
            raise BenchError(f"py-spy failed: {err.decode(errors='replace')}")
        print(f"{scenario.title}: {result.requests} requests in {result.seconds:.1f} s\n")
        summarize(stacks.read_text().splitlines(), args.top)
        return 0
    except BenchError as exc:
        print(f"profile failed: {exc}", file=sys.stderr)
        return 1
    finally:
        sup.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
