--[[
account_take.lua: take back purchased tokens that a refund returns, as far
as they are unspent, and say how many were taken.

The amount is decided here, atomically with the consumes spending the same
tokens, and the caller records exactly this amount in the ledger. Reading
the balance first and taking later would let a consume in between spend
tokens the ledger then takes back a second time.

KEYS  1  account hash <prefix>:{<shard>}:c:<customer>:acct
      2  the refund's marker …:c:<customer>:once:<sha256>: a refund retried
         after a crash or a lost reply before the ledger's commit is
         answered with what it took the first time, and takes nothing more
ARGV  1  tokens to take back (an integer >= 1)
      2  seconds to remember the marker
Reply the tokens taken (0 ..= ARGV[1]), or -1 when the account is not
      loaded: the ledger's balance is then the live one.
]]

local wanted = tonumber(ARGV[1])
if not wanted or wanted < 1 or wanted ~= math.floor(wanted) then
  return redis.error_reply('ERR tokens to take must be an integer >= 1')
end
if not tonumber(ARGV[2]) then
  return redis.error_reply('ERR the marker TTL must be seconds')
end
if redis.call('HEXISTS', KEYS[1], 'allowance') == 0 then
  return -1
end
local before = redis.call('GET', KEYS[2])
if before then
  return tonumber(before)
end
local have = tonumber(redis.call('HGET', KEYS[1], 'purchased')) or 0
local taken = math.max(math.min(wanted, have), 0)
if taken > 0 then
  redis.call('HINCRBY', KEYS[1], 'purchased', -taken)
end
redis.call('SET', KEYS[2], taken, 'EX', ARGV[2])
return taken
