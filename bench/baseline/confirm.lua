-- confirm.lua - Kafka acknowledged order.created: the reservation becomes an accepted order.
-- KEYS[1]   {sku:ID}:resv
-- KEYS[2..] {sku:ID}:idem:USER:KEY  the batch's Idempotency-Keys
-- ARGV      three per order: order_id, its key's index in KEYS (0: none), and where Kafka put
--           its order.created, "partition:offset" ("" when librdkafka did not say)
-- Returns how many reservations were turned to accepted.
--
-- "r:user:qty:ts:idem" becomes "a:user:qty:ts:partition:offset": the units stay sold, nothing is
-- given back any more, and GET /v1/orders/{id} answers "accepted" from it until the consumer has
-- stored the order and removed the entry. If the consumer was quicker (the entry is gone), nothing
-- is re-created. The log position lets the reaper tell an order the consumer has not reached yet
-- from one the log no longer holds (resv_sweep.c). Either way the idempotency key now answers
-- "accepted" with the same order id (XX: a key that expired is not brought back).
local n = 0
for i = 1, #ARGV, 3 do
    local id, k, pos = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local r = redis.call('HGET', KEYS[1], id)
    if r and string.sub(r, 1, 2) == 'r:' then
        local a = 'a:' .. string.match(r, '^r:([^:]*:[^:]*:[^:]*)')
        if pos ~= '' then
            a = a .. ':' .. pos
        end
        redis.call('HSET', KEYS[1], id, a)
        n = n + 1
    end
    if k > 0 then
        redis.call('SET', KEYS[k], 'accepted:' .. id, 'XX', 'KEEPTTL')
    end
end
return n
