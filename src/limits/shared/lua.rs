//! The Lua scripts that make each cluster step one atomic round trip. Redis runs a script
//! with nothing else interleaved, so a check and its reservation cannot be split by another
//! node's. Time is Redis's own (`TIME`): every node reads one clock for windows and leases.
//!
//! Key layout (`{p}` = `tollgate:k:<key id>` or `tollgate:m:<model slug>`):
//! - `{p}:rq`, `{p}:tk`: hashes of second → requests, tokens: a 60-second sliding window,
//!   with `t`, the window's total, and `l`, the second that total was brought up to.
//! - `{p}:ls`: sorted set of leases (request id → expiry in ms): requests in flight.
//! - `{p}:held` (keys only): lease → `"<nanos>|<budget hash>"`, the reservation it holds.
//! - `tollgate:k:<key id>:b:<period start ms>`: hash `spent`, `reserved` (nano-dollars) and
//!   `alert:<threshold>` once that threshold fired in the period.

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

/// One batch of admissions and settlements, applied in order as if each were a script of its
/// own: reads (window sums, lease counts, budget totals) are made once per batch and kept in
/// tables, and the writes they add up to are made once at the end.
///
/// ARGV[1] is the lease TTL in ms; then one operation after another, each a tag and its
/// arguments, its keys taken in turn from KEYS. The reply is one string: each operation's
/// values joined by `,`, the operations by `;` (one string costs the client far less to
/// read than an array of numbers per operation).
///
/// `a` (admit). KEYS: key rq, tk, ls, held, budget hash; model rq, tk, ls. ARGV: lease; key
/// rpm, tpm, max_concurrent; has model, model rpm, tpm, max_concurrent; has budget, budget
/// nanos, enforce, clamp; input tokens, output cap, choices, input cost, output price, fewest
/// clamped tokens. 0 is "no limit". Replies `{1, clamped cap or -1, key requests, key
/// tokens, key tokens' seconds to empty, spent, reserved, the second its tokens were counted
/// in}` or `{0, code, scope, limit, retry
/// after, need, committed, key requests, seconds to empty, key tokens, seconds to empty}`;
/// codes: 1 requests, 2 tokens, 3 concurrency, 4 too large, 5 budget. Scope 1 is the key, 2
/// the model.
///
/// `s` (settle). KEYS: key tk, ls, held, budget hash of the period the request started in;
/// model tk, ls. ARGV: lease, second admitted, tokens reserved, tokens used, nano-dollars
/// used, has model, has budget, budget nanos, number of alert thresholds, the thresholds.
/// Replies `{spent, reserved, thresholds crossed now…}`; each threshold fires once per
/// period across the cluster (`HSETNX`).
const STEP_BODY: &str = r#"
local now, now_ms = clock()
local ttl = tonumber(ARGV[1])
local wins, adds, cards, buds, touched = {}, {}, {}, {}, {}

-- A window (`p:rq`, `p:tk`) keeps its own total: field `t` is the sum of the seconds not
-- older than a minute at second `l`, so that a read costs one HMGET, plus one field more
-- each time the clock moves on a second. The seconds themselves are only all read to tell a
-- refused request when it may retry.
local function win(key)
  local w = wins[key]
  if w then return w end
  local v = redis.call('HMGET', key, 't', 'l')
  local total, last = tonumber(v[1]), tonumber(v[2])
  if not total or not last or now - last >= 60 then
    -- New, idle for a minute, or written without a total: summed from its seconds.
    total = 0
    local raw = redis.call('HGETALL', key)
    for i = 1, #raw, 2 do
      local sec = tonumber(raw[i])
      if sec then
        if sec <= now - 60 then
          redis.call('HDEL', key, raw[i])
        else
          total = total + tonumber(raw[i + 1])
        end
      end
    end
  elseif last < now then
    local gone = {}
    for sec = last - 59, now - 60 do table.insert(gone, int(sec)) end
    local counts = redis.call('HMGET', key, unpack(gone))
    for i = 1, #gone do total = total - (tonumber(counts[i]) or 0) end
    redis.call('HDEL', key, unpack(gone))
  end
  w = {total = total, known = {}}
  wins[key] = w
  return w
