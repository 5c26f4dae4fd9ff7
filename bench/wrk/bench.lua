-- wrk script for bench/run.sh: one request shape per run, chosen by environment variables,
-- and a machine-readable result line at the end.
--   BENCH_METHOD  GET (default) or POST
--   BENCH_BODY    POST body size in bytes (default 1024)
--   BENCH_COOKIE  "name=value" session cookie (sent to every target, so requests are equal)
--   BENCH_CSRF    X-CSRF-Token value
--   BENCH_BROWSER 1: also the fields Chromium's same-origin fetch() GET sends (User-Agent,
--                 Accept-Language, Accept-Encoding, Referer, Sec-Fetch-*, sec-ch-ua*; no Origin,
--                 which a same-origin GET does not carry): 14 field names instead of 4
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
if os.getenv("BENCH_BROWSER") == "1" then
  wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
  wrk.headers["Accept-Language"] = "en-GB,en;q=0.9"
  wrk.headers["Accept-Encoding"] = "gzip, deflate, br, zstd"
  wrk.headers["Referer"] = "http://127.0.0.1/app/"
  wrk.headers["Sec-Fetch-Site"] = "same-origin"
  wrk.headers["Sec-Fetch-Mode"] = "cors"
  wrk.headers["Sec-Fetch-Dest"] = "empty"
  wrk.headers["sec-ch-ua"] = '"Chromium";v="131", "Not_A Brand";v="24"'
  wrk.headers["sec-ch-ua-mobile"] = "?0"
  wrk.headers["sec-ch-ua-platform"] = '"Linux"'
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
