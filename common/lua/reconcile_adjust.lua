-- reconcile_adjust.lua - takes one order's units off a rebuilt sale.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:users
-- ARGV    user_id, qty
-- Returns the stock after the step, or -1 when the sale is not in Redis.
--
-- For an order PostgreSQL stored after reconcile's snapshot whose entry was gone from resv before
-- the rebuild: neither the snapshot's stock nor the in-flight entries counted it. The stock never
-- goes below 0 (PostgreSQL rejects whatever it cannot cover).
local stock = redis.call('HGET', KEYS[1], 'stock')
if not stock then
    return -1
end
local qty = tonumber(ARGV[2])
stock = tonumber(stock) - qty
if stock < 0 then
    stock = 0
end
redis.call('HSET', KEYS[1], 'stock', stock)
redis.call('HINCRBY', KEYS[2], ARGV[1], qty)
return stock
