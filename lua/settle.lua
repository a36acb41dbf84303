--[[
settle.lua: learn the outcome of a consume whose reply was lost, and make
sure it cannot change afterwards.

Run by src/hot/charge.rs over its side connection when the consume
script's reply did not come back in time. Atomically: if the outcome
record holds a charge (this request's, or under its Idempotency-Key an
earlier request's), return it; otherwise write a fence naming this
request's event, so that the consume script, should it still run, charges
nothing (lua/consume.lua, "Fences"), and return false. Fences of other
events under the same key are kept: each fenced request stays fenced.

KEYS
  1  outcome record (the consume's own key for it)

ARGV
  1  the request's event id
  2  TTL of the fence in seconds: longer than any consume can wait in
     Redis's queue
  3  "field" when the record is the field named by the event id in a charge
     record hash (a consume without Idempotency-Key), "" when it is the
     key's value (an Idempotency-Key record)

Replies
  the record "<fingerprint>|<event id>|<tokens>|<remaining>"   a charge is recorded
  false (nil)                                                  fenced: never charged
]]

local ttl = tonumber(ARGV[2])
if ARGV[1] == '' or not ttl or ttl < 1 or ttl % 1 ~= 0 then
  return redis.error_reply('ERR an event id and a positive TTL are required')
end
local as_field = ARGV[3] == 'field'
local found
if as_field then
  found = redis.call('HGET', KEYS[1], ARGV[1])
else
  found = redis.call('GET', KEYS[1])
end
if found and string.sub(found, 1, 6) ~= 'fence|' then
  return found
end
if as_field then
  -- The fence's TTL goes to the whole hash, which a consume keeps only
  -- seconds from its first write, never shortening it (lua/consume.lua).
  redis.call('HSET', KEYS[1], ARGV[1], 'fence|' .. ARGV[1])
  if redis.call('TTL', KEYS[1]) < ttl then
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return false
end
local fence = 'fence|' .. ARGV[1]
if found then
  fence = found .. '|' .. ARGV[1]
end
redis.call('SET', KEYS[1], fence, 'EX', ttl)
return false
