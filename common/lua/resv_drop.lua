-- resv_drop.lua - drops reservation entries whose orders PostgreSQL holds; gives nothing back.
-- KEYS[1] {sku:ID}:resv
-- ARGV    order_id, entry, [order_id, entry ...]: each entry as the caller read it
-- Returns how many entries were dropped.
--
-- The units of such an order are PostgreSQL's now (pending, paid, or already returned through
-- the ledger), so the entry is only a leftover: the consumer's HDEL after its commit was lost, or
-- the order.created of a reservation made it to the log after all. An entry is dropped only while
-- it still holds what the caller read: one that changed since (confirmed, r: -> a:) waits for the
-- next sweep.
local n = 0
for i = 1, #ARGV, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
        redis.call('HDEL', KEYS[1], ARGV[i])
        n = n + 1
    end
end
return n
