-- rejected_forget.lua - PostgreSQL refused an order Redis had admitted (Redis over-admitted:
-- a failover lost writes): drop its reservation entry and give the buyer's per-user units back.
-- KEYS[1] {sku:ID}:resv   KEYS[2] {sku:ID}:users
-- ARGV    order_id, user_id, qty
-- Returns the units given back to the user: qty the first time, 0 when the entry was gone.
--
-- The entry is the guard: the units come back only with the entry, so a second call gives back
-- nothing, and a reconcile that rebuilt `users` without this order (it counts only pending and
-- paid orders plus the entries still in `resv`) is never corrected twice. The stock is not
-- touched here: cap.lua lowers it to what PostgreSQL can still sell.
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
    return 0
end
local qty = tonumber(ARGV[3])
local left = redis.call('HINCRBY', KEYS[2], ARGV[2], -qty)
if left <= 0 then
    redis.call('HDEL', KEYS[2], ARGV[2])
end
return qty
