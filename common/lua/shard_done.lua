-- shard_done.lua - settles a stock transfer on one of its two shards, once it is complete: on the
-- donor first (its "out:" record goes, and the units leave `moving`: the recipient holds them),
-- then on the recipient (its "in:" record goes; no retry of the give can come any more, since
-- every retry starts from the donor's record).
-- KEYS[1] the shard's sale hash  KEYS[2] the shard's transfers
-- ARGV    transfer_id
-- Returns the units the record named; 0 when there was none (settled before).
local sale, xfer = KEYS[1], KEYS[2]
local prev = redis.call('HGET', xfer, ARGV[1])
if not prev then
    return 0
end
redis.call('HDEL', xfer, ARGV[1])
local kind, units = string.match(prev, '^(%a+):[^:]*:(%d+):')
units = tonumber(units) or 0
-- A sale that is gone (Redis lost it) is not re-created by the HINCRBY: the rebuild counts afresh.
if kind == 'out' and redis.call('EXISTS', sale) == 1 then
    if redis.call('HINCRBY', sale, 'moving', -units) <= 0 then
        redis.call('HDEL', sale, 'moving')
    end
end
return units
