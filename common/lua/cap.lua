-- cap.lua - corrects a sale's stock downwards to what PostgreSQL can still sell.
-- KEYS[1] {sku:ID}:sale
-- ARGV    pg_stock, pg_supplied: inventory.stock and inventory.supplied after a committed batch
-- Returns the units taken away (0 when Redis held no more than it may).
--
-- Redis may hold more than PostgreSQL (a failover lost decrements; an operator's mistake). It may
-- also legitimately hold restocked units whose stock.add PostgreSQL has not applied yet: those are
-- supplied(Redis) - supplied(PostgreSQL). So the most Redis may hold is
--     pg_stock + (supplied - pg_supplied)
-- and anything above that is taken away. It never adds units (orders in flight are already
-- deducted in Redis and not yet in PostgreSQL, so Redis is normally below this cap).
local s = redis.call('HMGET', KEYS[1], 'stock', 'supplied')
if not s[1] then
    return 0
end
local stock = tonumber(s[1])
local pg_stock, pg_supplied = tonumber(ARGV[1]), tonumber(ARGV[2])
local supplied = tonumber(s[2] or ARGV[2])
local unseen = supplied - pg_supplied
if unseen < 0 then
    unseen = 0
end
local cap = pg_stock + unseen
if stock <= cap then
    return 0
end
redis.call('HSET', KEYS[1], 'stock', cap)
return stock - cap
