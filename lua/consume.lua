--[[
consume.lua: charge one use of an app, atomically, in one round trip.

The hot path of the service. Redis runs the whole script without
interleaving another command, so the check and the decrement cannot race;
there is no rollback, so every argument and every key type is validated
before the first write.

KEYS
  1  account hash   <prefix>:{<shard>}:c:<customer>:acct   (see src/hot/keys.rs)
  2  idempotency    <prefix>:{<shard>}:c:<customer>:idem:<sha256(Idempotency-Key)>
                    (any name in the slot when ARGV[7] is empty: it is not touched)
  3  usage stream   <prefix>:{<shard>}:usage

ARGV
  1  customer id (UUID)            6  embed key id, or "" for a JWT caller
  2  app slug                      7  request fingerprint, or "" without Idempotency-Key
  3  app id (UUID)                 8  idempotency TTL in seconds
  4  tokens to charge (>= 1)       9  session id, or ""
  5  event id (UUIDv7)            10  metadata as a JSON object text, or ""
                                  11  deadline in epoch ms on Redis's clock, 0 = none

Replies (an array, first element the outcome)
  { 1, tokens_remaining, event_id, from_purchased, at_ms }  charged; -1 remaining = unlimited
  { 2, event_id, tokens, tokens_remaining }                 idempotent replay, nothing charged
  { 3 }                                                     Idempotency-Key reused with another body
  {-1 }                                                     account not loaded: rebuild it, retry
  {-2 }                                                     embed key revoked or expired
  {-3 }                                                     app not active for this customer
  {-4 }                                                     subscription inactive
  {-5, tokens_remaining }                                   insufficient tokens
  {-6 }                                                     past the deadline: the caller has
                                                            given up (503), so nothing is charged
  an error reply                                            invalid arguments or key types; nothing written

Account hash fields (written by src/hot/account.rs)
  v            layout version; absent = not loaded
  allowance    tokens per billing period, -1 = unlimited
  used         allowance drawn this period
  purchased    purchased tokens left (they do not expire)
  status       active | none | past_due | canceled | unpaid
  grace_until  epoch ms until which past_due may still consume
  app:<slug>   "1" while the activation is active
  key:<id>     expiry of a live embed key in epoch ms, 0 = never
]]

local tokens = tonumber(ARGV[4])
if not tokens or tokens < 1 or tokens > 2147483647 or tokens % 1 ~= 0 then
  return redis.error_reply('ERR tokens must be an integer in 1..2^31-1')
end
if ARGV[1] == '' or ARGV[2] == '' or ARGV[3] == '' or ARGV[5] == '' then
  return redis.error_reply('ERR customer, app and event ids are required')
end
local idem_ttl = tonumber(ARGV[8])
if ARGV[7] ~= '' and (not idem_ttl or idem_ttl < 1) then
  return redis.error_reply('ERR idempotency TTL must be a positive integer')
end
-- XADD on a key of another type would fail after the decrement: refuse first.
local stream_type = redis.call('TYPE', KEYS[3])['ok']
if stream_type ~= 'stream' and stream_type ~= 'none' then
  return redis.error_reply('ERR usage stream key holds a ' .. stream_type)
end

-- 1. Idempotency: a retry of a charged request gets the first answer back.
if ARGV[7] ~= '' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    local fp, event_id, charged, remaining = string.match(prior, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
    if fp ~= ARGV[7] then
      return { 3 }
    end
    return { 2, event_id, tonumber(charged), tonumber(remaining) }
  end
end

local acct = redis.call('HMGET', KEYS[1], 'v', 'allowance', 'used', 'purchased', 'status',
  'grace_until', 'app:' .. ARGV[2], ARGV[6] ~= '' and ('key:' .. ARGV[6]) or 'v')
if not acct[1] then
  return { -1 }
end
local allowance = tonumber(acct[2])
local used = tonumber(acct[3])
local purchased = tonumber(acct[4])
if not allowance or not used or not purchased then
  return redis.error_reply('ERR account hash is malformed')
end

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
-- A script that waited in Redis's queue past the caller's deadline would
-- charge a request the caller already answered with 503.
local deadline = tonumber(ARGV[11]) or 0
if deadline > 0 and now_ms > deadline then
  return { -6 }
end

-- Embed keys are refused the moment their field is removed (revocation).
if ARGV[6] ~= '' then
  local expiry = tonumber(acct[8])
  if not expiry or (expiry > 0 and now_ms >= expiry) then
    return { -2 }
  end
end

-- 2. Activation.
if acct[7] ~= '1' then
  return { -3 }
end

-- 3. Subscription status.
local status = acct[5]
if status == 'past_due' then
  if now_ms >= (tonumber(acct[6]) or 0) then
    return { -4 }
  end
elseif status ~= 'active' and status ~= 'none' then
  return { -4 }
end

-- 4. Balance: the period's allowance first, then purchased tokens.
local from_purchased = 0
if allowance >= 0 then
  local allowance_left = math.max(allowance - used, 0)
  if allowance_left + purchased < tokens then
    return { -5, allowance_left + purchased }
  end
  from_purchased = math.max(tokens - allowance_left, 0)
end

-- 5. The decrement (the first write).
used = redis.call('HINCRBY', KEYS[1], 'used', tokens - from_purchased)
if from_purchased > 0 then
  purchased = redis.call('HINCRBY', KEYS[1], 'purchased', -from_purchased)
end
local remaining = -1
if allowance >= 0 then
  remaining = math.max(allowance - used, 0) + purchased
end

-- 6. The usage event, read by the flusher (src/workers/flusher.rs).
redis.call('XADD', KEYS[3], '*',
  'e', ARGV[5], 'c', ARGV[1], 'a', ARGV[3], 't', tokens, 'p', from_purchased,
  'ts', now_ms, 's', ARGV[9], 'k', ARGV[6], 'm', ARGV[10])

if ARGV[7] ~= '' then
  redis.call('SET', KEYS[2], ARGV[7] .. '|' .. ARGV[5] .. '|' .. tokens .. '|' .. remaining,
    'EX', idem_ttl)
end

return { 1, remaining, ARGV[5], from_purchased, now_ms }
