-- reserve.lua - the admission of orders for one SKU, atomically and in one round trip.
--
-- A producer sends the orders of one SKU that arrived in the same event-loop turn together (a
-- batch of one is the plain case). Each order is decided in turn exactly as if it had come alone:
-- the ones before it in the batch have already taken their units and their users' counts.
--
-- KEYS[1] {sku:ID}:sale        hash: stock, limit, pay_timeout_s, supplied, paused (a reconcile's
--                              token while it rebuilds the sale from PostgreSQL)
-- KEYS[2] {sku:ID}:users       hash: user_id -> units the user holds (reserved or ordered); kept
--                              only for a sale with a per-user limit (limit > 0): nothing reads
--                              it otherwise, and it costs a read and a write per batch
-- KEYS[3] {sku:ID}:resv        hash: order_id -> "r:user_id:qty:ts_ms:idem_key_or_empty"
-- KEYS[4..] {sku:ID}:idem:USER:KEY  the batch's idempotency keys (strings "state:order_id")
-- ARGV[1] idem_ttl_s: how long a key pins an order (pending, then accepted)
-- ARGV[2] idem_refusal_ttl_s: how long it pins sold_out / limit_exceeded (0: not at all, so a
--         retry after a restock is decided afresh)
-- then four per order:
--         user_id, qty, order_id (fresh, unique), index in KEYS of its idempotency key
--         (0: the order has none)
--
-- A reservation's ts_ms is Redis's own clock (TIME), never a producer's: the reaper measures a
-- reservation's age on the same clock (resv_sweep.c), so hosts whose clocks differ cannot make a
-- reservation still waiting for Kafka look lost.
--
-- Returns {pay_timeout_s, shards, gen, answer, answer, ...}: the sale's pay_timeout_s (0 when there
-- is no sale), its shards (0 for an unsharded sale) and generation ("" for none), then one answer
-- per order, in the orders' order. An order reserved is answered by one integer,
-- the stock left after it (the reply is a sizeable part of a batch's cost: a table of four per
-- order cost about 0.5 us more per order); any other answer is {outcome, order_id, stock_left
-- (the state, for "dup"), pay_timeout_s}:
--   integer        reserved: stock decremented, user's count raised, reservation recorded
--   "dup"          the idempotency key was seen: order_id and its state ("pending", "accepted",
--                  "sold_out", "limit_exceeded") of the first attempt in place of stock_left;
--                  nothing changes
--   "unknown_sku", "sold_out", "limit_exceeded": nothing changes (sold_out and limit_exceeded
--                  are remembered under the idempotency key for idem_refusal_ttl_s, so a retry
--                  meanwhile gets the same answer)
--   "recovering"   the sale is paused (reconcile_pause.lua: its stock 0 says nothing about what
--                  PostgreSQL still holds): nothing changes and the idempotency key is not pinned,
--                  so a retry after the rebuild is decided afresh. A key seen before still answers
--                  "dup" first: an order it names stays that order.
--
-- A shard of a sharded sale (docs/reservation.md, "Hot-SKU sharding"; the sale hash holds
-- `shards` N > 1 and the sale's generation `gen`; the shard's number is its key's) decides only the
-- orders of its own buyers (user_id mod N = shard); the reply's head says N and gen, so that a
-- producer that did not know the sale was sharded learns it from its first order:
--   "moved"        the buyer's home is another shard: nothing changes, the producer sends the
--                  order there (checked first: the order's other keys are named for that shard)
--   "sold_out"     this shard holds fewer than qty units. Not final (other shards may hold units:
--                  the producer moves some here and decides again), so not pinned under the
--                  idempotency key either.
--
-- Cost (issue 17): one Redis thread decides every order of a flash sale's SKU, so the script
-- spends a few commands per batch, not several per order. It reads once: HMGET of the sale, MGET
-- of the batch's idempotency keys (only if it has any), HMGET of the users' counts (only for a
-- sale with a per-user limit), TIME (only when an order is admitted). It decides every order in Lua, in order, from those values and what the orders
-- before it took. Then it writes once per batch: one HSET of every reservation, one HSET of the
-- new stock, one HSET of the admitted users' new counts (with a per-user limit only). What stays per order is one SET ... EX
-- per order that pins its idempotency key (a string with a TTL of its own; Redis 7.0 has no
-- per-field expiry), so a batch without keys costs four commands however many orders it holds (six with a
-- per-user limit).
--
-- A script stopped midway: nothing is written until every order is decided and every value to
-- write is computed, so a Lua error leaves nothing at all. The writes then are those few commands
-- with absolute values, the reservations first: the reads found the sale and users keys to be
-- hashes, SET overwrites any type, and Redis refuses a script's write (OOM, MISCONF, READONLY)
-- only in states it checks before the first one and that do not change while a script runs. So a
-- batch is written whole or not at all (and Redis 7 propagates a script's writes to the AOF and
-- replicas as one MULTI/EXEC), where the script of one write per order before it left whole
-- reservations only.
local sale, users, resv = KEYS[1], KEYS[2], KEYS[3]
local argv = ARGV -- a local: read four times per order
local idem_ttl, refusal_ttl = argv[1], tonumber(argv[2])
local nargs = #argv

local s = redis.call('HMGET', sale, 'stock', 'limit', 'pay_timeout_s', 'paused', 'shards', 'gen')
local stock, limit, pay_timeout = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
local paused = s[4]
-- a sharded sale: N, and this shard's number from its key's hash tag ({sku:ID/k}; {sku:ID} is 0)
local nshards, gen = tonumber(s[5]), s[6] or ''
if nshards and nshards < 2 then nshards = nil end
local shard = nshards and tonumber(string.match(sale, '^{sku:%d+/(%d+)}') or '0')
local out = {pay_timeout or 0, nshards or 0, gen}
local limit_ttl = refusal_ttl -- the per-user limit is exact on the home shard: pinned as usual
if nshards then refusal_ttl = 0 end -- a shard's sold_out is never final: not pinned

-- known: key name -> the value the key holds as the orders decided so far leave it (false: none)
local known = {}
if #KEYS > 3 then
    local v = redis.call('MGET', unpack(KEYS, 4))
    for k = 4, #KEYS do
        known[KEYS[k]] = v[k - 3]
    end
end

-- held: user_id -> units, read at the first order that needs a count, for that order's user and
-- every user after it (one HMGET; the orders before it needed none).
local held = nil
local function read_held(from)
    local names, listed = {}, {}
    for i = from, nargs, 4 do
        local u = argv[i]
        if not listed[u] then
            listed[u] = true
            names[#names + 1] = u
        end
    end
    local v = redis.call('HMGET', users, unpack(names))
    held = {}
    for j = 1, #names do
        held[names[j]] = tonumber(v[j] or '0')
    end
end

local entries = {} -- order_id, entry, ... for the reservations' HSET
local counted, changed = {}, {} -- the admitted users, in the order of their first admission
local pins = {} -- {k = index in KEYS, value, ttl} per key to write
local ts = nil

for i = 3, nargs, 4 do
    local user, qty, order_id = argv[i], tonumber(argv[i + 1]), argv[i + 2]
    local k = tonumber(argv[i + 3])
    local idem = k > 0 and KEYS[k] or nil
    local prev = idem and known[idem]
    if nshards and stock and tonumber(user) % nshards ~= shard then
        out[#out + 1] = {'moved', '', 0, pay_timeout}
    elseif prev then
        local sep = string.find(prev, ':', 1, true)
        out[#out + 1] = {'dup', string.sub(prev, sep + 1), string.sub(prev, 1, sep - 1), 0}
    elseif paused then
        out[#out + 1] = {'recovering', '', 0, 0}
    elseif not stock then
        out[#out + 1] = {'unknown_sku', '', 0, 0}
    else
        if limit > 0 and not held then read_held(i) end
        if limit > 0 and held[user] + qty > limit then
            if idem and limit_ttl > 0 then
                pins[#pins + 1] = {k = k, value = 'limit_exceeded:', ttl = limit_ttl}
                known[idem] = 'limit_exceeded:'
            end
            out[#out + 1] = {'limit_exceeded', '', stock, pay_timeout}
        elseif stock < qty then
            if idem and refusal_ttl > 0 then
                pins[#pins + 1] = {k = k, value = 'sold_out:', ttl = refusal_ttl}
                known[idem] = 'sold_out:'
            end
            out[#out + 1] = {'sold_out', '', stock, pay_timeout}
        else
            if not ts then
                local t = redis.call('TIME')
                ts = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
            end
            stock = stock - qty
            if limit > 0 then
                held[user] = held[user] + qty
                if not counted[user] then
                    counted[user] = true
                    changed[#changed + 1] = user
                end
            end
            entries[#entries + 1] = order_id
            entries[#entries + 1] = 'r:' .. user .. ':' .. qty .. ':' .. ts .. ':' .. (idem or '')
            if idem then
                pins[#pins + 1] = {k = k, value = 'pending:' .. order_id, ttl = idem_ttl}
                known[idem] = 'pending:' .. order_id
            end
            out[#out + 1] = stock
        end
    end
end

if #entries > 0 then
    local counts = {}
    for j = 1, #changed do
        counts[#counts + 1] = changed[j]
        counts[#counts + 1] = string.format('%d', held[changed[j]])
    end
    local left = string.format('%d', stock)
    redis.call('HSET', resv, unpack(entries))
    redis.call('HSET', sale, 'stock', left)
    if #counts > 0 then
        redis.call('HSET', users, unpack(counts))
    end
end
for j = 1, #pins do
    local p = pins[j]
    redis.call('SET', KEYS[p.k], p.value, 'EX', p.ttl)
end
return out
