-- GET passthrough: a plain GET of the app's /_stats (a small JSON answer), never keyed.
-- Every layer forwards it untouched: what the proxy costs on traffic it does not protect.
function request()
  return wrk.format("GET", "/_stats")
end

dofile(os.getenv("BENCH_LUA_DIR") .. "/report.lua")
