-- shard_done.lua - settles a stock transfer on one of its two shards: on the donor once the give
-- has run (its "out:" record goes, and the units leave `moving`: the recipient holds them), and on
-- the recipient much later (its "in:" record goes once it is older than min_age_ms: no give can
-- come any more, since every give is bounded by its max_age_ms and the completer gives only for
-- an "out:" record, gone by then). With back = "1" it aborts instead: an "out:" record that was
-- never given (the completer reads that the recipient holds no "in:" record for it only once
-- the record is older than every give's bound plus the servers' clock difference,
-- SP_SHARD_ABORT_AFTER_MS) goes, and its units go back from `moving` to the donor's `stock`.
-- KEYS[1] the shard's sale hash  KEYS[2] the shard's transfers
-- ARGV    transfer_id, min_age_ms (0: any age), back ("1": abort; "0": settle)
-- Returns the units the record named; 0 when there was none (settled or aborted before; for an
-- abort, an "in:" record); -1 when the record is younger than min_age_ms (it stays).
local sale, xfer = KEYS[1], KEYS[2]
local back = ARGV[3] == '1'
local prev = redis.call('HGET', xfer, ARGV[1])
if not prev then
    return 0
end
local kind, units, ts, gen = string.match(prev, '^(%a+):[^:]*:(%d+):(%d+):?(.*)$')
if back and kind ~= 'out' then
    return 0
end
units = tonumber(units) or 0
local min_age = tonumber(ARGV[2])
if min_age > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if now - (tonumber(ts) or 0) < min_age then
        return -1
    end
end
redis.call('HDEL', xfer, ARGV[1])
-- A sale that is gone (Redis lost it) is not re-created by the HINCRBY, and one rebuilt since the
-- take (another generation) counted every unit afresh: `stock` and `moving` are that generation's.
if kind == 'out' and redis.call('HGET', sale, 'gen') == gen then
    if back then
        redis.call('HINCRBY', sale, 'stock', units)
    end
    if redis.call('HINCRBY', sale, 'moving', -units) <= 0 then
        redis.call('HDEL', sale, 'moving')
    end
    redis.call('HINCRBY', sale, 'ver', 1) -- a step of a transfer (shard_take.lua)
end
return units
