-- wrk script: resolve.lua plus two optional headers. BENCH_API_KEY adds the x-api-key
-- header that [auth] checks. BENCH_CONNECTION_CLOSE=1 adds "Connection: close", so the
-- daemon closes each connection after its response and wrk opens a new one (with a new
-- TLS handshake over https) for the next request. BENCH_SCRIPT_DIR is the folder of
-- resolve.lua, because wrk resolves relative paths from its working directory.
dofile((os.getenv("BENCH_SCRIPT_DIR") or "tests/bench") .. "/resolve.lua")

local api_key = os.getenv("BENCH_API_KEY") or ""
local connection_close = os.getenv("BENCH_CONNECTION_CLOSE") == "1"
local format = wrk.format

wrk.format = function(method, path, headers, body)
   headers = headers or {}
   if api_key ~= "" then
      headers["x-api-key"] = api_key
   end
   if connection_close then
      headers["Connection"] = "close"
   end
   return format(method, path, headers, body)
end
