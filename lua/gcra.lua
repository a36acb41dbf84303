--[[
gcra.lua: the Generic Cell Rate Algorithm, shared by the scripts that
rate-limit. It is not run on its own: src/hot/mod.rs puts it in front of
consume.lua and rate_limit.lua, so both apply one definition.

A limiter holds its theoretical arrival time (TAT), in a string key
(rate_limit.lua) or a hash field (consume.lua):
the instant, in microseconds on Redis's clock (TIME), at which the limiter
would be empty again had every request allowed so far arrived exactly at
the sustained rate. A limit is two numbers:

  interval  microseconds between requests at the sustained rate
            (3.6e9 / requests per hour, at least 1)
  burst     requests that may arrive at once on a rested limiter

A request at `now` is allowed when max(TAT, now) + interval - burst *
interval <= now, and then moves TAT to max(TAT, now) + interval. A refused
request moves nothing, so hammering a limited endpoint does not delay
the caller's recovery. Times stay below 2^53 microseconds (the year 2255),
so Lua's doubles hold them exactly.

Returns allowed, the new TAT, the wait in microseconds before a request
would be allowed (0 when allowed), and the requests still allowed at once
after this one.
]]
local function gcra(stored_tat, now, interval, burst)
  local tat = math.max(tonumber(stored_tat) or 0, now)
  local allow_at = tat + interval - burst * interval
  if allow_at > now then
    return false, tat, allow_at - now, 0
  end
  return true, tat + interval, 0, math.floor((now - allow_at) / interval)
end

