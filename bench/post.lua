-- wrk script used by bench/run.py: POST one chat completion request, the same for every
-- target (direct nginx, bare pass-through, gateway), then print exact results.
--
-- The body and the token come from the environment (BENCH_BODY, BENCH_TOKEN) so that one
-- script serves the non-stream and the stream scenarios; run.py sets them per wrk run.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or error("BENCH_BODY is not set")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_TOKEN") or error("BENCH_TOKEN is not set"))

-- wrk's own summary rounds latencies to two decimals and mixes units (us/ms/s); this one
-- line gives run.py integers in microseconds and every error counter, easy to parse.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f"
      .. " status=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
