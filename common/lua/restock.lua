-- restock.lua - adds units to an open sale, once per request id.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:restocks
-- ARGV    add, request_id, keep_ms
-- Returns {1, stock} when this call added the units, {0, stock} when the request id was applied
-- before (stock: the sale's stock right after that first apply, or now when a reconcile counted
-- it), {-1} when the SKU is not open in Redis (Redis lost the sale: the reaper rebuilds it from
-- PostgreSQL, nothing is created here), {-2} while a reconcile has the sale paused.
--
-- {sku:ID}:restocks maps each request id Redis has counted to "ms:stock" (ms: Redis's clock at the
-- apply; stock empty for an id a reconcile counted from PostgreSQL). The same request reaches this
-- script from the producer that published its stock.add, from an admin's retry with the same
-- Idempotency-Key, and from the reaper that catches up restocks PostgreSQL holds and Redis missed:
-- whichever runs first adds the units, the others find the id. A paused sale takes none, so a
-- reconcile's rebuild counts each restock exactly once: those in its PostgreSQL snapshot (and
-- marked here), or those applied after it reopened. Ids older than keep_ms (IDEM_TTL_S) are
-- forgotten on the next apply, which bounds the hash; the reaper never applies a restock that old
-- without a reconcile.
local sale, restocks = KEYS[1], KEYS[2]
local add, id, keep = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local s = redis.call('HMGET', sale, 'stock', 'paused')
if not s[1] then
    return {-1}
end
if s[2] then
    return {-2}
end
local seen = redis.call('HGET', restocks, id)
if seen then
    local stock = string.match(seen, '^%d+:(%d+)$')
    return {0, tonumber(stock or s[1])}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local all = redis.call('HGETALL', restocks)
for i = 1, #all, 2 do
    local ms = tonumber(string.match(all[i + 1], '^(%d+):'))
    if ms and ms < now - keep then
        redis.call('HDEL', restocks, all[i])
    end
end
redis.call('HINCRBY', sale, 'supplied', add)
local stock = redis.call('HINCRBY', sale, 'stock', add)
-- a shard of a sharded sale counts the rises of its stock (a sold-out read compares them)
if redis.call('HEXISTS', sale, 'shards') == 1 then redis.call('HINCRBY', sale, 'ver', 1) end
redis.call('HSET', restocks, id, now .. ':' .. stock)
return {1, stock}
