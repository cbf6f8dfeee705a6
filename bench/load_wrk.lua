-- wrk script for bench/load.sh: one page, many logged-in sessions.
--
-- Environment:
--   LOAD_COOKIES  file with one "dbops_session=VALUE" line per logged-in session
--   LOAD_PATH     the page to request (e.g. /operations)
--   LOAD_DELAY_MS think time between a connection's requests (0 = flat out)
--
-- Each request carries the next session's cookie (every thread starts at a
-- different session), so all sessions are in use at once. A response other than
-- 200 counts as an error: an expired session would answer 303 to /login, which
-- wrk alone counts as a success.

local cookies = {}
local threads = {}
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("offset", counter * 7)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(os.getenv("LOAD_COOKIES"), "r"))
  for line in f:lines() do
    if line ~= "" then table.insert(cookies, line) end
  end
  f:close()
  path = os.getenv("LOAD_PATH") or "/"
  think = tonumber(os.getenv("LOAD_DELAY_MS") or "0")
  i = offset or 0
  non200 = 0
  statuses = ""
end

function request()
  i = i + 1
  local c = cookies[(i % #cookies) + 1]
  return wrk.format("GET", path, { ["Cookie"] = c, ["Accept"] = "text/html" })
end

function delay()
  if think > 0 then
    -- +-50 % jitter, so the sessions do not march in step.
    return math.floor(think * (0.5 + math.random()))
  end
  return 0
end

function response(status, headers, body)
  if status ~= 200 then
    non200 = non200 + 1
    if #statuses < 200 then statuses = statuses .. " " .. status end
  end
end

function done(summary, latency, requests)
  local bad, seen = 0, ""
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non200") or 0)
    seen = seen .. (t:get("statuses") or "")
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f non200=%d socket_errors=%d timeouts=%d rps=%.1f statuses=%s\n",
    summary.requests,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000,
    bad, e.connect + e.read + e.write, e.timeout,
    summary.requests / (summary.duration / 1e6),
    (seen == "" and "-" or seen:gsub("^ ", ""):gsub(" ", ","))))
end
