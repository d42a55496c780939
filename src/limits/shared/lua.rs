//! The Lua scripts that make each cluster step one atomic round trip. Redis runs a script
//! with nothing else interleaved, so a check and its grant cannot be split by another
//! node's. Time is Redis's own (`TIME`): every node reads one clock for windows and leases.
//!
//! Key layout (`{p}` = `tollgate:k:<key id>` or `tollgate:m:<model slug>`):
//! - `{p}:w`: the 60-second sliding window, a hash: `r<second>` and `k<second>`, the requests
//!   and tokens counted in each second; `rt` and `kt`, their totals over the minute up to the
//!   second `l`.
//! - `{p}:ls`: sorted set of slots (slot → expiry in ms), held by nodes for requests in
//!   flight: `<node prefix><grant>#<i>`.
//! - `tollgate:k:<key id>:b:<period start ms>`: hash `spent`, `reserved` (nano-dollars),
//!   `hold:<hold id>` for each node's hold (counted in `reserved`), and `alert:<threshold>`
//!   once that threshold fired in the period.
//! - `{p}:hs` (keys only): sorted set of holds, `<hold id>|<budget hash>` → expiry in ms, so
//!   that a lapsed hold gives its nano-dollars back.

/// Shared helpers: the clock, waits.
const PRELUDE: &str = r#"
-- Integers as Redis reads them: Lua's own tostring turns large ones into exponents.
local function int(x) return string.format('%d', x) end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Seconds until `need` more fits under `limit`; -1 if it never can.
local function wait_for(slots, total, now, need, limit)
  if need > limit then return -1 end
  if total + need <= limit then return 0 end
  for age = 59, 0, -1 do
    total = total - (slots[now - age] or 0)
    if total + need <= limit then return 60 - age end
  end
  return 60
end
local function until_empty(slots, now)
  for age = 0, 59 do
    if (slots[now - age] or 0) > 0 then return 60 - age end
  end
  return 0
end
"#;

/// One batch of grants and returns, applied in order as if each were a script of its own.
/// Every `redis.call` costs Redis a microsecond or two beyond the command itself, more than
/// most commands here, so the script calls as few as it can: each window, lease set and
/// budget is read once per batch into a table, every operation is applied to the tables, and
/// each window and budget is written back in one `HSET` at the end.
///
/// ARGV[1] is the lease TTL in ms; then one operation after another, each a tag and its
/// arguments, its six keys taken in turn from KEYS: key window, key lease set, budget hash,
/// model window, model lease set, key hold set. The reply is one string: each operation's
/// values joined by `,`, the operations by `;` (one string costs the client far less to read
/// than an array of numbers per operation).
///
/// `g` (grant) gives a node a block of a (key, model) pair's limits to admit against on its
/// own (`quota.rs`). A unit is one request like the asking one: 1 request and its tokens in
/// this second's windows. ARGV: slot base name, hold id; key rpm, tpm, max_concurrent; has
/// model, model rpm, tpm, max_concurrent; has budget, budget nanos, enforce, clamp; input
/// tokens, output cap, choices, input cost, output price, fewest clamped tokens; units
/// wanted, whether a slot is needed and how many are wanted, whether nano-dollars are needed
/// and how many are wanted, expected nodes. 0 is "no limit"; 0 units: the request holds its
/// part of the windows already, and asks only for a slot or nano-dollars. No node is granted
/// more than its share of what is free, `free / (2 × nodes)`, and never less than the
/// asking request needs, or it is refused. Replies `{1, clamped cap or -1, key requests, key
/// tokens, 60, spent, reserved, second, unit nano-dollars, units, slots, nano-dollars, ms
/// into the second}` or `{0, code, scope, limit, retry after, need, committed, key
/// requests, seconds to empty, key tokens, seconds to empty}`; codes: 1 requests, 2 tokens,
/// 3 concurrency, 4 too large, 5 budget. Scope 1 is the key, 2 the model.
///
/// Slots are members `<slot base>#<i>` of the lease sets of the scopes with a concurrency
/// limit. A node's budget hold is field `hold:<hold id>` of the budget hash, counted in its
/// `reserved`, with member `<hold id>|<budget hash>` in the key's hold set: a hold that
/// lapses is given back.
///
/// `r` (return) gives back what a node holds and no longer needs, and adds what it spent.
/// ARGV: hold id, has model, has budget, budget nanos, spent, nano-dollars leaving the hold
/// (spent or given back), release the hold (1/0), number of slots, the slots, number of
/// corrections, each (second, requests, tokens) to take off the windows, number of alert
/// thresholds, the thresholds. Replies `{spent, reserved, thresholds crossed now…}`; each
/// threshold fires once per period across the cluster (`HSETNX`).
const STEP_BODY: &str = r#"
local now, now_ms = clock()
local ttl = tonumber(ARGV[1])
local wins, cards, buds, touched = {}, {}, {}, {}

