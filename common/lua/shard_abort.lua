-- shard_abort.lua - gives the units of a transfer that was never given back to its donor: the
-- completer of open transfers runs it for an "out:" record older than every give's bound plus the
-- servers' clock difference (SP_SHARD_ABORT_AFTER_MS), after reading that the recipient holds no
-- "in:" record for it (read after that age was reached: no give can succeed any more).
-- KEYS[1] the donor shard's sale hash  KEYS[2] the donor shard's transfers
-- ARGV    transfer_id, min_age_ms
-- Returns the units given back to stock; 0 when there is no "out:" record (settled or aborted
-- before); -1 when the record is younger than min_age_ms (it stays).
local sale, xfer = KEYS[1], KEYS[2]
local prev = redis.call('HGET', xfer, ARGV[1])
if not prev then
    return 0
end
local kind, units, ts, gen = string.match(prev, '^(%a+):[^:]*:(%d+):(%d+):?(.*)$')
if kind ~= 'out' then
    return 0
end
units = tonumber(units)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now - tonumber(ts) < tonumber(ARGV[2]) then
    return -1
end
redis.call('HDEL', xfer, ARGV[1])
-- A sale that is gone (Redis lost it) is not re-created, and one rebuilt since the take (another
-- generation) counted every unit afresh: nothing to give back to it.
if redis.call('HGET', sale, 'gen') == gen then
    redis.call('HINCRBY', sale, 'stock', units)
    if redis.call('HINCRBY', sale, 'moving', -units) <= 0 then
        redis.call('HDEL', sale, 'moving')
    end
end
return units
