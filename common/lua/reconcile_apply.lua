-- reconcile_apply.lua - a sale's stock and per-user counts rebuilt from PostgreSQL plus what is
-- still in flight, in one atomic step. The pause itself stays until reconcile_open.lua, after the
-- mend (so a reaper dying in between is seen and redone): orders are taken again from then on.
-- KEYS[1] {sku:ID}:sale  KEYS[2] {sku:ID}:users  KEYS[3] {sku:ID}:resv
-- KEYS[4] {sku:ID}:users_rebuild  KEYS[5] {sku:ID}:resv_staged
-- ARGV    token, pg_stock, pg_supplied, per_user_limit, pay_timeout_s (PostgreSQL's snapshot)
-- Returns {stock, inflight, order_id, user, qty, ...} with one triple per vanished entry, or {-1}
-- when the sale is not paused by this token any more (nothing changed then).
--
-- users_rebuild holds each user's units in pending and paid orders as PostgreSQL's snapshot had
-- them (a sale without a per-user limit keeps no counts: it is absent, and users is deleted); resv_staged the entries of resv the snapshot did not know (entries it knew were dropped
-- when staged). So every entry in resv now is in flight as far as the snapshot goes: its units
-- come off the stock and count for its user. A staged entry that is gone was released by its
-- producer (nothing to do) or stored by the consumer after the snapshot; the caller asks
-- PostgreSQL which, and corrects the latter with reconcile_adjust.lua.
local sale, users, resv, rebuilt, staged = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local s = redis.call('HMGET', sale, 'paused', 'supplied')
if s[1] ~= ARGV[1] then
    return {-1}
end
local inflight = 0
local counts = tonumber(ARGV[4]) > 0 -- per-user counts are kept only under a per-user limit
local entries = redis.call('HGETALL', resv)
for i = 1, #entries, 2 do
    local user, qty = string.match(entries[i + 1], '^[ra]:([^:]*):([^:]*)')
    if user and tonumber(qty) then
        inflight = inflight + tonumber(qty)
        if counts then
            redis.call('HINCRBY', rebuilt, user, qty)
        end
    end
end
local out = {0, inflight}
local st = redis.call('HGETALL', staged)
for i = 1, #st, 2 do
    if redis.call('HEXISTS', resv, st[i]) == 0 then
        local user, qty = string.match(st[i + 1], '^[ra]:([^:]*):([^:]*)')
        out[#out + 1] = st[i]
        out[#out + 1] = user or '0'
        out[#out + 1] = qty or '0'
    end
end
-- Restocks Redis applied during the pause that the snapshot does not hold yet, as in cap.lua
-- (restock.lua refuses a paused sale, so only a producer of an older release adds any).
local pg_stock, pg_supplied = tonumber(ARGV[2]), tonumber(ARGV[3])
local supplied = tonumber(s[2] or ARGV[3])
local unseen = supplied - pg_supplied
if unseen < 0 then
    unseen = 0
    supplied = pg_supplied
end
local stock = pg_stock - inflight + unseen
if stock < 0 then
    stock = 0 -- more in flight than PostgreSQL can cover: the excess will be rejected there
end
redis.call('HSET', sale, 'stock', stock, 'limit', ARGV[4], 'pay_timeout_s', ARGV[5],
           'supplied', supplied)
if redis.call('EXISTS', rebuilt) == 1 then
    redis.call('RENAME', rebuilt, users)
else
    redis.call('DEL', users)
end
redis.call('DEL', staged)
out[1] = stock
return out
