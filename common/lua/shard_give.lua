-- shard_give.lua - the second step of a stock transfer between two shards (shard_take.lua): adds
-- the units the donor gave up to the recipient shard, exactly once.
-- KEYS[1] the recipient shard's sale hash  KEYS[2] the recipient shard's transfers
-- ARGV    transfer_id, from_shard, units and take_ts_ms (what shard_take.lua answered), gen,
--         max_age_ms (> 0: every give is bounded, the completer's too)
-- Returns the units given; 0 when this transfer was given before (its "in:" record is here);
-- -1: no sale on this shard; -2: the sale is paused (the caller retries after the rebuild); -3:
-- the sale's generation is not gen: it was rebuilt from PostgreSQL after the take, and that
-- rebuild counted every unit afresh, so this transfer has nothing left to give; -4: the take is
-- older than max_age_ms on this server's clock: too late, the transfer is left as it is (the
-- caller's is left to the completer of open transfers, whose own bound is longer; past that, the
-- completer aborts it on the donor, shard_done.lua).
--
-- The "in:" record is the guard: it is written in the same atomic step as the units, and it stays
-- here well after the donor's "out:" record is gone (shard_done.lua with a minimum age), so a
-- give that comes late finds it or is refused by age.
local sale, xfer = KEYS[1], KEYS[2]
local id, from, units, take_ts = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local gen, max_age = ARGV[5], tonumber(ARGV[6])
if not (max_age > 0) then
    return redis.error_reply('shard_give: max_age_ms must be > 0')
end
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
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('HEXISTS', xfer, id) == 1 then
    return 0
end
if max_age > 0 and now - take_ts > max_age then
    return -4
end
redis.call('HSET', xfer, id, 'in:' .. from .. ':' .. string.format('%d:%d', units, now))
redis.call('HINCRBY', sale, 'stock', units)
-- `ver` counts the rises of this shard's stock + moving: a buyer told sold_out saw every shard's
-- ver unchanged across its two reads (sp_stock_reserve_sharded).
redis.call('HINCRBY', sale, 'ver', 1)
return units