-- A scope's window (`p:w`): each second's requests and tokens (`r<second>`, `k<second>`),
-- their totals over the last minute (`rt`, `kt`) and the second those were brought up to
-- (`l`). A read is one HMGET, plus two when the clock has moved on since: the seconds that
-- left the minute are taken off the totals and deleted.
local function win(key)
  local w = wins[key]
  if w then return w end
  local v = redis.call('HMGET', key, 'rt', 'kt', 'l', 'r' .. int(now), 'k' .. int(now))
  local rt, kt, last = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  if not rt or not kt or not last or now - last >= 60 then
    -- New, idle for a minute, or written without totals: summed from its seconds.
    rt, kt = 0, 0
    local raw, gone = redis.call('HGETALL', key), {}
    for i = 1, #raw, 2 do
      local kind, sec = string.match(raw[i], '^([rk])(%d+)$')
      if kind then
        local n = tonumber(raw[i + 1])
        if tonumber(sec) <= now - 60 then
          table.insert(gone, raw[i])
        elseif kind == 'r' then
          rt = rt + n
        else
          kt = kt + n
        end
      end
    end
    if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  elseif last < now then
    local gone = {}
    for sec = last - 59, now - 60 do
      table.insert(gone, 'r' .. int(sec))
      table.insert(gone, 'k' .. int(sec))
    end
    local counts = redis.call('HMGET', key, unpack(gone))
    for i = 1, #gone, 2 do
      rt = rt - (tonumber(counts[i]) or 0)
      kt = kt - (tonumber(counts[i + 1]) or 0)
    end
    redis.call('HDEL', key, unpack(gone))
  end
  w = {rt = rt, kt = kt, r = {[now] = tonumber(v[4]) or 0}, k = {[now] = tonumber(v[5]) or 0}, dirty = {}}
  wins[key] = w
  return w
end
-- One second's count (`kind` 'r' or 'k'), with what this batch changed.
local function count(key, kind, sec)
  local w = win(key)
  if w[kind][sec] == nil then
    w[kind][sec] = tonumber(redis.call('HGET', key, kind .. int(sec))) or 0
  end
  return w[kind][sec]
end
-- Every second of one kind in the window, for a refusal's retry-after.
local function slots(key, kind)
  local w = win(key)
  local all = {}
  local raw = redis.call('HGETALL', key)
  for i = 1, #raw, 2 do
    local k, sec = string.match(raw[i], '^([rk])(%d+)$')
    if k == kind and tonumber(sec) > now - 60 then all[tonumber(sec)] = tonumber(raw[i + 1]) end
  end
  for sec, n in pairs(w[kind]) do all[sec] = n end
  return all
end
local function add(key, kind, sec, n)
  if n == 0 then return end
  local w = win(key)
  local v = count(key, kind, sec) + n
  w[kind][sec] = v
  w.dirty[kind .. int(sec)] = v
  w[kind .. 't'] = w[kind .. 't'] + n
