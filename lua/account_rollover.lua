--[[
account_rollover.lua: start a customer's new billing period in the hot
state, once.

Keyed by the period: ARGV names the period being started by its start
(the old period's end). Run by the scheduled rollover, by invoice.paid and
by subscription changes, under the customer's row lock in Postgres; any of
them may come late, twice or at once.

  - The account still in the period that ends at `start` (or an earlier
    one): usage from zero, the new allowance and period.
  - The account already in this period (the consume script started it
    when a consume came at or after `start`): its usage stands; only the
    periods that follow and the allowances are written.
  - The account in a later period (the consume script went on past
    several boundaries): a stale call, nothing changes.
  - No account: nothing; the next consume rebuilds it from Postgres.
  - A new subscription's first period (ARGV 6): usage from zero whatever
    period the account is in; the subscription paid for its own.

KEYS  1  account hash (src/hot/keys.rs)
ARGV  1  start: epoch ms, the new period's start (the old period's end,
         or a later boundary when the periods between went unseen)
      2  end: epoch ms, the new period's end (> start)
      3  next_ends: the ends of the periods after it, epoch ms,
         comma-separated, ascending; "" when none follows
      4  allowance of the new period (-1 = unlimited)
      5  allowance of the period after
      6  1 for the first period of a new subscription (it starts from zero
         even if the old period ends at the same instant), else 0
Reply 1 reset, 2 already in this period, 0 stale or not loaded; for a new
      subscription's period, the instant it began (epoch ms, on Redis's
      clock).
]]

local start, stop = tonumber(ARGV[1]), tonumber(ARGV[2])
local allowance, next_allowance = tonumber(ARGV[4]), tonumber(ARGV[5])
if not start or not stop or not allowance or not next_allowance
    or stop <= start or start % 1 ~= 0 or stop % 1 ~= 0 or allowance % 1 ~= 0
    or not string.match(ARGV[3], '^[%d,]*$') then
  return redis.error_reply('ERR rollover arguments must be integers with end > start')
end
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' or redis.call('HEXISTS', KEYS[1], 'allowance') == 0 then
  return 0
end
local current_end = tonumber(redis.call('HGET', KEYS[1], 'period_end')) or 0
local fresh = ARGV[6] == '1'
if current_end > stop and not fresh then
  return 0
end
local successor = { 'next_ends', ARGV[3], 'next_allowance', ARGV[5] }
-- The usage alerts' next mark depends on the allowance: recomputed by the
-- next consume.
redis.call('HDEL', KEYS[1], 'alert_next')
if current_end == stop and not fresh then
  redis.call('HSET', KEYS[1], 'allowance', ARGV[4], unpack(successor))
  return 2
end
-- A new period: its usage from zero, its alert thresholds armed again.
-- A new subscription's begins now, on the clock the consume script stamps
-- its charges with: every charge before this instant was the old
-- subscription's, every one after is the new one's, and the ledger counts
-- the period from the instant returned.
local period_start = ARGV[1]
if fresh then
  local clock = redis.call('TIME')
  period_start = string.format('%d', tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000))
end
redis.call('HSET', KEYS[1], 'used', '0', 'allowance', ARGV[4], 'period_end', ARGV[2],
  'period_start', period_start, 'alerted', '', unpack(successor))
if fresh then
  return tonumber(period_start)
end
return 1
