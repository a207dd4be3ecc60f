-- sale_claim.lua - claims the right to open a sale, before its stock.set is published.
-- KEYS[1] {sku:ID}:sale      KEYS[2] {sku:ID}:opening (a string: the claiming open's token)
-- ARGV    token, claim_ms (how long the claim holds: longer than Kafka may take to answer)
-- Returns 1 when claimed, 0 when the sale is open already, -1 when another open holds the claim.
-- Only the holder of the claim publishes a stock.set, so of two opens racing one is answered 409
-- and leaves nothing in the log; sale_open.lua drops the claim once the sale is open, and
-- sale_unclaim.lua when Kafka definitely did not take the event. A producer that dies holding it
-- leaves it to expire.
if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return -1
