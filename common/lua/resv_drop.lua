-- resv_drop.lua - drops reservation entries whose orders PostgreSQL holds; gives nothing back.
-- KEYS[1]   {sku:ID}:resv
-- KEYS[2..] {sku:ID}:idem:USER:KEY  the Idempotency-Keys named by the 'r:' entries below
-- ARGV      order_id, entry, key index in KEYS (0: none), [order_id, entry, index ...]: each
--           entry as the caller read it
-- Returns how many entries were dropped.
--
-- The units of such an order are PostgreSQL's now (pending, paid, or already returned through
-- the ledger), so the entry is only a leftover: the consumer's HDEL after its commit was lost, or
-- the order.created of a reservation made it to the log after all. An entry is dropped only while
-- it still holds what the caller read: one that changed since (confirmed, r: -> a:) waits for the
-- next sweep.
--
-- An 'r:' entry here is an order whose producer died after Kafka took it and before its confirm:
-- its Idempotency-Key still says "pending" and a retry would hear in_progress until the key
-- expired. The order is in PostgreSQL, so the key now answers "accepted" with it (KEEPTTL).
local n = 0
for i = 1, #ARGV, 3 do
    local order_id, entry, k = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
    if redis.call('HGET', KEYS[1], order_id) == entry then
        redis.call('HDEL', KEYS[1], order_id)
        n = n + 1
        if k > 0 and redis.call('GET', KEYS[k]) == 'pending:' .. order_id then
            redis.call('SET', KEYS[k], 'accepted:' .. order_id, 'XX', 'KEEPTTL')
        end
    end
end
return n
