//! The Lua scripts that make each cluster step one atomic round trip. Redis runs a script
//! with nothing else interleaved, so a check and its reservation cannot be split by another
//! node's. Time is Redis's own (`TIME`): every node reads one clock for windows and leases.
//!
//! Key layout (`{p}` = `tollgate:k:<key id>` or `tollgate:m:<model slug>`):
//! - `{p}:rq`, `{p}:tk`: hashes of second → requests, tokens: a 60-second sliding window.
//! - `{p}:ls`: sorted set of leases (request id → expiry in ms): requests in flight.
//! - `{p}:held` (keys only): lease → `"<nanos>|<budget hash>"`, the reservation it holds.
//! - `tollgate:k:<key id>:b:<period start ms>`: hash `spent`, `reserved` (nano-dollars) and
//!   `alert:<threshold>` once that threshold fired in the period.

/// Shared helpers: window sums, waits, lease purges.
const PRELUDE: &str = r#"
-- Integers as Redis reads them: Lua's own tostring turns large ones into exponents.
local function int(x) return string.format('%d', x) end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function window(key, now)
  local raw = redis.call('HGETALL', key)
  local slots, total = {}, 0
  for i = 1, #raw, 2 do
    local s, n = tonumber(raw[i]), tonumber(raw[i + 1])
    if s <= now - 60 then
      redis.call('HDEL', key, raw[i])
    else
      slots[s] = (slots[s] or 0) + n
      total = total + n
    end
  end
  return slots, total
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
-- Drops expired leases; a key's also give back the budget reservations they held.
local function purge(leases, held, now_ms)
  local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms)
  if #dead == 0 then return end
  for _, id in ipairs(dead) do
    if held then
      local v = redis.call('HGET', held, id)
      if v then
        local nanos, budget = string.match(v, '^(%d+)|(.+)$')
        if nanos then redis.call('HINCRBY', budget, 'reserved', '-' .. nanos) end
        redis.call('HDEL', held, id)
      end
    end
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
end
"#;

/// KEYS: key rq, tk, ls, held, budget hash; model rq, tk, ls.
/// ARGV: lease, ttl ms; key rpm, tpm, max_concurrent; has model, model rpm, tpm,
/// max_concurrent; has budget, budget nanos, enforce, clamp; input tokens, output cap,
/// choices, input cost, output price, fewest clamped tokens. 0 is "no limit".
///
/// Returns `{1, clamped cap or -1, key requests, key tokens, key tokens' seconds to empty,
/// spent, reserved}` or `{0, code, scope, limit, retry after, need, committed, key
/// requests, seconds to empty, key tokens, seconds to empty}`; codes: 1 requests, 2 tokens,
/// 3 concurrency, 4 too large, 5 budget. Scope 1 is the key, 2 the model.
const ADMIT_BODY: &str = r#"
local now, now_ms = clock()
local lease, ttl = ARGV[1], tonumber(ARGV[2])
local lim = {
  {rpm = tonumber(ARGV[3]), tpm = tonumber(ARGV[4]), cc = tonumber(ARGV[5]), rq = KEYS[1], tk = KEYS[2], ls = KEYS[3]},
}
if ARGV[6] == '1' then
  lim[2] = {rpm = tonumber(ARGV[7]), tpm = tonumber(ARGV[8]), cc = tonumber(ARGV[9]), rq = KEYS[6], tk = KEYS[7], ls = KEYS[8]}
end
local has_budget, budget, enforce, clamp = ARGV[10] == '1', tonumber(ARGV[11]), ARGV[12] == '1', ARGV[13] == '1'
local input, output, choices = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
local input_cost, out_price, min_clamp = tonumber(ARGV[17]), tonumber(ARGV[18]), tonumber(ARGV[19])

purge(KEYS[3], KEYS[4], now_ms)
if lim[2] then purge(lim[2].ls, nil, now_ms) end
for _, l in ipairs(lim) do
  l.rslots, l.rtotal = window(l.rq, now)
  l.tslots, l.ttotal = window(l.tk, now)
end
local k = lim[1]
local function refuse(code, scope, limit, retry, need, committed)
  return {0, code, scope, limit, retry, need, committed,
    k.rtotal, until_empty(k.rslots, now), k.ttotal, until_empty(k.tslots, now)}
