//! The Lua scripts that make each cluster step one atomic round trip. Redis runs a script
//! with nothing else interleaved, so a check and its reservation cannot be split by another
//! node's. Time is Redis's own (`TIME`): every node reads one clock for windows and leases.
//!
//! Key layout (`{p}` = `tollgate:k:<key id>` or `tollgate:m:<model slug>`):
//! - `{p}:w`: the 60-second sliding window, a hash: `r<second>` and `k<second>`, the requests
//!   and tokens counted in each second; `rt` and `kt`, their totals over the minute up to the
//!   second `l`.
//! - `{p}:ls`: sorted set of leases (lease → expiry in ms): requests in flight. A lease that
//!   holds a budget reservation is `<id>|<nano-dollars>|<budget hash>`, so that a lapsed one
//!   gives it back; otherwise `<id>`.
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
/// own. Every `redis.call` costs Redis a microsecond or two beyond the command itself, more
/// than most commands here, so the script calls as few as it can: each window, lease set and
/// budget is read once per batch into a table, every operation is applied to the tables, and
/// each window and budget is written back in one `HSET` at the end.
///
/// ARGV[1] is the lease TTL in ms; then one operation after another, each a tag and its
/// arguments, its keys taken in turn from KEYS. The reply is one string: each operation's
/// values joined by `,`, the operations by `;` (one string costs the client far less to
/// read than an array of numbers per operation).
///
/// `a` (admit). KEYS: key window, lease set, budget hash; model window, lease set. ARGV:
/// lease id; key rpm, tpm, max_concurrent; has model, model rpm, tpm, max_concurrent; has
/// budget, budget nanos, enforce, clamp; input tokens, output cap, choices, input cost, output
/// price, fewest clamped tokens. 0 is "no limit". Replies `{1, clamped cap or -1, key
/// requests, key tokens, key tokens' seconds to empty, spent, reserved, the second its
/// tokens were counted in, nano-dollars reserved}` or `{0, code, scope, limit, retry after,
/// need, committed, key requests, seconds to empty, key tokens, seconds to empty}`; codes: 1
/// requests, 2 tokens, 3 concurrency, 4 too large, 5 budget. Scope 1 is the key, 2 the model.
///
/// `s` (settle). KEYS: as for `a`, the budget hash of the period the request started in.
/// ARGV: the lease (as the lease sets hold it), second admitted, tokens reserved, tokens
/// used, nano-dollars used, has model, has budget, budget nanos, number of alert thresholds,
/// the thresholds. Replies `{spent, reserved, thresholds crossed now…}`; each threshold fires
/// once per period across the cluster (`HSETNX`).
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
-- A lease is `<id>` or, holding a budget reservation, `<id>|<nano-dollars>|<budget hash>`.
local function reservation(lease)
  local nanos, budget = string.match(lease, '^[^|]*|(%d+)|(.+)$')
  return tonumber(nanos), budget
end
-- Drops a lease set's expired leases once per batch; a key's give back their reservations.
local function purge(ls, key_scope)
  if cards[ls] ~= nil then return end
  local dead = redis.call('ZRANGEBYSCORE', ls, '-inf', now_ms)
  if #dead > 0 then
    for _, lease in ipairs(dead) do
      local nanos, budget = reservation(lease)
      if key_scope and nanos then
        local b = bud(budget)
        b.dres = b.dres - nanos
      end
    end
    redis.call('ZREMRANGEBYSCORE', ls, '-inf', now_ms)
  end
  cards[ls] = false
end
-- Leases in a set (counted only where a concurrency limit needs it).
local function leases(ls)
  if not cards[ls] then cards[ls] = redis.call('ZCARD', ls) end
  return cards[ls]
end

