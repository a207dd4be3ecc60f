-- shard_take.lua - the first step of a stock transfer between two shards of a sharded sale (issue
-- 17 part 3, built step by step; docs/reservation.md "Hot-SKU sharding"): takes up to `want` units
-- off the donor shard and records the transfer there, so it can be completed exactly once.
-- KEYS[1] the donor shard's sale hash ({sku:ID/k}:sale; shard 0 is {sku:ID}:sale)
-- KEYS[2] the donor shard's transfers (hash: transfer_id -> "out:to_shard:units:ts_ms:gen" here,
--         "in:from_shard:units:ts_ms" on a recipient; ts_ms is that server's clock, TIME; gen the
--         sale's generation at the take, which a completer gives under)
-- ARGV    transfer_id (unique), to_shard, want, gen (the sale's generation the caller read)
-- Returns {units taken, the take's ts_ms} (0 units: none here; nothing recorded). A transfer id
-- seen before answers what it took then and changes nothing (a retry after a lost reply). {-1, 0}:
-- no sale on this shard; {-2, 0}: the sale is paused (a reconcile rebuilds it); {-3, 0}: the sale's
-- generation is not gen (it was rebuilt since the caller read it).
--
-- The units taken leave `stock` and are counted in `moving` until shard_done.lua settles the
-- transfer here: a buyer is told sold_out only when no shard has `qty` units to give and none has
-- units moving.
local sale, xfer = KEYS[1], KEYS[2]
local id, to, want, gen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local s = redis.call('HMGET', sale, 'stock', 'paused', 'gen')
if not s[1] then
    return {-1, 0}
end
if s[2] then
    return {-2, 0}
end
if (s[3] or '') ~= gen then
    return {-3, 0}
end
local prev = redis.call('HGET', xfer, id)
if prev then
    local took, ts = string.match(prev, '^out:[^:]*:(%d+):(%d+)')
    return {tonumber(took) or 0, tonumber(ts) or 0}
end
local stock = tonumber(s[1])
local took = want < stock and want or stock
if took <= 0 then
    return {0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', sale, 'stock', string.format('%d', stock - took))
redis.call('HINCRBY', sale, 'moving', took)
-- every step of a transfer counts in `ver` (with every rise of the stock): two reads of the
-- shards that find the same `ver` everywhere saw no unit move between them
redis.call('HINCRBY', sale, 'ver', 1)
redis.call('HSET', xfer, id, 'out:' .. to .. ':' .. string.format('%d:%d:', took, now) .. gen)
return {took, now}
