-- give_back.lua - gives one row of the return ledger (stock_returns) back to Redis, exactly once.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:users  KEYS[3] {sku:ID}:resv  KEYS[4] {sku:ID}:returned
-- KEYS[5] the Idempotency-Key the order's 'r:' entry named when the caller read it (absent: none)
-- ARGV    order_id, user_id, qty, now_ms, reason ("expired" or "voided")
-- Returns the qty given back; 0 when this order was given back before (or, voided, its reservation
-- is gone: its producer released it after all, or a reconcile counted it); -1 when the sale is not in
-- Redis (Redis lost it: reconcile rebuilds the whole sale from PostgreSQL, nothing is created
-- here); -2 while a reconcile has the sale paused (the row waits for the next drain).
--
-- The guard is the per-order marker in {sku:ID}:returned (order_id -> when): HSETNX sets it in
-- the same atomic step as the give-back, so a second run, by this reaper after a crash or by
-- another replica, finds it and returns 0. The reaper stamps the row in PostgreSQL afterwards and
-- only then deletes the marker; a row stamped there is never given back again.
local sale, users, resv, returned = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local order_id, user, qty, now, reason = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local s = redis.call('HMGET', sale, 'stock', 'paused')
if not s[1] then
    return -1
end
if s[2] then
    return -2
end
if redis.call('HSETNX', returned, order_id, now) == 0 then
    return 0
end
-- A voided order's units are in Redis's books only through its entry: an 'r:' one (a lost
-- reservation), or an 'a:' one (an accepted order whose event the log lost, resv_sweep.c).
-- Without it there is nothing to give (whoever removed the entry gave them back or counted them).
local r = redis.call('HGET', resv, order_id)
local reserved = r and string.sub(r, 1, 2) == 'r:'
local accepted = r and string.sub(r, 1, 2) == 'a:'
if reason == 'voided' and not reserved and not accepted then
    return 0
end
redis.call('HINCRBY', sale, 'stock', qty)
-- a shard of a sharded sale counts the rises of its stock (a sold-out read compares them)
if redis.call('HEXISTS', sale, 'shards') == 1 then redis.call('HINCRBY', sale, 'ver', 1) end
local left = redis.call('HINCRBY', users, user, -qty)
if left <= 0 then
    redis.call('HDEL', users, user)
end
-- Drop the 'r:' entry, so nothing releases or voids it again, and free its Idempotency-Key (the
-- buyer never heard 202) if it still names this order.
if accepted and reason == 'voided' then
    redis.call('HDEL', resv, order_id)
end
if reserved then
    redis.call('HDEL', resv, order_id)
    local idem = string.match(r, '^r:[^:]*:[^:]*:[^:]*:(.*)$')
    if idem and idem ~= '' and idem == KEYS[5] and redis.call('GET', KEYS[5]) == 'pending:' .. order_id then
        redis.call('DEL', KEYS[5])
    end
end
return qty
