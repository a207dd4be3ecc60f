-- reconcile_pause.lua - closes a sale to new orders while reconcile rebuilds it.
-- KEYS[1] {sku:ID}:sale
-- ARGV    token, per_user_limit, pay_timeout_s, supplied (PostgreSQL's inventory row), and for a
--         shard of a sharded sale gen and shards: the rebuild's generation (transfers begun
--         before it give and settle nothing any more) and the sale's shards; `moving` goes (the
--         rebuild counts every unit afresh)
-- Returns 1.
--
-- stock becomes 0 and `paused` holds the reconcile's token: reserve.lua answers recovering (never
-- a false sold_out; an older producer's reserve.lua sees stock 0), give_back.lua leaves a paused sale alone and reconcile_apply.lua only finishes the reconcile
-- that owns the token. The other fields come from PostgreSQL, so a sale Redis lost comes back
-- whole (closed until the rebuild), never as a partial hash. `supplied` restarts from
-- PostgreSQL's. restock.lua adds nothing to a paused sale: a restock is counted by the rebuild
-- (in its snapshot, its request id marked in {sku:ID}:restocks) or applied after it reopens.
redis.call('HSET', KEYS[1], 'stock', 0, 'limit', ARGV[2], 'pay_timeout_s', ARGV[3],
           'supplied', ARGV[4], 'paused', ARGV[1])
if ARGV[5] then
    redis.call('HSET', KEYS[1], 'gen', ARGV[5], 'shards', ARGV[6])
    redis.call('HDEL', KEYS[1], 'moving')
end
return 1
