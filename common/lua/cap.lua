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
--
-- Mode `lower`, one shard of a sale sharded in Redis (docs/consumer.md):
-- KEYS[1] the shard's sale hash ({sku:ID/k}:sale; shard 0 is {sku:ID}:sale)
-- ARGV    "lower", most, gen (the sale's generation the caller read)
-- The caller weighs the sale's excess over the sum of its shards (no one shard can: its stock is
-- a share of the sale's) and takes it off the shards in turn: this shard's stock goes down by at
-- most `most`, never below 0. Nothing changes on a missing or paused shard, or one of another
-- generation (a rebuild since the caller's read counted every unit afresh). Returns the units
-- taken away.
if ARGV[1] == 'lower' then
    local h = redis.call('HMGET', KEYS[1], 'stock', 'paused', 'gen')
    if not h[1] or h[2] or (h[3] or '') ~= ARGV[3] then
        return 0
    end
    local have, most = tonumber(h[1]), tonumber(ARGV[2])
    local take = most < have and most or have
    if take <= 0 then
        return 0
    end
    redis.call('HSET', KEYS[1], 'stock', string.format('%d', have - take))
    return take
end
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
