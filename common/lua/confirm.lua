-- confirm.lua - Kafka acknowledged order.created: the reservation is no longer needed.
-- KEYS[1] {sku:ID}:resv  KEYS[2] {sku:ID}:resv_by_ts  KEYS[3] {sku:ID}:accepted
-- ARGV    order_id
-- Returns 1 when the reservation was there (and is gone now), 0 when it was not.
-- The order is then "accepted": in the log, maybe not yet in PostgreSQL. {sku:ID}:accepted
-- (order_id -> "user_id:qty:ts_ms") lets GET /v1/orders/{id} say so until the consumer has
-- stored the order and removed the entry; it holds at most the units sold, so it is bounded.
local r = redis.call('HGET', KEYS[1], ARGV[1])
if not r then
    return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local head, idem = string.match(r, '^([^:]*:[^:]*:[^:]*):(.*)$')
redis.call('HSET', KEYS[3], ARGV[1], head)
-- The idempotency key now answers "accepted" with the same order id.
if idem and idem ~= '' then
    redis.call('SET', idem, 'accepted:' .. ARGV[1], 'KEEPTTL')
end
return 1
