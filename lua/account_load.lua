--[[
account_load.lua: install a customer's hot state, rebuilt from Postgres.

Called by src/hot/account.rs while the caller holds the customer's row lock
in Postgres, so no other writer of the same customer runs meanwhile. It
writes only when the hash has no `allowance`: an account that a
concurrent rebuild already loaded, and has since charged, is never
overwritten.

KEYS  1  account hash <prefix>:{<shard>}:c:<customer>:acct
ARGV  field, value, field, value, … (must include `allowance`)
Reply 1 when loaded, 0 when it was already loaded.
]]

if #ARGV == 0 or #ARGV % 2 ~= 0 then
  return redis.error_reply('ERR fields and values must come in pairs')
end
local key_type = redis.call('TYPE', KEYS[1])['ok']
if key_type ~= 'hash' and key_type ~= 'none' then
  return redis.error_reply('ERR account key holds a ' .. key_type)
end
if redis.call('HEXISTS', KEYS[1], 'allowance') == 1 then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
