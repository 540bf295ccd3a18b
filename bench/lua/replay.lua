-- Scenario (b): replays, cycling over keys the runner completed beforehand with this
-- same body ("<seed prefix>-0" .. "<seed prefix>-<count-1>"). Args: <seed prefix> <count>.
local body = '{"amount":1000,"currency":"EUR","customer":"cus_bench","description":"bench payment"}'
local threads = {}
local counter = 0
local prefix = ""
local count = 1

function setup(thread)
  thread:set("tid", tostring(#threads))
  table.insert(threads, thread)
end

function init(args)
  prefix = args[1] .. "-"
  count = tonumber(args[2])
  -- threads start at different offsets, so they do not replay the same key in lockstep
  counter = (tonumber(tid) * 7919) % count
end

function request()
  counter = (counter + 1) % count
  return wrk.format("POST", "/payments",
    {["Content-Type"] = "application/json", ["Idempotency-Key"] = prefix .. counter}, body)
end

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
