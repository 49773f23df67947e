-- Requests for `make bench` (scripts/bench.py): which token each request carries.
--
--   wrk ... -s requests.lua URL PATH HOT POOL START COUNT EVERY THREADS
--
-- PATH     request path (GET)
-- HOT      a token sent on every request that does not take a fresh one; "-" for none
-- POOL     a file of tokens, one a line; "-" for none
-- START    first line of POOL this run may use (0-based)
-- COUNT    how many lines from START, shared out between the threads (disjoint)
-- EVERY    every EVERY-th request takes the next fresh token (1: all, 0: never)
-- THREADS  wrk's -t, so each thread knows its share of the slice
--
-- Every request is formatted in init(), before wrk starts its clock, so the
-- per-request Lua cost is one table lookup, the same for every case. Each
-- fresh token is sent once; should a thread's share run out, it starts over
-- and counts `reused`, which benchkit/runner.py reports as an invalid cache-miss run.
-- done() prints one line, "BENCH_RESULT {json}", that benchkit/runner.py reads.

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

local hot_request = nil
local fresh = {}
local every = 0
local sent = 0
local next_fresh = 0
local wrapped = false
fresh_used = 0 -- globals, so done() can read them with thread:get()
reused = 0

local function format(token)
   local headers = {}
   if token then
      headers["Authorization"] = "Bearer " .. token
   end
   return wrk.format("GET", wrk.path, headers)
end

function init(args)
   wrk.path = args[1]
   local hot, pool = args[2], args[3]
   local start, count = tonumber(args[4]), tonumber(args[5])
   every = tonumber(args[6])
   local nthreads = tonumber(args[7])
   hot_request = format(hot ~= "-" and hot or nil)
   if pool ~= "-" and count > 0 then
      -- Thread `id` takes lines start+id, start+id+nthreads, ...
      local line = 0
      for token in io.lines(pool) do
         if line >= start + count then break end
         if line >= start and (line - start) % nthreads == id then
            fresh[#fresh + 1] = format(token)
         end
         line = line + 1
      end
      if #fresh == 0 then
         error("no tokens in " .. pool .. " from line " .. start)
      end
   end
end

function request()
   sent = sent + 1
   if every > 0 and sent % every == 0 then
      next_fresh = next_fresh + 1
      if next_fresh > #fresh then
         next_fresh = 1
         wrapped = true
      end
      if wrapped then
         reused = reused + 1
      end
      fresh_used = fresh_used + 1
      return fresh[next_fresh]
   end
   return hot_request
end

function done(summary, latency, requests)
   local used, again = 0, 0
   for _, thread in ipairs(threads) do
      used = used + thread:get("fresh_used")
      again = again + thread:get("reused")
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d, "mean": %.1f}, ' ..
      '"fresh_used": %d, "reused": %d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean,
      used, again))
end
