-- confirm.lua - Kafka acknowledged order.created: the reservation is no longer needed.
-- KEYS[1] {sku:ID}:resv  KEYS[2] {sku:ID}:resv_by_ts
-- ARGV    order_id
-- Returns 1 when the reservation was there (and is gone now), 0 when it was not.
local r = redis.call('HGET', KEYS[1], ARGV[1])
if not r then
    return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
-- The idempotency key (4th field) now answers "accepted" with the same order id.
local idem = string.match(r, '^[^:]*:[^:]*:[^:]*:(.*)$')
if idem and idem ~= '' then
    redis.call('SET', idem, 'accepted:' .. ARGV[1], 'KEEPTTL')
end
return 1
