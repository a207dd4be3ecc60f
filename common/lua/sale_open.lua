-- sale_open.lua - opens a sale in Redis, once, after its stock.set is in the log.
-- KEYS[1] {sku:ID}:sale   hash: stock, limit, pay_timeout_s, supplied
-- KEYS[2] {sku:ID}:opening   the claim of sale_claim.lua, dropped here when it is this open's
-- ARGV    stock, per_user_limit, pay_timeout_s, token (the claim's; "" for none), and for one shard
--         of a sharded sale (docs/reservation.md, "Hot-SKU sharding") gen and shards (the sale's
--         generation and its number of shards; absent for an unsharded sale)
-- Returns 1 when opened, 0 when the SKU was open already (nothing changes).
-- `supplied` counts every unit ever put on sale here (open + restocks), as inventory.supplied does
-- in PostgreSQL; cap.lua compares the two to know which restocks PostgreSQL has not seen yet.
local opened = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'limit', ARGV[2], 'pay_timeout_s', ARGV[3],
               'supplied', ARGV[1])
    if ARGV[5] then
        redis.call('HSET', KEYS[1], 'gen', ARGV[5], 'shards', ARGV[6])
    end
    opened = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then
    redis.call('DEL', KEYS[2])
end
return opened