end
for scope, l in ipairs(lim) do
  if l.cc > 0 and redis.call('ZCARD', l.ls) >= l.cc then
    return refuse(3, scope, l.cc, 1, 0, 0)
  end
  if l.rpm > 0 then
    local w = wait_for(l.rslots, l.rtotal, now, 1, l.rpm)
    if w >= 1 then return refuse(1, scope, l.rpm, w, 1, 0) end
  end
end
local spent, reserved, clamped = 0, 0, -1
if has_budget then
  local b = redis.call('HMGET', KEYS[5], 'spent', 'reserved')
  spent, reserved = tonumber(b[1] or 0), tonumber(b[2] or 0)
  if reserved < 0 then reserved = 0 end
  local committed = spent + reserved
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
    local w = wait_for(l.tslots, l.ttotal, now, tokens, l.tpm)
    if w < 0 then return refuse(4, scope, l.tpm, 0, tokens, 0) end
    if w > 0 then return refuse(2, scope, l.tpm, w, tokens, 0) end
  end
end
local nanos = input_cost + output * math.max(choices, 1) * out_price
for _, l in ipairs(lim) do
  redis.call('HINCRBY', l.rq, int(now), 1)
  redis.call('HINCRBY', l.tk, int(now), int(tokens))
  redis.call('PEXPIRE', l.rq, 61000)
  redis.call('PEXPIRE', l.tk, 61000)
  redis.call('ZADD', l.ls, int(now_ms + ttl), lease)
  redis.call('PEXPIRE', l.ls, ttl * 3)
end
if has_budget then
  redis.call('HSET', KEYS[4], lease, int(nanos) .. '|' .. KEYS[5])
  redis.call('PEXPIRE', KEYS[4], ttl * 3)
  reserved = redis.call('HINCRBY', KEYS[5], 'reserved', int(nanos))
end
return {1, clamped, k.rtotal + 1, k.ttotal + tokens, 60, spent, reserved}
"#;

/// KEYS: key tk, ls, held, budget hash of the period the request started in; model tk, ls.
/// ARGV: lease, second admitted, tokens reserved, tokens used, nano-dollars used, has model,
/// has budget, budget nanos, then the alert thresholds.
/// Returns `{spent, reserved, thresholds crossed now…}`; each threshold fires once per
/// period across the cluster (`HSETNX`).
const SETTLE_BODY: &str = r#"
local now = clock()
local lease, at = ARGV[1], tonumber(ARGV[2])
local reserved_tokens, used_tokens, used = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local held = redis.call('HGET', KEYS[3], lease)
if held then
  local nanos, budget = string.match(held, '^(%d+)|(.+)$')
  if nanos then redis.call('HINCRBY', budget, 'reserved', '-' .. nanos) end
  redis.call('HDEL', KEYS[3], lease)
end
local function settle_tokens(tk)
  if at > now - 60 then
    local v = tonumber(redis.call('HGET', tk, ARGV[2]) or 0)
    redis.call('HSET', tk, ARGV[2], int(math.max(v - reserved_tokens, 0) + used_tokens))
  end
end
redis.call('ZREM', KEYS[2], lease)
settle_tokens(KEYS[1])
if ARGV[6] == '1' then
  redis.call('ZREM', KEYS[6], lease)
  settle_tokens(KEYS[5])
end
local out = {0, 0}
if ARGV[7] == '1' then
  local spent = redis.call('HINCRBY', KEYS[4], 'spent', ARGV[5])
  local reserved = tonumber(redis.call('HGET', KEYS[4], 'reserved') or 0)
  out = {spent, reserved}
  local budget = tonumber(ARGV[8])
  for i = 9, #ARGV do
    local t = tonumber(ARGV[i])
    if spent >= t * budget and redis.call('HSETNX', KEYS[4], 'alert:' .. ARGV[i], 1) == 1 then
      table.insert(out, ARGV[i])
    end
  end
end
return out
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

pub fn admit() -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{ADMIT_BODY}"))
}

pub fn settle() -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{SETTLE_BODY}"))
}

pub fn renew() -> redis::Script {
    redis::Script::new(&format!("{PRELUDE}{RENEW_BODY}"))
}

pub fn seed() -> redis::Script {
    redis::Script::new(SEED_BODY)
}