end
-- Seconds until `need` more fits under `limit`; -1 if it never can.
local function wait(key, kind, need, limit)
  if need > limit then return -1 end
  local total = win(key)[kind .. 't']
  if total + need <= limit then return 0 end
  return wait_for(slots(key, kind), total, now, need, limit)
end
local function bud(h)
  local b = buds[h]
  if not b then
    local v = redis.call('HMGET', h, 'spent', 'reserved')
    b = {spent = tonumber(v[1] or 0), reserved = tonumber(v[2] or 0), dspent = 0, dres = 0}
    buds[h] = b
  end
  return b
end
-- Drops a lease set's expired slots, once per batch.
local function purge(ls)
  if cards[ls] ~= nil then return end
  redis.call('ZREMRANGEBYSCORE', ls, '-inf', now_ms)
  cards[ls] = false
end
-- Drops a hold set's lapsed holds, once per batch: each gives its nano-dollars back.
local function purge_holds(hs)
  if cards[hs] ~= nil then return end
  local dead = redis.call('ZRANGEBYSCORE', hs, '-inf', now_ms)
  for _, m in ipairs(dead) do
    local id, h = string.match(m, '^([^|]*)|(.+)$')
    if id then
      local held = tonumber(redis.call('HGET', h, 'hold:' .. id)) or 0
      local b = bud(h)
      b.dres = b.dres - held
      redis.call('HDEL', h, 'hold:' .. id)
    end
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', hs, '-inf', now_ms) end
  cards[hs] = false
end
-- Leases in a set (counted only where a concurrency limit needs it).
local function leases(ls)
  if not cards[ls] then cards[ls] = redis.call('ZCARD', ls) end
  return cards[ls]
end
-- What one node may take of `free`: its share, and at least 1.
local function share(free, nodes)
  return math.max(1, math.floor(free / (2 * nodes)))
end

