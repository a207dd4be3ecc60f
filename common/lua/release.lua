-- release.lua - Kafka definitely refused order.created: give the reservation back, exactly once.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:users  KEYS[3] {sku:ID}:resv
-- KEYS[4] {sku:ID}:idem:USER:KEY, the order's Idempotency-Key (absent when it had none)
-- ARGV    order_id
-- Returns the qty given back, or 0 when there was no such reservation (already released, or
-- accepted): the reservation row is the guard, so a second call returns nothing.
local r = redis.call('HGET', KEYS[3], ARGV[1])
if not r or string.sub(r, 1, 2) ~= 'r:' then
    return 0
end
local user, qty, _, idem = string.match(r, '^r:([^:]*):([^:]*):([^:]*):(.*)$')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'stock', qty)
-- a shard of a sharded sale counts the rises of its stock (a sold-out read compares them)
if redis.call('HEXISTS', KEYS[1], 'shards') == 1 then redis.call('HINCRBY', KEYS[1], 'ver', 1) end
local left = redis.call('HINCRBY', KEYS[2], user, -tonumber(qty))
if left <= 0 then
    redis.call('HDEL', KEYS[2], user)
end
-- The buyer was told 503: a retry with the same key must be free to try again.
if idem ~= '' and idem == KEYS[4] then
    redis.call('DEL', KEYS[4])
end
return tonumber(qty)
