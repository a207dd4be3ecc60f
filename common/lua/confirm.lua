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
--
-- Cost (issue 17): one HMGET reads every order's entry, one HSET writes every new one; what stays
-- per order is the SET of an order's Idempotency-Key, when it has one. An order named twice in a
-- batch is turned (and counted) once, as one call per order would. Every value is computed before
-- the first write and the entries are written first (the HMGET found resv a hash; SET overwrites
-- any type), so a script stopped midway writes nothing or the whole batch (see reserve.lua).
local resv = KEYS[1]
local ids = {}
for i = 1, #ARGV, 3 do
    ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
    return 0
end
local cur = redis.call('HMGET', resv, unpack(ids))
local entries, turned, pins = {}, {}, {}
local n = 0
for j = 1, #ids do
    local id, r = ids[j], cur[j]
    local k = tonumber(ARGV[3 * j - 1])
    if k > 0 then
        pins[#pins + 1] = {k = k, value = 'accepted:' .. id}
    end
    if r and not turned[id] and string.sub(r, 1, 2) == 'r:' then
        local a = 'a:' .. string.match(r, '^r:([^:]*:[^:]*:[^:]*)')
        local pos = ARGV[3 * j]
        if pos ~= '' then
            a = a .. ':' .. pos
        end
        turned[id] = true
        entries[#entries + 1] = id
        entries[#entries + 1] = a
        n = n + 1
    end
end
if n > 0 then
    redis.call('HSET', resv, unpack(entries))
end
for j = 1, #pins do
    local p = pins[j]
    redis.call('SET', KEYS[p.k], p.value, 'XX', 'KEEPTTL')
end
return n
