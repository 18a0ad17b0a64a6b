-- wrk script for bench/run.py. The request comes from the environment, so one script serves
-- every route; the result is printed as one JSON line, because wrk's text report rounds the
-- percentiles and does not say which errors it saw.
--
--   BENCH_METHOD        GET or POST
--   BENCH_PATH          the request path
--   BENCH_BODY          the body (optional)
--   BENCH_HEADERS_FILE  one request variant per line: "Name: value" fields separated by tabs;
--                       requests go round the variants (e.g. one session token per user)

local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/"
local body = os.getenv("BENCH_BODY")
local headers_file = os.getenv("BENCH_HEADERS_FILE")

local variants = {}
local counter = 0

local function parse_headers(line)
  local headers = {}
  for field in string.gmatch(line, "[^\t]+") do
    local name, value = string.match(field, "^([^:]+):%s*(.*)$")
    if name then
      headers[name] = value
    end
  end
  return headers
end

init = function(args)
  if headers_file then
    for line in io.lines(headers_file) do
      -- wrk.format adds Host and Content-Length; the rest is ours.
      variants[#variants + 1] = wrk.format(method, path, parse_headers(line), body)
    end
  end
  if #variants == 0 then
    variants[1] = wrk.format(method, path, {}, body)
  end
end

request = function()
  counter = counter + 1
  return variants[(counter % #variants) + 1]
end

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"status":%d,"timeout":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)
  ))
end