local function grant(K, A)
  local lim = {{rpm = tonumber(A[3]), tpm = tonumber(A[4]), cc = tonumber(A[5]), w = K[1], ls = K[2]}}
  if A[6] == '1' then
    lim[2] = {rpm = tonumber(A[7]), tpm = tonumber(A[8]), cc = tonumber(A[9]), w = K[4], ls = K[5]}
  end
  local has_budget, budget, enforce, clamp = A[10] == '1', tonumber(A[11]), A[12] == '1', A[13] == '1'
  local input, output, choices = tonumber(A[14]), tonumber(A[15]), math.max(tonumber(A[16]), 1)
  local input_cost, out_price, min_clamp = tonumber(A[17]), tonumber(A[18]), tonumber(A[19])
  local units, need_slot, want_slots = tonumber(A[20]), A[21] == '1', tonumber(A[22])
  local need_nanos, want_nanos, nodes = A[23] == '1', tonumber(A[24]), tonumber(A[25])
  -- No units asked: the request holds what it needs of the windows already.
  local need_rate = units > 0
  for _, l in ipairs(lim) do purge(l.ls) end
  purge_holds(K[6])
  local k = win(K[1])
  local function refuse(code, scope, limit, retry, need, committed)
    return {0, code, scope, int(limit), retry, int(need), int(committed),
      int(k.rt), until_empty(slots(K[1], 'r'), now), int(k.kt), until_empty(slots(K[1], 'k'), now)}
  end
  local new_slots = 0
  if need_slot then new_slots = math.max(want_slots, 1) end
  for scope, l in ipairs(lim) do
    if need_slot and l.cc > 0 then
      local free = l.cc - leases(l.ls)
      if free < 1 then return refuse(3, scope, l.cc, 1, 0, 0) end
      new_slots = math.min(new_slots, share(free, nodes))
    end
    if need_rate and l.rpm > 0 then
      local free = l.rpm - win(l.w).rt
      if free < 1 then
        local w = wait(l.w, 'r', 1, l.rpm)
        return refuse(1, scope, l.rpm, math.max(w, 1), 1, 0)
      end
      units = math.min(units, share(free, nodes))
    end
  end
  local b, clamped, new_nanos = nil, -1, 0
  local spent, reserved = 0, 0
  if has_budget then
    b = bud(K[3])
    spent, reserved = b.spent + b.dspent, math.max(b.reserved + b.dres, 0)
  end
  if has_budget and need_nanos then
    local committed = spent + reserved
    local available = math.max(budget - committed, 0)
    local worst = input_cost + output * choices * out_price
    if enforce and worst > available then
      local affordable = output
      if out_price > 0 then
        affordable = math.floor(math.max(available - input_cost, 0) / (out_price * choices))
      end
      if clamp and input_cost < available and affordable >= math.min(min_clamp, output) then
        output = math.min(affordable, output)
        clamped = output
        units = math.min(units, 1)
      else
        return refuse(5, 1, budget, 0, worst, committed)
      end
    end
    worst = input_cost + output * choices * out_price
    new_nanos = math.max(worst, want_nanos)
    if enforce then
      new_nanos = math.min(new_nanos, math.max(worst, math.floor(available / (2 * nodes))))
    end
  end
  local tokens = input + output * choices
  for scope, l in ipairs(lim) do
    if need_rate and l.tpm > 0 then
      local w = wait(l.w, 'k', tokens, l.tpm)
      if w < 0 then return refuse(4, scope, l.tpm, 0, tokens, 0) end
      if w > 0 then return refuse(2, scope, l.tpm, w, tokens, 0) end
      if tokens > 0 then
        units = math.min(units, share(math.floor((l.tpm - win(l.w).kt) / tokens), nodes))
      end
    end
  end
  if need_rate then units = math.max(units, 1) end
  for _, l in ipairs(lim) do
    add(l.w, 'r', now, units)
    add(l.w, 'k', now, units * tokens)
    if need_slot and l.cc > 0 then
      for i = 1, new_slots do
        redis.call('ZADD', l.ls, int(now_ms + ttl), A[1] .. '#' .. int(i))
      end
      if cards[l.ls] then cards[l.ls] = cards[l.ls] + new_slots end
      touched[l.ls] = true
    end
  end
  if not need_slot then new_slots = 0 end
  if new_nanos > 0 then
    b.dres = b.dres + new_nanos
    redis.call('HINCRBY', K[3], 'hold:' .. A[2], int(new_nanos))
    redis.call('ZADD', K[6], int(now_ms + ttl), A[2] .. '|' .. K[3])
    touched[K[6]] = true
    reserved = reserved + new_nanos
  end
  local unit = input_cost + output * choices * out_price
  return {1, int(clamped), int(k.rt), int(k.kt), 60, int(spent), int(reserved), int(now),
    int(unit), int(units), int(new_slots), int(new_nanos), int(now_ms % 1000)}
end

local function give_back(K, A)
  local hold, has_model, has_budget = A[1], A[2] == '1', A[3] == '1'
  local spent_now, leaving, release = tonumber(A[5]), tonumber(A[6]), A[7] == '1'
  local i = 8
  for j = i + 1, i + tonumber(A[i]) do
    if redis.call('ZREM', K[2], A[j]) == 1 and cards[K[2]] then cards[K[2]] = cards[K[2]] - 1 end
    if has_model and redis.call('ZREM', K[5], A[j]) == 1 and cards[K[5]] then
      cards[K[5]] = cards[K[5]] - 1
    end
  end
  i = i + tonumber(A[i]) + 1
  local n = tonumber(A[i])
  for c = 1, n do
    local sec, dr, dt = tonumber(A[i + 1]), tonumber(A[i + 2]), tonumber(A[i + 3])
    if sec > now - 60 then
      local ws = {K[1]}
      if has_model then ws[2] = K[4] end
      for _, w in ipairs(ws) do
        add(w, 'r', sec, -math.min(dr, count(w, 'r', sec)))
        add(w, 'k', sec, -math.min(dt, count(w, 'k', sec)))
      end
    end
    i = i + 3
  end
  i = i + 1
  if not has_budget then return {0, 0} end
  local b = bud(K[3])
  b.dspent = b.dspent + spent_now
  -- A hold that lapsed was given back whole when it was purged.
  local member = hold .. '|' .. K[3]
  if redis.call('ZSCORE', K[6], member) then
    local field = 'hold:' .. hold
    local held = tonumber(redis.call('HGET', K[3], field)) or 0
    local out = math.min(leaving, held)
    if release then out = held end
    b.dres = b.dres - out
    if release or out >= held then
      redis.call('HDEL', K[3], field)
      redis.call('ZREM', K[6], member)
    elseif out > 0 then
      redis.call('HINCRBY', K[3], field, int(-out))
    end
  end
  local spent = b.spent + b.dspent
  local out = {int(spent), int(math.max(b.reserved + b.dres, 0))}
  local limit = tonumber(A[4])
  for j = i + 1, i + tonumber(A[i]) do
    local t = tonumber(A[j])
    if spent >= t * limit and redis.call('HSETNX', K[3], 'alert:' .. A[j], 1) == 1 then
      table.insert(out, A[j])
    end
  end
  return out
