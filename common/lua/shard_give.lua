-- shard_give.lua - the second step of a stock transfer between two shards (shard_take.lua): adds
-- the units the donor gave up to the recipient shard, exactly once.
-- KEYS[1] the recipient shard's sale hash  KEYS[2] the recipient shard's transfers
-- ARGV    transfer_id, from_shard, units (what shard_take.lua answered), gen, now_ms
-- Returns the units given; 0 when this transfer was given before (its "in:" record is here);
-- -1: no sale on this shard; -2: the sale is paused (the transfer waits: the caller retries after
-- the rebuild); -3: the sale's generation is not gen: it was rebuilt from PostgreSQL after the
-- take, and that rebuild counted every unit afresh, so this transfer has nothing left to give.
--
-- The "in:" record is the guard: it is written in the same atomic step as the units, and removed
-- (shard_done.lua) only after the donor's "out:" record is, so every retry while the transfer is
-- still open finds it.
local sale, xfer = KEYS[1], KEYS[2]
local id, from, units, gen, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local s = redis.call('HMGET', sale, 'stock', 'paused', 'gen')
if not s[1] then
    return -1
end
if s[2] then
    return -2
end
if (s[3] or '') ~= gen then
    return -3
end
if units <= 0 then
    return 0
end
if redis.call('HSETNX', xfer, id, 'in:' .. from .. ':' .. string.format('%d', units) .. ':' .. now) == 0 then
    return 0
end
redis.call('HINCRBY', sale, 'stock', units)
return units
