--[[
rate_limit.lua: one request against one limiter, for the route groups of
the API (catalog, activation, billing). Runs after gcra.lua, prepended by
src/hot/mod.rs. The consume endpoint does not use it: its limits are
checked inside consume.lua, in the charge's own round trip.

KEYS
  1  limiter  <prefix>:v1:rl:<group>:<customer>   GCRA TAT (gcra.lua)

ARGV
  1  interval in µs (>= 1)         2  burst (>= 1)

Reply { allowed (1 or 0), remaining, wait_us, rested_us }: requests still
allowed at once, the wait before the next is allowed (0 when allowed), and
when the limiter is rested again.
]]

local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if not interval or not burst or interval < 1 or burst < 1 or interval % 1 ~= 0 or burst % 1 ~= 0 then
  return redis.error_reply('ERR interval and burst must be positive integers')
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local allowed, tat, wait, remaining = gcra(redis.call('GET', KEYS[1]), now, interval, burst)
if allowed then
  -- It expires when the limiter is rested anyway, so idle customers cost
  -- no memory. '%d' because Lua's default number format would round a
  -- 16-digit integer.
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return { allowed and 1 or 0, remaining, wait, tat - now }
