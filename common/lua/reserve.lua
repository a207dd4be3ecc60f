-- reserve.lua - the admission of one order, atomically and in one round trip.
--
-- KEYS[1] {sku:ID}:sale        hash: stock, limit, pay_timeout_s, supplied
-- KEYS[2] {sku:ID}:users       hash: user_id -> units the user holds (reserved or ordered)
-- KEYS[3] {sku:ID}:resv        hash: order_id -> "r:user_id:qty:ts_ms:idem_key_or_empty"
-- KEYS[4] {sku:ID}:idem:USER:KEY  string "state:order_id", or "" when no Idempotency-Key
-- ARGV    user_id, qty, order_id (fresh, unique), ts_ms, idem_ttl_s
--
-- Returns {outcome, order_id, stock_left, pay_timeout_s}:
--   "ok"           reserved: stock decremented, user's count raised, reservation recorded
--   "dup"          the idempotency key was seen: order_id and its state ("pending", "accepted",
--                  "sold_out", "limit_exceeded") of the first attempt; nothing changes
--   "unknown_sku", "sold_out", "limit_exceeded": nothing changes (sold_out and limit_exceeded
--                  are remembered under the idempotency key so a retry gets the same answer)
local sale, users, resv, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local user, qty, order_id, ts, idem_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]

if idem ~= '' then
    local prev = redis.call('GET', idem)
    if prev then
        local sep = string.find(prev, ':', 1, true)
        return {'dup', string.sub(prev, sep + 1), string.sub(prev, 1, sep - 1), 0}
    end
end

local s = redis.call('HMGET', sale, 'stock', 'limit', 'pay_timeout_s')
if not s[1] then
    return {'unknown_sku', '', 0, 0}
end
local stock, limit, pay_timeout = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])

local held = 0
if limit > 0 then
    held = tonumber(redis.call('HGET', users, user) or '0')
end
if limit > 0 and held + qty > limit then
    if idem ~= '' then redis.call('SET', idem, 'limit_exceeded:', 'EX', idem_ttl) end
    return {'limit_exceeded', '', stock, pay_timeout}
end
if stock < qty then
    if idem ~= '' then redis.call('SET', idem, 'sold_out:', 'EX', idem_ttl) end
    return {'sold_out', '', stock, pay_timeout}
end

redis.call('HINCRBY', sale, 'stock', -qty)
redis.call('HINCRBY', users, user, qty)
redis.call('HSET', resv, order_id, 'r:' .. user .. ':' .. qty .. ':' .. ts .. ':' .. idem)
if idem ~= '' then redis.call('SET', idem, 'pending:' .. order_id, 'EX', idem_ttl) end
return {'ok', order_id, stock - qty, pay_timeout}