end

local replies = {}
local i, k = 2, 1
while i <= #ARGV do
  local tag = ARGV[i]
  if tag == 'g' then
    table.insert(replies, table.concat(grant({unpack(KEYS, k, k + 5)}, {unpack(ARGV, i + 1, i + 25)}), ','))
    i = i + 26
  else
    -- A return's length is in its counts: slots, then corrections, then thresholds.
    local j = i + 8
    j = j + tonumber(ARGV[j]) + 1
    j = j + 3 * tonumber(ARGV[j]) + 1
    j = j + tonumber(ARGV[j])
    table.insert(replies, table.concat(give_back({unpack(KEYS, k, k + 5)}, {unpack(ARGV, i + 1, j)}), ','))
    i = j + 1
  end
  k = k + 6
end

for key, w in pairs(wins) do
  local fields = {'rt', int(w.rt), 'kt', int(w.kt), 'l', int(now)}
  for field, v in pairs(w.dirty) do
    table.insert(fields, field)
    table.insert(fields, int(v))
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIRE', key, 61000)
end
for h, b in pairs(buds) do
  local fields = {}
  if b.dres ~= 0 then table.insert(fields, 'reserved'); table.insert(fields, int(math.max(b.reserved + b.dres, 0))) end
  if b.dspent ~= 0 then table.insert(fields, 'spent'); table.insert(fields, int(b.spent + b.dspent)) end
  if #fields > 0 then redis.call('HSET', h, unpack(fields)) end
end
for key in pairs(touched) do redis.call('PEXPIRE', key, ttl * 3) end
return table.concat(replies, ';')
"#;

/// KEYS: lease sets this node may have leases in. ARGV: this node's lease
/// prefix, the new expiry (ms from now), the TTL. Extends this node's leases only.
const RENEW_BODY: &str = r#"
local _, now_ms = clock()
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
local renewed = 0
for _, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'zset' then
    for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      if string.sub(id, 1, #prefix) == prefix then
        redis.call('ZADD', key, 'XX', int(now_ms + ttl), id)
        renewed = renewed + 1
      end
    end
  end
  redis.call('PEXPIRE', key, ttl * 3)
end
return renewed
"#;

/// KEYS: a budget hash. ARGV: spent, then thresholds already fired. Seeds a period that
/// Redis holds nothing of; a period already there is left as it is.
const SEED_BODY: &str = r#"
if redis.call('HSETNX', KEYS[1], 'spent', ARGV[1]) == 0 then return 0 end
for i = 2, #ARGV do redis.call('HSET', KEYS[1], 'alert:' .. ARGV[i], 1) end
return 1
"#;

pub fn step() -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{STEP_BODY}"))
}

pub fn renew() -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{RENEW_BODY}"))
}

pub fn seed() -> redis::Script {
    redis::Script::new(SEED_BODY)
}