end
-- One second's count, with what this batch added to it.
local function count(key, sec)
  local w = win(key)
  if w.known[sec] == nil then
    local a = adds[key]
    w.known[sec] = (tonumber(redis.call('HGET', key, int(sec))) or 0) + (a and a[sec] or 0)
  end
  return w.known[sec]
end
-- Every second of the window (for a refusal's retry-after).
local function slots(key)
  local w = win(key)
  if w.all then return w.all end
  local all = {}
  local raw = redis.call('HGETALL', key)
  for i = 1, #raw, 2 do
    local sec = tonumber(raw[i])
    if sec and sec > now - 60 then all[sec] = tonumber(raw[i + 1]) end
  end
  for sec, n in pairs(adds[key] or {}) do all[sec] = (all[sec] or 0) + n end
  w.all = all
  return all
end
local function add(key, sec, n)
  if n == 0 then return end
  local w = win(key)
  w.total = w.total + n
  if w.known[sec] ~= nil then w.known[sec] = w.known[sec] + n end
  if w.all then w.all[sec] = (w.all[sec] or 0) + n end
  local a = adds[key]
  if not a then a = {}; adds[key] = a end
  a[sec] = (a[sec] or 0) + n
end
-- Seconds until `need` more fits under `limit` in the window at `key`; -1 if it never can.
local function wait(key, need, limit)
  if need > limit then return -1 end
  local w = win(key)
  if w.total + need <= limit then return 0 end
  return wait_for(slots(key), w.total, now, need, limit)
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
-- Leases in a set, once its expired ones are dropped; a key's give back the budget
-- reservations they held.
local function leases(ls, held)
  local c = cards[ls]
  if c then return c end
  local dead = redis.call('ZRANGEBYSCORE', ls, '-inf', now_ms)
  if #dead > 0 then
    for _, id in ipairs(dead) do
      if held then
        local v = redis.call('HGET', held, id)
        if v then
          local nanos, budget = string.match(v, '^(%d+)|(.+)$')
          if nanos then
            local b = bud(budget)
            b.dres = b.dres - tonumber(nanos)
          end
          redis.call('HDEL', held, id)
        end
      end
    end
    redis.call('ZREMRANGEBYSCORE', ls, '-inf', now_ms)
  end
  c = redis.call('ZCARD', ls)
  cards[ls] = c
  return c
end

local function admit(K, A)
  local lim = {
    {rpm = tonumber(A[2]), tpm = tonumber(A[3]), cc = tonumber(A[4]), rq = K[1], tk = K[2], ls = K[3], held = K[4]},
  }
  if A[5] == '1' then
    lim[2] = {rpm = tonumber(A[6]), tpm = tonumber(A[7]), cc = tonumber(A[8]), rq = K[6], tk = K[7], ls = K[8]}
  end
  local has_budget, budget, enforce, clamp = A[9] == '1', tonumber(A[10]), A[11] == '1', A[12] == '1'
  local input, output, choices = tonumber(A[13]), tonumber(A[14]), tonumber(A[15])
  local input_cost, out_price, min_clamp = tonumber(A[16]), tonumber(A[17]), tonumber(A[18])
  for _, l in ipairs(lim) do
    l.n = leases(l.ls, l.held)
    l.r = win(l.rq)
    l.t = win(l.tk)
  end
  local k = lim[1]
  local function refuse(code, scope, limit, retry, need, committed)
    return {0, code, scope, int(limit), retry, int(need), int(committed),
      int(k.r.total), until_empty(slots(k.rq), now), int(k.t.total), until_empty(slots(k.tk), now)}
  end
  for scope, l in ipairs(lim) do
    if l.cc > 0 and l.n >= l.cc then
      return refuse(3, scope, l.cc, 1, 0, 0)
    end
    if l.rpm > 0 then
      local w = wait(l.rq, 1, l.rpm)
      if w >= 1 then return refuse(1, scope, l.rpm, w, 1, 0) end
    end
  end
  local b, clamped = nil, -1
  if has_budget then
    b = bud(K[5])
    local reserved = math.max(b.reserved + b.dres, 0)
    local committed = b.spent + b.dspent + reserved
    local available = math.max(budget - committed, 0)
    local worst = input_cost + output * choices * out_price
    if enforce and worst > available then
      local affordable = output
      if out_price > 0 then
        affordable = math.floor(math.max(available - input_cost, 0) / (out_price * math.max(choices, 1)))
      end
      if clamp and input_cost < available and affordable >= math.min(min_clamp, output) then
        output = math.min(affordable, output)
        clamped = output
      else
        return refuse(5, 1, budget, 0, worst, committed)
      end
    end
  end
  local tokens = input + output * math.max(choices, 1)
  for scope, l in ipairs(lim) do
    if l.tpm > 0 then
      local w = wait(l.tk, tokens, l.tpm)
      if w < 0 then return refuse(4, scope, l.tpm, 0, tokens, 0) end
      if w > 0 then return refuse(2, scope, l.tpm, w, tokens, 0) end
    end
  end
  local nanos = input_cost + output * math.max(choices, 1) * out_price
  for _, l in ipairs(lim) do
    add(l.rq, now, 1)
    add(l.tk, now, tokens)
    redis.call('ZADD', l.ls, int(now_ms + ttl), A[1])
    cards[l.ls] = l.n + 1
    touched[l.ls] = true
  end
  local spent, reserved = 0, 0
  if b then
    redis.call('HSET', K[4], A[1], int(nanos) .. '|' .. K[5])
    touched[K[4]] = true
    b.dres = b.dres + nanos
    spent, reserved = b.spent + b.dspent, b.reserved + b.dres
  end
  return {1, int(clamped), int(k.r.total), int(k.t.total), 60, int(spent), int(reserved), int(now)}
end

local function settle(K, A)
  local lease, at = A[1], tonumber(A[2])
  local reserved_tokens, used_tokens, used = tonumber(A[3]), tonumber(A[4]), tonumber(A[5])
  local held = redis.call('HGET', K[3], lease)
  if held then
    local nanos, budget = string.match(held, '^(%d+)|(.+)$')
    if nanos then
      local b = bud(budget)
      b.dres = b.dres - tonumber(nanos)
    end
    redis.call('HDEL', K[3], lease)
  end
  local function settle_in(ls, tk)
    if redis.call('ZREM', ls, lease) == 1 and cards[ls] then cards[ls] = cards[ls] - 1 end
    if at > now - 60 then
      local v = count(tk, at)
      add(tk, at, math.max(v - reserved_tokens, 0) + used_tokens - v)
    end
  end
  settle_in(K[2], K[1])
  if A[6] == '1' then settle_in(K[6], K[5]) end
  if A[7] ~= '1' then return {0, 0} end
  local b = bud(K[4])
  b.dspent = b.dspent + used
  local spent = b.spent + b.dspent
  local out = {int(spent), int(b.reserved + b.dres)}
  local budget = tonumber(A[8])
  for i = 10, 9 + tonumber(A[9]) do
    local t = tonumber(A[i])
    if spent >= t * budget and redis.call('HSETNX', K[4], 'alert:' .. A[i], 1) == 1 then
      table.insert(out, A[i])
    end
  end
  return out
end

local replies = {}
local i, k = 2, 1
while i <= #ARGV do
  local tag = ARGV[i]
  if tag == 'a' then
    table.insert(replies, table.concat(admit({unpack(KEYS, k, k + 7)}, {unpack(ARGV, i + 1, i + 18)}), ','))
    i, k = i + 19, k + 8
  else
    local n = 10 + tonumber(ARGV[i + 9])
    table.insert(replies, table.concat(settle({unpack(KEYS, k, k + 5)}, {unpack(ARGV, i + 1, i + n - 1)}), ','))
    i, k = i + n, k + 6
  end
end

for key, a in pairs(adds) do
  for sec, n in pairs(a) do
    if n ~= 0 then redis.call('HINCRBY', key, int(sec), int(n)) end
  end
end
for key, w in pairs(wins) do
  redis.call('HSET', key, 't', int(w.total), 'l', int(now))
  redis.call('PEXPIRE', key, 61000)
end
for h, b in pairs(buds) do
  if b.dres ~= 0 then redis.call('HINCRBY', h, 'reserved', int(b.dres)) end
  if b.dspent ~= 0 then redis.call('HINCRBY', h, 'spent', int(b.dspent)) end
end
for key in pairs(touched) do redis.call('PEXPIRE', key, ttl * 3) end
return table.concat(replies, ';')
"#;

/// KEYS: lease sets and held hashes this node may have leases in. ARGV: this node's lease
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
