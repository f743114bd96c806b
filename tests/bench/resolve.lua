-- wrk script: a valid ResolveScan body with a fresh scanEvent.id per request, so every call
-- is a new decision (a repeated id would be a cheaper replay). Keys cycle through the
-- benchmark's identities; one in ten is unknown, like a mistyped code at the gate.
local counter = 0
local identities = tonumber(os.getenv("BENCH_IDENTITIES") or "1000000")
-- Globals: setup() runs in the main Lua state and sets each thread's own id.
next_thread = 0
thread_id = 0

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
end

-- A random tag per thread and run keeps ids unique across wrk runs against one database,
-- so no request is answered as a replay.
run_tag = 0

function init(args)
   math.randomseed(os.time() * 1000 + thread_id)
   run_tag = math.random(0, 0x7fffffff)
end

local function uuid(n)
   return string.format("%08x-%04x-4%03x-8%03x-%012x",
      run_tag, thread_id, n % 4096, math.floor(n / 4096) % 4096, n)
end

request = function()
   counter = counter + 1
   local key
   if counter % 10 == 0 then
      key = string.format("UNKNOWN-%d", counter)
   else
      key = string.format("BENCH-KEY-%08d", (counter * 7919) % identities)
   end
   local body = string.format(
      '{"requestId":"%s","storeId":"STORE-001","scanEvent":{"id":"%s",' ..
      '"timestamp":"%s","location":"ENTRY","value":"%s","channel":"OPTICAL"}}',
      uuid(counter * 2), uuid(counter * 2 + 1), os.date("!%Y-%m-%dT%H:%M:%SZ"), key)
   return wrk.format("POST", "/v1/identity/scan", {["Content-Type"] = "application/json"}, body)
end

-- With BENCH_RATE set, each connection waits between requests so that all
-- BENCH_CONNECTIONS together send about BENCH_RATE requests per second. The waits are
-- exponentially distributed, like independent gates, so the connections do not fire in step.
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")
if rate > 0 then
   delay = function()
      return -math.log(1 - math.random()) * 1000 * connections / rate
   end
end

-- One machine-readable line for bench_resolve.py: percentiles in microseconds.
done = function(summary, latency, requests)
   io.write(string.format(
      "BENCH p50_us=%d p99_us=%d p999_us=%d requests=%d errors=%d seconds=%.3f\n",
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
      summary.requests,
      summary.errors.connect + summary.errors.read + summary.errors.write
         + summary.errors.status + summary.errors.timeout,
      summary.duration / 1e6))
end
