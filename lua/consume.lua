--[[
consume.lua: charge one use of an app, atomically, in one round trip.
Runs after gcra.lua (the rate-limit arithmetic), prepended by src/hot/mod.rs.

The hot path of the service. Redis runs the whole script without
interleaving another command, so the check and the decrement cannot race.
There is no rollback, so every argument and every value read is validated
before the first write, and the writes are ordered so none can fail once
another has happened: the outcome record first (a SET), then the XADD
(it fails only on a key of another type), then one HSET of the account
(a hash, as the HMGET proved). Without Idempotency-Key the record is a
field of a hash the call read before its first write; it is kept once
the charge's last write is made and written at the end of the call with
the other charges' records, so a charge that failed has none. To the
outside the decrement, the event and the record are one step.

Fences. A caller whose reply is late gives up and answers 503; before it
does, lua/settle.lua writes a fence where the outcome record goes
(`fence|<event id>|…`), atomically with reading whether the charge
happened. Redis runs the two scripts one after the other: if this one ran
first, the settle finds its record and the caller answers 200; if the
settle ran first, this script finds the fence and charges nothing. So a 503
means not charged whatever the clocks say. The deadline (ARGV 8) is a
second guard, for when the settle itself cannot reach Redis.

Sent twice. A client may send one call again: in a Redis Cluster, a slot
moving to another master answers MOVED or ASK and the client sends the
call where the slot now is (src/hot/mod.rs). A charge that finds its own
outcome record (its event id, with or without Idempotency-Key) is
answered from it ({ 2, its own event id, … }) and charged nothing again.

Batches. Concurrent consumes are coalesced into one call
(src/hot/coalesce.rs): while one call is in Redis, the consumes that
arrive queue, and the next call takes them all. On one Redis server a
call carries charges of any shards, each naming its own shard's keys; in
a Redis Cluster the charges of one shard only (one slot). The script
charges them one after the other, each exactly as if it came
alone (its own idempotency, limits, balance, outcome record and event), so
the refusal of one never touches another; a batch of one is a lone
consume. Redis's clock is read once per call: every charge of a batch
happens at the same instant. A charge that is invalid is answered { -9,
message } in its place and nothing of it is written. Should the script
fail mid-way (a Redis error), the charges before the failure stand, with
their records, and each caller learns its own outcome with
lua/settle.lua, as for a lost reply.

KEYS (4 per charge, each charge's of its own customer's shard)
  +1 usage stream   <prefix>:v1:{s<shard>}:usage
  +2 disabled apps  <prefix>:v1:{s<shard>}:apps:disabled   set of slugs an operator disabled
  +3 account hash   <prefix>:v1:{s<shard>}:c:<customer>:acct   (src/hot/keys.rs)
  +4 outcome record <prefix>:v1:{s<shard>}:c:<customer>:idem:<sha256(Idempotency-Key)>,
                    "<fingerprint>|<event id>|<tokens>|<remaining>", or a settle's
                    fence "fence|<event id>[|<event id>…]"; without Idempotency-Key
                    the hash <prefix>:v1:{s<shard>}:charges:<second of the event id>,
                    whose field <event id> holds "|<event id>|<tokens>|<remaining>"
                    or the fence "fence|<event id>"; on one Redis server every
                    charge's hash is shard 0's (src/hot/charge.rs)

ARGV (12 per charge, in the order of KEYS)
  1  app slug                       5  request fingerprint, or "" without Idempotency-Key
  2  tokens to charge (>= 1)        6  TTL of the outcome record in seconds
                                       (a charge record hash's: from its first write)
  3  event id (UUIDv7)              7  the event's details as JSON, written as is
  4  embed key id, or "" (JWT)      8  deadline in epoch ms on Redis's clock, 0 = none
  9  customer limit interval µs, 0 = unlimited     10  customer limit burst
 11  key limit interval µs, 0 = none               12  key limit burst

Reply: an array with one reply per charge, in order; each an array whose
first element is the outcome
  { 1, tokens_remaining, from_purchased, at_ms }   charged; -1 remaining = unlimited
  { 2, event_id, tokens, tokens_remaining }        idempotent replay, nothing charged
  { 3 }                                            Idempotency-Key reused with another body
  {-1 }                                            account not loaded: rebuild it, retry
  {-2 }                                            embed key revoked or expired
  {-3 }                                            app not active for this customer,
                                                   or disabled for everyone
  {-4 }                                            subscription inactive
  {-5, tokens_remaining }                          insufficient tokens
  {-6 }                                            fenced, or past the deadline: the
                                                   caller has given up (503), so nothing
                                                   is charged
  {-7, wait_us, rested_us, limiter }               rate limited: allowed again in wait_us,
                                                   limiter rested in rested_us; limiter
                                                   1 = the customer's, 2 = the embed key's
  {-9, message }                                   invalid arguments or state; nothing written
An error reply for the whole call: the layout of KEYS and ARGV is wrong
(nothing written), or Redis failed mid-way (see Batches).

Account hash fields (written by src/hot/account.rs; absent hash = not loaded)
  allowance    tokens per billing period, -1 = unlimited
  used         allowance drawn this period
  purchased    purchased tokens left (they do not expire)
  open_until   0 = may consume; > 0 = may consume until then (past_due, epoch ms);
               -1 = may not (canceled, unpaid)
  app:<slug>   "1" while the activation is active
  key:<id>     expiry of a live embed key in epoch ms, 0 = never
  rl           the customer's consume limiter: its GCRA TAT in µs (gcra.lua)
  rl:<id>      the embed key's own limiter
  period_end   epoch ms at which the billing period ends, 0 = no period
  next_ends    the ends of the periods after it, epoch ms, comma-separated,
               ascending (a year of them, counted from the billing anchor);
               empty when none follows (a subscription ending with its period)
  next_allowance  the allowance of the periods after this one (differs after
               a downgrade)
  period_start epoch ms at which the billing period began
  alert_at     the merchant's usage alert thresholds, percent of the allowance,
               comma-separated ("80,100"); "" for none
  alerted      the thresholds crossed this period, comma-separated
  alert_next   the usage (tokens) at which the next threshold is crossed, -1 for
               none; absent after anything it depends on changed: recomputed
The limiters live in the account hash so the HMGET that reads the balance
reads them too, and the HSET that charges writes them: rate limiting adds
no Redis command to a consume.

Usage event (stream entry, read by src/workers/flusher/write.rs)
  d   ARGV[7]: {"e": event id, "c": customer, "a": app id, "s": session,
                "k": embed key, "m": metadata}
  t   tokens charged       p   of which purchased       ts  charge time, epoch ms
  x   only when this charge crossed usage alert thresholds:
      "<thresholds>|<used after>|<allowance>|<period start ms>|<period end ms>"
]]

-- What every charge of the call shares: Redis's clock (read once, below),
-- and what cannot change while the script runs, asked of Redis once per
-- call rather than once per charge.
local now_us, now_ms, now_ms_text

-- Whether the app is in the shard's disabled set, asked once per set and
-- app in a call.
local disabled = {}
local function is_disabled(set, slug)
  local known = disabled[set]
  if known == nil then
    known = {}
    disabled[set] = known
  end
  local answer = known[slug]
  if answer == nil then
    answer = redis.call('SISMEMBER', set, slug) == 1
    known[slug] = answer
  end
  return answer
end

-- The charge records (consumes without Idempotency-Key), read and written
-- once per record hash and call rather than once per charge: on one Redis
-- server every charge of a call names the same hash (src/hot/charge.rs),
-- so a batch pays three commands for its records, not two a charge.
-- `known[key][event id]` holds what the hash held for each event of the
-- call when the call began (one HMGET, before any write), and the records
-- this call made since; `written[key]` the fields to write, which the end
-- of the call does with one HSET, then gives the hash its TTL: `ttl`
-- seconds from its first write, which the caller sizes to cover every
-- write and read of the second it is named after, with NX so it never
-- shortens the hour a settle's fence gave it. Redis runs the script as one
-- step, so no other client sees a charge before its record; a Redis error
-- mid-way writes the records of the charges before it all the same (the
-- end of the script). EXPIRE's options are Redis 7.0's, which
-- src/hot/version.rs requires at start; after every write, a Redis that
-- refused them anyway (an older master joined later) fails no charge:
-- each caller settles and finds its record.
local known, written, ttls = {}, {}, {}

local function read_records(charges)
  local wanted = {}
  for i = 1, charges do
    local key, event_id = KEYS[4 * i], ARGV[12 * (i - 1) + 3]
    if ARGV[12 * (i - 1) + 5] == '' and event_id ~= '' then
      local events = wanted[key]
      if not events then
        events = {}
        wanted[key] = events
      end
      events[#events + 1] = event_id
    end
  end
  for key, events in pairs(wanted) do
    local found = redis.call('HMGET', key, unpack(events))
    local by_event = {}
    for j = 1, #events do
      by_event[events[j]] = found[j]
    end
    known[key] = by_event
    written[key] = {}
  end
end

local function record_charge(key, event_id, record, ttl)
  known[key][event_id] = record
  local fields = written[key]
  fields[#fields + 1] = event_id
  fields[#fields + 1] = record
  ttls[key] = ttl
end

local function write_records()
  for key, fields in pairs(written) do
    if #fields > 0 then
      redis.call('HSET', key, unpack(fields))
      redis.call('EXPIRE', key, ttls[key], 'NX')
    end
  end
end

-- One charge: its shard's stream and disabled set, its account and outcome
-- record; its 12 arguments are ARGV[at + 1 .. at + 12], read in place
-- rather than copied into a table of their own.
local function charge(stream, disabled_set, account, record_key, at)
  local slug, tokens_arg, event_id, key_id, fingerprint, ttl_arg, details, deadline_arg =
    ARGV[at + 1], ARGV[at + 2], ARGV[at + 3], ARGV[at + 4], ARGV[at + 5], ARGV[at + 6],
    ARGV[at + 7], ARGV[at + 8]
  local tokens = tonumber(tokens_arg)
  if not tokens or tokens < 1 or tokens > 2147483647 or tokens % 1 ~= 0 then
    return redis.error_reply('ERR tokens must be an integer in 1..2^31-1')
  end
  if slug == '' or event_id == '' or details == '' then
    return redis.error_reply('ERR app, event id and event details are required')
  end
  local record_ttl = tonumber(ttl_arg)
  if not record_ttl or record_ttl < 1 or record_ttl % 1 ~= 0 then
    return redis.error_reply('ERR the outcome record TTL must be a positive integer')
  end
  local limits = { tonumber(ARGV[at + 9]), tonumber(ARGV[at + 10]), tonumber(ARGV[at + 11]),
    tonumber(ARGV[at + 12]) }
  for i = 1, 4 do
    if not limits[i] or limits[i] < 0 or limits[i] % 1 ~= 0 then
      return redis.error_reply('ERR rate limits must be non-negative integers')
    end
  end

  -- 1. Idempotency: a retry of a charged request gets the first answer back.
  -- A fence (see "Fences" above) naming this event means its caller has
  -- answered 503: nothing may be charged. A fence naming only other events
  -- is what earlier attempts under this key left; this retry may charge.
  -- Without Idempotency-Key the record is this event's alone: a fence, or
  -- the record of this very call sent twice (see "Sent twice" above).
  local prior
  if fingerprint ~= '' then
    prior = redis.call('GET', record_key)
  else
    prior = known[record_key][event_id]
  end
  if prior then
    if string.sub(prior, 1, 6) == 'fence|' then
      if string.find(prior, '|' .. event_id, 6, true) then
        return { -6 }
      end
    else
      local fp, first_event, charged, remaining = string.match(prior, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
      if fp ~= fingerprint then
        return { 3 }
      end
      return { 2, first_event, tonumber(charged), tonumber(remaining) }
    end
  end

  local with_key = key_id ~= ''
  local acct = redis.call('HMGET', account, 'allowance', 'used', 'purchased', 'open_until',
    'app:' .. slug, with_key and ('key:' .. key_id) or 'allowance',
    'rl', with_key and ('rl:' .. key_id) or 'rl', 'period_end', 'alert_next')
  if not acct[1] then
    return { -1 }
  end
  local allowance = tonumber(acct[1])
  local used = tonumber(acct[2])
  local purchased = tonumber(acct[3])
  local open_until = tonumber(acct[4])
  -- Integers, so the values written below are integers too.
  if not allowance or not used or not purchased or not open_until
      or allowance % 1 ~= 0 or used % 1 ~= 0 or purchased % 1 ~= 0 then
    return redis.error_reply('ERR account hash is malformed')
  end

  -- A script that waited in Redis's queue past the caller's deadline would
  -- charge a request the caller already answered with 503.
  local deadline = tonumber(deadline_arg) or 0
  if deadline > 0 and now_ms > deadline then
    return { -6 }
  end

  -- The embed key is refused the moment its field is removed (revocation).
  if with_key then
    local expiry = tonumber(acct[6])
    if not expiry or (expiry > 0 and now_ms >= expiry) then
      return { -2 }
    end
  end

  -- 2. Activation, and the app not disabled by an operator (a set per
  -- shard, so every replica refuses it from the moment it is written).
  if acct[5] ~= '1' or is_disabled(disabled_set, slug) then
    return { -3 }
  end

  -- 3. Subscription status.
  if open_until < 0 or (open_until > 0 and now_ms >= open_until) then
    return { -4 }
  end

  -- 4. Rate limits: the customer's consume limit, then the embed key's own
  -- (the `rl` fields). Checked here, after the refusals that do not pass
  -- with time, so a caller learns those first. Only a charge moves the
  -- limiters (below), so a refused request costs no rate either.
  local tats = {}
  for i = 1, 2 do
    local interval, burst = limits[2 * i - 1], limits[2 * i]
    if interval > 0 then
      local allowed, tat, wait = gcra(acct[6 + i], now_us, interval, burst)
      if not allowed then
        return { -7, wait, tat - now_us, i }
      end
      tats[i] = tat
    end
  end

  -- 5. The billing period. A consume at or after the period's end belongs
  -- to a later period (the ledger counts it there too, by its time), so the
  -- script starts that period itself: the first of the coming period ends
  -- (`next_ends`, counted from the billing anchor) past now, usage from
  -- zero, the next periods' allowance. However many boundaries passed since
  -- the last rollover (a scheduler down for a month, Stripe's events late),
  -- a consume counts in the period it falls in. The scheduled rollover
  -- (account_rollover.lua) finds it started and does not reset it again,
  -- and a rollover that runs late never refuses what the new period allows.
  -- Nothing is written here: a refused consume leaves the roll to the next
  -- charge or to the rollover.
  -- The period entered begins at the last boundary passed (`rolled_from`):
  -- the old end after one boundary, a later one after several.
  local period_end = tonumber(acct[9]) or 0
  local rolled_to, rolled_from, ends_after = nil, period_end, nil
  if period_end > 0 and now_ms >= period_end then
    local next = redis.call('HMGET', account, 'next_ends', 'next_allowance')
    local next_allowance = tonumber(next[2])
    if next[1] and next_allowance and next_allowance % 1 == 0 then
      local later = {}
      for e in string.gmatch(next[1], '%d+') do
        if rolled_to then
          later[#later + 1] = e
        elseif tonumber(e) > now_ms then
          rolled_to = tonumber(e)
        else
          rolled_from = tonumber(e)
        end
      end
      if rolled_to then
        ends_after = table.concat(later, ',')
        allowance = next_allowance
        used = 0
      end
    end
  end

  -- 6. Balance: the period's allowance first, then purchased tokens.
  local from_purchased = 0
  if allowance >= 0 then
    local allowance_left = math.max(allowance - used, 0)
    if allowance_left + purchased < tokens then
      return { -5, allowance_left + purchased }
    end
    from_purchased = math.max(tokens - allowance_left, 0)
  end

  -- 7. The outcome record: what an Idempotency-Key retry replays, and what a
  -- caller whose reply was late reads to learn whether it was charged.
  -- Without Idempotency-Key it is the field named by the event id, which
  -- step 1 found empty, kept once the charge's writes are made (below).
  used = used + tokens - from_purchased
  if from_purchased > 0 then
    purchased = purchased - from_purchased
  end
  local remaining = -1
  if allowance >= 0 then
    remaining = math.max(allowance - used, 0) + purchased
  end
  -- '%d' because Lua's default number format would write a large integer in
  -- exponent form; each number is formatted once.
  local tokens_text = string.format('%d', tokens)
  local record = fingerprint .. '|' .. event_id .. '|' .. tokens_text .. '|'
    .. string.format('%d', remaining)
  if fingerprint ~= '' then
    redis.call('SET', record_key, record, 'EX', record_ttl)
  end

  -- 8. Usage alerts: did this charge carry the period's usage across one of
  -- the merchant's thresholds? `alert_next` caches the next mark in tokens,
  -- so a consume that crosses nothing pays one comparison; only a crossing,
  -- or the first consume after the thresholds, the allowance or the period
  -- changed (the field absent), reads and recomputes them. Atomic with the
  -- charge, so however many consumes race across a mark, one crosses it.
  local used_before = used - tokens + from_purchased
  local alert_next = (not rolled_to) and tonumber(acct[10]) or nil
  local crossing, new_next = nil, nil
  if alert_next == nil or (alert_next >= 0 and used >= alert_next) then
    local a = redis.call('HMGET', account, 'alert_at', 'alerted', 'period_start')
    local alerted = rolled_to and '' or (a[2] or '')
    local crossed = {}
    new_next = -1
    if allowance > 0 and a[1] and a[1] ~= '' then
      for t in string.gmatch(a[1], '%d+') do
        local mark = math.ceil(allowance * tonumber(t) / 100)
        if not string.find(',' .. alerted .. ',', ',' .. t .. ',', 1, true) and mark > used_before then
          if mark <= used then
            crossed[#crossed + 1] = t
          elseif new_next < 0 or mark < new_next then
            new_next = mark
          end
        end
      end
    end
    if #crossed > 0 then
      local start = rolled_to and rolled_from or (tonumber(a[3]) or 0)
      local now_alerted = alerted == '' and table.concat(crossed, ',')
        or (alerted .. ',' .. table.concat(crossed, ','))
      crossing = { table.concat(crossed, ','), now_alerted, start }
    elseif rolled_to then
      crossing = { nil, '', rolled_from }
    end
  end

  -- 9 and 10. The usage event and the decrement (one HSET instead of
  -- HINCRBYs: the script read these values and nothing runs between the read
  -- and the write). A crossing travels with the event (`x`).
  local current_end = rolled_to or period_end
  local purchased_text = from_purchased == 0 and '0' or string.format('%d', from_purchased)
  if crossing and crossing[1] then
    redis.call('XADD', stream, '*', 'd', details, 't', tokens_text, 'p', purchased_text, 'ts', now_ms_text,
      'x', crossing[1] .. '|' .. string.format('%d', used) .. '|' .. string.format('%d', allowance)
        .. '|' .. string.format('%d', crossing[3]) .. '|' .. string.format('%d', current_end))
  else
    redis.call('XADD', stream, '*', 'd', details, 't', tokens_text, 'p', purchased_text, 'ts', now_ms_text)
  end
  local changes = { 'used', string.format('%d', used) }
  if from_purchased > 0 then
    changes[#changes + 1] = 'purchased'
    changes[#changes + 1] = string.format('%d', purchased)
  end
  if rolled_to then
    for _, v in ipairs({ 'period_end', string.format('%d', rolled_to), 'next_ends', ends_after,
        'allowance', string.format('%d', allowance), 'period_start', string.format('%d', rolled_from) }) do
      changes[#changes + 1] = v
    end
  end
  if new_next then
    changes[#changes + 1] = 'alert_next'
    changes[#changes + 1] = string.format('%d', new_next)
  end
  if crossing then
    changes[#changes + 1] = 'alerted'
    changes[#changes + 1] = crossing[2]
  end
  if tats[1] then
    changes[#changes + 1] = 'rl'
    changes[#changes + 1] = string.format('%d', tats[1])
  end
  if tats[2] then
    changes[#changes + 1] = 'rl:' .. key_id
    changes[#changes + 1] = string.format('%d', tats[2])
  end
  redis.call('HSET', account, unpack(changes))
  -- Without Idempotency-Key the record is kept for the end of the call,
  -- now that every write of the charge is made: a charge that failed
  -- mid-way has none, so its caller's settle fences it.
  if fingerprint == '' then
    record_charge(record_key, event_id, record, record_ttl)
  end

  return { 1, remaining, from_purchased, now_ms }
end

local charges = #KEYS / 4
if charges < 1 or charges % 1 ~= 0 or #ARGV ~= 12 * charges then
  return redis.error_reply('ERR expected 4n keys and 12n arguments')
end
local clock = redis.call('TIME')
now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
now_ms = math.floor(now_us / 1000)
now_ms_text = string.format('%d', now_ms)
read_records(charges)
local replies = {}
-- A Redis error mid-way (see Batches) is raised again only once the
-- charges before it have their records.
local done, failure = pcall(function()
  for i = 1, charges do
    local k = 4 * (i - 1)
    local reply = charge(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], 12 * (i - 1))
    if reply.err then
      reply = { -9, reply.err }
    end
    replies[i] = reply
  end
end)
write_records()
if not done then
  error(failure)
end
return replies
