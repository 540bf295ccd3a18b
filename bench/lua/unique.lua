-- Scenario (a): a fresh Idempotency-Key on every request, so every request executes.
-- Args: <run id> [<path>]. Keys are "<run id>-<thread>-<n>", unique across runs and threads;
-- the path is /payments unless given (scenario (e) posts to /orders).
local body = '{"amount":1000,"currency":"EUR","customer":"cus_bench","description":"bench payment"}'
local threads = {}
local counter = 0
local prefix = ""
local path = "/payments"

function setup(thread)
  thread:set("tid", tostring(#threads + 1))
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "u") .. "-" .. tid .. "-"
  path = args[2] or path
end

function request()
  counter = counter + 1
  return wrk.format("POST", path,
    {["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. counter}, body)
end

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
