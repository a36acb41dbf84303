--[[
account_update.lua: change a loaded customer's hot state in place.

Used when Postgres changes something the consume script reads (a grant, an
activation paused, an embed key revoked), in the same request and under the
same customer row lock, so consumes see the change at once. An account that
is not loaded is left alone: its next consume rebuilds it from Postgres,
which already holds the change. Writing into it would create a partial hash
that the rebuild would then refuse to overwrite.

KEYS  1  account hash <prefix>:{<shard>}:c:<customer>:acct
ARGV  op, field, value, op, field, value, …
      op is `set` (HSET field value), `del` (HDEL field) or `incr`
      (HINCRBY field value, an integer). A refund's take is
      `account_take.lua`: its caller needs the amount taken.
Reply 1 when applied, 0 when the account is not loaded.
]]

if #ARGV == 0 or #ARGV % 3 ~= 0 then
  return redis.error_reply('ERR ops come as op, field, value triples')
end
for i = 1, #ARGV, 3 do
  local op = ARGV[i]
  if op ~= 'set' and op ~= 'del' and op ~= 'incr' then
    return redis.error_reply('ERR unknown op ' .. op)
  end
  if op == 'incr' and not tonumber(ARGV[i + 2]) then
    return redis.error_reply('ERR incr needs an integer')
  end
end
local key_type = redis.call('TYPE', KEYS[1])['ok']
if key_type ~= 'hash' then
  return 0
end
if redis.call('HEXISTS', KEYS[1], 'allowance') == 0 then
  return 0
end
for i = 1, #ARGV, 3 do
  local op, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'set' then
    redis.call('HSET', KEYS[1], field, value)
  elseif op == 'del' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HINCRBY', KEYS[1], field, value)
  end
end
return 1