local function admit(K, A)
  local lim = {{rpm = tonumber(A[2]), tpm = tonumber(A[3]), cc = tonumber(A[4]), w = K[1], ls = K[2]}}
  if A[5] == '1' then
    lim[2] = {rpm = tonumber(A[6]), tpm = tonumber(A[7]), cc = tonumber(A[8]), w = K[4], ls = K[5]}
  end
  local has_budget, budget, enforce, clamp = A[9] == '1', tonumber(A[10]), A[11] == '1', A[12] == '1'
  local input, output, choices = tonumber(A[13]), tonumber(A[14]), tonumber(A[15])
  local input_cost, out_price, min_clamp = tonumber(A[16]), tonumber(A[17]), tonumber(A[18])
  for scope, l in ipairs(lim) do purge(l.ls, scope == 1) end
  local k = win(K[1])
  local function refuse(code, scope, limit, retry, need, committed)
    return {0, code, scope, int(limit), retry, int(need), int(committed),
      int(k.rt), until_empty(slots(K[1], 'r'), now), int(k.kt), until_empty(slots(K[1], 'k'), now)}
  end
  for scope, l in ipairs(lim) do
    if l.cc > 0 and leases(l.ls) >= l.cc then
      return refuse(3, scope, l.cc, 1, 0, 0)
    end
    if l.rpm > 0 then
      local w = wait(l.w, 'r', 1, l.rpm)
      if w >= 1 then return refuse(1, scope, l.rpm, w, 1, 0) end
    end
  end
  local b, clamped = nil, -1
  if has_budget then
    b = bud(K[3])
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
      local w = wait(l.w, 'k', tokens, l.tpm)
      if w < 0 then return refuse(4, scope, l.tpm, 0, tokens, 0) end
      if w > 0 then return refuse(2, scope, l.tpm, w, tokens, 0) end
    end
  end
  local nanos = input_cost + output * math.max(choices, 1) * out_price
  local lease, spent, reserved = A[1], 0, 0
  if b then
    lease = lease .. '|' .. int(nanos) .. '|' .. K[3]
    b.dres = b.dres + nanos
    spent, reserved = b.spent + b.dspent, b.reserved + b.dres
  end
  for _, l in ipairs(lim) do
    add(l.w, 'r', now, 1)
    add(l.w, 'k', now, tokens)
    redis.call('ZADD', l.ls, int(now_ms + ttl), lease)
    if cards[l.ls] then cards[l.ls] = cards[l.ls] + 1 end
    touched[l.ls] = true
  end
  return {1, int(clamped), int(k.rt), int(k.kt), 60, int(spent), int(reserved), int(now), int(nanos)}
end

local function settle(K, A)
  local lease, at = A[1], tonumber(A[2])
  local reserved_tokens, used_tokens, used = tonumber(A[3]), tonumber(A[4]), tonumber(A[5])
  local nanos, budget = reservation(lease)
  local function settle_in(w, ls, key_scope)
    if redis.call('ZREM', ls, lease) == 1 then
      if cards[ls] then cards[ls] = cards[ls] - 1 end
      -- A lease still held gives its reservation back; one that lapsed gave it back when
      -- it was purged.
      if key_scope and nanos then
        local b = bud(budget)
        b.dres = b.dres - nanos
      end
    end
    if at > now - 60 then
      local v = count(w, 'k', at)
      add(w, 'k', at, math.max(v - reserved_tokens, 0) + used_tokens - v)
    end
  end
  settle_in(K[1], K[2], true)
  if A[6] == '1' then settle_in(K[4], K[5], false) end
  if A[7] ~= '1' then return {0, 0} end
  local b = bud(K[3])
  b.dspent = b.dspent + used
  local spent = b.spent + b.dspent
  local out = {int(spent), int(b.reserved + b.dres)}
  local limit = tonumber(A[8])
  for i = 10, 9 + tonumber(A[9]) do
    local t = tonumber(A[i])
    if spent >= t * limit and redis.call('HSETNX', K[3], 'alert:' .. A[i], 1) == 1 then
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
    table.insert(replies, table.concat(admit({unpack(KEYS, k, k + 4)}, {unpack(ARGV, i + 1, i + 18)}), ','))
    i = i + 19
  else
    local n = 10 + tonumber(ARGV[i + 9])
    table.insert(replies, table.concat(settle({unpack(KEYS, k, k + 4)}, {unpack(ARGV, i + 1, i + n - 1)}), ','))
    i = i + n
  end
  k = k + 5
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
  if b.dres ~= 0 then table.insert(fields, 'reserved'); table.insert(fields, int(b.reserved + b.dres)) end
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
