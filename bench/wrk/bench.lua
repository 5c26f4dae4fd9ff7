-- wrk script for bench/run.sh: one request shape per run, chosen by environment variables,
-- and a machine-readable result line at the end.
--   BENCH_METHOD  GET (default) or POST
--   BENCH_BODY    POST body size in bytes (default 1024)
--   BENCH_COOKIE  "name=value" session cookie (sent to every target, so requests are equal)
--   BENCH_CSRF    X-CSRF-Token value
local method = os.getenv("BENCH_METHOD") or "GET"
local body_size = tonumber(os.getenv("BENCH_BODY") or "1024")
local cookie = os.getenv("BENCH_COOKIE")
local csrf = os.getenv("BENCH_CSRF")

wrk.method = method
wrk.headers["Accept"] = "application/json"
if cookie and cookie ~= "" then
  wrk.headers["Cookie"] = cookie
end
if csrf and csrf ~= "" then
  wrk.headers["X-CSRF-Token"] = csrf
end
if method ~= "GET" then
  wrk.headers["Content-Type"] = "application/json"
  -- A JSON string of the requested size: {"data":"xxxx..."}
  local filler = body_size - 11
  if filler < 0 then filler = 0 end
  wrk.body = '{"data":"' .. string.rep("x", filler) .. '"}'
end

-- One line, parsed by bench/run.sh: requests, duration (us), errors, latency percentiles (us).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
