-- reconcile_adjust.lua - takes one order's units off a rebuilt sale, for the reconcile that owns it.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:users
-- ARGV    token, user_id, qty
-- Returns the stock after the step, or -1 when the sale is not paused by this token (nothing
-- changed then).
--
-- For an order PostgreSQL stored after reconcile's snapshot whose entry was gone from resv before
-- the rebuild: neither the snapshot's stock nor the in-flight entries counted it. The stock never
-- goes below 0 (PostgreSQL rejects whatever it cannot cover). Only the reconcile whose token still
-- pauses the sale may take them: a reaper that lost its SKU lock mid-mend (its PostgreSQL session
-- died) finds another reconcile's token here, or none once that one reopened the sale, whose
-- rebuild already counted the order; taking the units again would leak them.
local s = redis.call('HMGET', KEYS[1], 'paused', 'stock', 'limit')
if s[1] ~= ARGV[1] or not s[2] then
    return -1
end
local qty = tonumber(ARGV[3])
local stock = tonumber(s[2]) - qty
if stock < 0 then
    stock = 0
end
redis.call('HSET', KEYS[1], 'stock', stock)
if tonumber(s[3] or '0') > 0 then -- per-user counts are kept only under a per-user limit
    redis.call('HINCRBY', KEYS[2], ARGV[2], qty)
end
return stock
