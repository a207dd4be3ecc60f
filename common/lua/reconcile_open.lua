-- reconcile_open.lua - the last step of a reconcile: lifts its pause once the rebuilt sale has
-- been mended (reconcile_adjust.lua) and its ledger markers settled.
-- KEYS[1] {sku:ID}:sale
-- ARGV    token
-- Returns 1, or 0 when the sale is not paused by this token any more (nothing changed then).
--
-- Until then `paused` stays set although reconcile_apply.lua already set the stock: a reaper that
-- dies between the apply and the mend leaves the sale paused, and the next sweep rebuilds it
-- again instead of keeping the units of orders stored meanwhile on sale twice.
if redis.call('HGET', KEYS[1], 'paused') ~= ARGV[1] then
    return 0
end
redis.call('HDEL', KEYS[1], 'paused')
return 1
