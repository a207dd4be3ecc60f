-- confirm.lua - Kafka acknowledged order.created: the reservation becomes an accepted order.
-- KEYS[1] {sku:ID}:resv
-- ARGV    order_id, idem_key_or_empty, [order_id, idem_key_or_empty ...] (one pair per order)
-- Returns how many reservations were turned to accepted.
--
-- "r:user:qty:ts:idem" becomes "a:user:qty:ts": the units stay sold, nothing is given back any
-- more, and GET /v1/orders/{id} answers "accepted" from it until the consumer has stored the order
-- and removed the entry. If the consumer was quicker (the entry is gone), nothing is re-created.
-- Either way the idempotency key now answers "accepted" with the same order id (XX: a key that
-- expired is not brought back).
local n = 0
for i = 1, #ARGV, 2 do
    local id, idem = ARGV[i], ARGV[i + 1]
    local r = redis.call('HGET', KEYS[1], id)
    if r and string.sub(r, 1, 2) == 'r:' then
        redis.call('HSET', KEYS[1], id, 'a:' .. string.match(r, '^r:([^:]*:[^:]*:[^:]*)'))
        n = n + 1
    end
    if idem ~= '' then
        redis.call('SET', idem, 'accepted:' .. id, 'XX', 'KEEPTTL')
    end
end
return n
