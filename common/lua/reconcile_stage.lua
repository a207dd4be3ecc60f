-- reconcile_stage.lua - what a reconcile's snapshot writes into Redis before its rebuild, written
-- only for the reconcile that owns the sale.
-- KEYS[1] {sku:ID}:sale  KEYS[2] the key written: {sku:ID}:users_rebuild, {sku:ID}:resv_staged,
--         {sku:ID}:returned or {sku:ID}:restocks  KEYS[3] (clear only) {sku:ID}:resv_staged
-- ARGV    token, op, then field, value pairs:
--           clear   deletes KEYS[2] and KEYS[3] (the staging keys of an earlier reconcile)
--           hset    HSET KEYS[2] field value... (per-user units; staged resv entries)
--           hsetnx  HSETNX KEYS[2] field value... (ledger markers and restock request ids: the
--                   rebuild counts these rows, so give_back.lua and restock.lua add nothing more)
-- Returns the number of pairs written (0 for clear), or -1 when the sale is not paused by this
-- token (nothing written then).
--
-- The staging keys belong to whichever reconcile paused the sale last. A reaper that lost its SKU
-- lock (its PostgreSQL session died) may still be staging when another one has paused the sale
-- again with its own token and cleared the keys; the stale one's writes would end up in the other
-- one's rebuild (a user's old count; a marker that makes give_back.lua skip a row the rebuild did
-- not count). Each write checks the token in the same atomic step, and the owner clears the keys
-- first: everything in them at its apply is its own.
if redis.call('HGET', KEYS[1], 'paused') ~= ARGV[1] then
    return -1
end
local op = ARGV[2]
if op == 'clear' then
    redis.call('DEL', KEYS[2], KEYS[3])
    return 0
end
if op ~= 'hset' and op ~= 'hsetnx' then
    return redis.error_reply('reconcile_stage: unknown op ' .. tostring(op))
end
local n = 0
for i = 3, #ARGV - 1, 2 do
    redis.call(op, KEYS[2], ARGV[i], ARGV[i + 1])
    n = n + 1
end
return n
