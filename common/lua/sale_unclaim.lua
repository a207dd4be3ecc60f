-- sale_unclaim.lua - gives up an open's claim (sale_claim.lua) when Kafka definitely did not take
-- its stock.set, so that a retry can open the sale at once.
-- KEYS[1] {sku:ID}:opening
-- ARGV    token
-- Returns 1 when the claim was this open's and is gone, 0 otherwise (expired, or another's).
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
