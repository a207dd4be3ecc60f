-- sale_open.lua - opens a sale in Redis, once.
-- KEYS[1] {sku:ID}:sale   hash: stock, limit, pay_timeout_s, supplied
-- ARGV    stock, per_user_limit, pay_timeout_s
-- Returns 1 when opened, 0 when the SKU was open already (nothing changes).
-- `supplied` counts every unit ever put on sale here (open + restocks), as inventory.supplied does
-- in PostgreSQL; cap.lua compares the two to know which restocks PostgreSQL has not seen yet.
if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'limit', ARGV[2], 'pay_timeout_s', ARGV[3],
           'supplied', ARGV[1])
return 1
