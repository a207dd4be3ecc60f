-- reserve.lua - the admission of orders for one SKU, atomically and in one round trip.
--
-- A producer sends the orders of one SKU that arrived in the same event-loop turn together (a
-- batch of one is the plain case). Each order is decided in turn exactly as if it had come alone:
-- the ones before it in the batch have already taken their units and their users' counts.
--
-- KEYS[1] {sku:ID}:sale        hash: stock, limit, pay_timeout_s, supplied, paused (a reconcile's
--                              token while it rebuilds the sale from PostgreSQL)
-- KEYS[2] {sku:ID}:users       hash: user_id -> units the user holds (reserved or ordered)
-- KEYS[3] {sku:ID}:resv        hash: order_id -> "r:user_id:qty:ts_ms:idem_key_or_empty"
-- KEYS[4..] {sku:ID}:idem:USER:KEY  the batch's idempotency keys (strings "state:order_id")
-- ARGV[1] idem_ttl_s: how long a key pins an order (pending, then accepted)
-- ARGV[2] idem_refusal_ttl_s: how long it pins sold_out / limit_exceeded (0: not at all, so a
--         retry after a restock is decided afresh)
-- then four per order:
--         user_id, qty, order_id (fresh, unique), index in KEYS of its idempotency key
--         (0: the order has none)
--
-- A reservation's ts_ms is Redis's own clock (TIME), never a producer's: the reaper measures a
-- reservation's age on the same clock (resv_sweep.c), so hosts whose clocks differ cannot make a
-- reservation still waiting for Kafka look lost.
--
-- Returns one {outcome, order_id, stock_left, pay_timeout_s} per order, in the orders' order:
--   "ok"           reserved: stock decremented, user's count raised, reservation recorded
--   "dup"          the idempotency key was seen: order_id and its state ("pending", "accepted",
--                  "sold_out", "limit_exceeded") of the first attempt in place of stock_left;
--                  nothing changes
--   "unknown_sku", "sold_out", "limit_exceeded": nothing changes (sold_out and limit_exceeded
--                  are remembered under the idempotency key for idem_refusal_ttl_s, so a retry
--                  meanwhile gets the same answer)
--   "recovering"   the sale is paused (reconcile_pause.lua: its stock 0 says nothing about what
--                  PostgreSQL still holds): nothing changes and the idempotency key is not pinned,
--                  so a retry after the rebuild is decided afresh. A key seen before still answers
--                  "dup" first: an order it names stays that order.
-- Every write of an order is done before the next order is looked at, so a script stopped by an
-- error leaves whole reservations only (whose orders the reaper's lost-reservation sweep voids).
local sale, users, resv = KEYS[1], KEYS[2], KEYS[3]
local idem_ttl, refusal_ttl = ARGV[1], tonumber(ARGV[2])
local out = {}

local t = redis.call('TIME')
local ts = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', sale, 'stock', 'limit', 'pay_timeout_s', 'paused')
local stock, limit, pay_timeout = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
local paused = s[4]

for i = 3, #ARGV, 4 do
    local user, qty, order_id = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local k = tonumber(ARGV[i + 3])
    local idem = k > 0 and KEYS[k] or nil
    local prev = idem and redis.call('GET', idem)
    if prev then
        local sep = string.find(prev, ':', 1, true)
        out[#out + 1] = {'dup', string.sub(prev, sep + 1), string.sub(prev, 1, sep - 1), 0}
    elseif paused then
        out[#out + 1] = {'recovering', '', 0, 0}
    elseif not stock then
        out[#out + 1] = {'unknown_sku', '', 0, 0}
    else
        local held = 0
        if limit > 0 then
            held = tonumber(redis.call('HGET', users, user) or '0')
        end
        if limit > 0 and held + qty > limit then
            if idem and refusal_ttl > 0 then
                redis.call('SET', idem, 'limit_exceeded:', 'EX', refusal_ttl)
            end
            out[#out + 1] = {'limit_exceeded', '', stock, pay_timeout}
        elseif stock < qty then
            if idem and refusal_ttl > 0 then
                redis.call('SET', idem, 'sold_out:', 'EX', refusal_ttl)
            end
            out[#out + 1] = {'sold_out', '', stock, pay_timeout}
        else
            stock = stock - qty
            redis.call('HINCRBY', sale, 'stock', -qty)
            redis.call('HINCRBY', users, user, qty)
            redis.call('HSET', resv, order_id, 'r:' .. user .. ':' .. qty .. ':' ..
                string.format('%d', ts) .. ':' .. (idem or ''))
            if idem then redis.call('SET', idem, 'pending:' .. order_id, 'EX', idem_ttl) end
            out[#out + 1] = {'ok', order_id, stock, pay_timeout}
        end
    end
end
-- The one change since commit 45dd74f: the reply leads with pay_timeout_s, shards (0) and gen
-- (""), as common/lua/'s does, so the producer's one parser reads both (its answers, arrays of
-- four, are read as before).
table.insert(out, 1, '')
table.insert(out, 1, 0)
table.insert(out, 1, pay_timeout or 0)
return out
