-- restock.lua - adds units to an open sale.
-- KEYS[1] {sku:ID}:sale
-- ARGV    add
-- Returns the new stock, or -1 when the SKU is not open.
if redis.call('EXISTS', KEYS[1]) == 0 then
    return -1
end
redis.call('HINCRBY', KEYS[1], 'supplied', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'stock', ARGV[1])
