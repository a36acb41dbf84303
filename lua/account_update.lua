--[[
account_update.lua: change a loaded customer's hot state in place.

Used when Postgres changes something the consume script reads (a grant, an
activation paused, an embed key revoked), in the same request and under the
same customer row lock, so consumes see the change at once. An account that
is not loaded is left alone: its next consume rebuilds it from Postgres,
which already holds the change. Writing into it would create a partial hash
that the rebuild would then refuse to overwrite.

KEYS  1  account hash <prefix>:{<shard>}:c:<customer>:acct
      2  with a once or forget gate: the change's marker …:c:<customer>:once:<sha256>
ARGV  op, field, value, op, field, value, …
      op is `set` (HSET field value), `del` (HDEL field) or `incr`
      (HINCRBY field value, an integer). A refund's take is
      `account_take.lua`: its caller needs the amount taken.
      The first triple may be a gate (field unused):
      `once` (value: seconds to remember it) applies the rest only if the
      marker is absent, and sets it: a credit retried after a crash or a
      lost reply before the ledger's commit is not credited twice;
      `forget` applies the rest only if the marker is present, and
      deletes it: the undo of a gated update whose commit failed;
      `period` (value: a period's end, epoch ms) applies the rest only
      while the account is in that period: a change that belongs to a
      period (its allowance, its end) never lands in the next one, which
      the consume script may have started since the change was decided.
Reply 1 when applied, 0 when the account is not loaded, 2 when the gate
      held the update back.
]]

if #ARGV == 0 or #ARGV % 3 ~= 0 then
  return redis.error_reply('ERR ops come as op, field, value triples')
end
local gate = nil
if ARGV[1] == 'once' or ARGV[1] == 'forget' then
  gate = ARGV[1]
  if not KEYS[2] then
    return redis.error_reply('ERR a gate needs its marker key')
  end
  if gate == 'once' and not tonumber(ARGV[3]) then
    return redis.error_reply('ERR once needs a TTL in seconds')
  end
elseif ARGV[1] == 'period' then
  gate = 'period'
  if not tonumber(ARGV[3]) then
    return redis.error_reply('ERR period needs a period end in epoch ms')
  end
end
local first = gate and 4 or 1
for i = first, #ARGV, 3 do
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
if gate == 'period' then
  if tonumber(redis.call('HGET', KEYS[1], 'period_end')) ~= tonumber(ARGV[3]) then
    return 2
  end
elseif gate == 'once' then
  if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) == false then
    return 2
  end
elseif gate == 'forget' then
  if redis.call('DEL', KEYS[2]) == 0 then
    return 2
  end
end
for i = first, #ARGV, 3 do
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
