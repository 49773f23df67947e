-- requests.lua at about a fixed rate: after each response a connection waits a
-- random 0..2*MEAN_DELAY_MS (uniform) before its next request, so C connections
-- send about C * 1000 / (MEAN_DELAY_MS + latency) requests per second
-- (20 connections x 20 ms: ~1,000/s, a little less as latency grows).
--
--   wrk ... -s paced.lua URL <requests.lua arguments> MEAN_DELAY_MS
--
-- Random, not fixed, delays: with a fixed delay the connections stay in phase
-- and the server sees bursts of C requests at once followed by silence, which
-- measures a burst's queue, not a steady rate. wrk measures each latency from
-- sending the request to its response, without the delay.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "requests.lua")

local mean_delay_ms = 20
local init_requests = init

function init(args)
   init_requests(args)
   mean_delay_ms = tonumber(args[8])
   math.randomseed(os.time() + id)
end

function delay()
   return math.random(0, 2 * mean_delay_ms)
end
