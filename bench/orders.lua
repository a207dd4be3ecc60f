-- orders.lua - a wrk script: POST /v1/orders for one SKU, answers counted by status.
--
-- Settings come from the environment, because wrk decides at load time whether the script
-- paces its requests (it looks for a global delay function before any init(args) runs):
--   ORDERS_SKU      the sku_id to order (required)
--   ORDERS_USERS    user ids are drawn uniformly from 1..ORDERS_USERS (default 1000000)
--   ORDERS_RATE     if set and > 0: the total rate to offer, in requests/s (see "Pacing")
--   ORDERS_THREADS  wrk's -t, needed to split ORDERS_RATE over the threads (default 1)
--
-- Every request is {"user_id": U, "sku_id": S, "qty": 1} with Content-Type application/json and
-- no Idempotency-Key. Each thread formats POOL_SIZE requests with users drawn uniformly from
-- 1..ORDERS_USERS once, in init(), and request() hands them out in turn: formatting a request per
-- send cost wrk about 4 us of CPU each (measured), taken from the producer it shares the cores
-- with. A user thus orders every POOL_SIZE * ORDERS_THREADS requests, well under USER_RATE_LIMIT. done() prints one machine-readable line:
--   orders-result c202=N c409=N other=N connect_err=N read_err=N write_err=N timeout_err=N
--                 duration_us=N mean_us=N p50_us=N p99_us=N max_us=N paced=0|1 offered_rps=N
-- where c202/c409/other count HTTP answers by status; the *_err are wrk's socket errors (no
-- answer at all).
--
-- Pacing. wrk is closed-loop: each connection sends its next request when the previous answer
-- arrives. With ORDERS_RATE set, each thread keeps a schedule of send times spaced
-- ORDERS_THREADS / ORDERS_RATE seconds apart and delay() holds a connection until its slot, so
-- the offered rate is about ORDERS_RATE for as long as enough connections are free. That is only
-- approximately open-loop: wrk's timers have millisecond resolution, a slot missed while every
-- connection was busy is sent late (the schedule catches up in a burst), and wrk measures
-- latency from the moment a request is written, not from its slot, so queueing before the send
-- is not in the figures (coordinated omission). Compare the achieved rate with the offered one.

local sku = tonumber(os.getenv("ORDERS_SKU") or "")
if sku == nil then
    error("orders.lua: set ORDERS_SKU to the sku_id to order")
end
local nusers = tonumber(os.getenv("ORDERS_USERS") or "") or 1000000
local rate = tonumber(os.getenv("ORDERS_RATE") or "") or 0
local nthreads = tonumber(os.getenv("ORDERS_THREADS") or "") or 1

local headers = { ["Content-Type"] = "application/json" }
local sku_part = ',"sku_id":' .. string.format("%d", sku) .. ',"qty":1}'

-- ---- main state: one table of the threads, read back in done() ----

local threads = {}

function setup(thread)
    threads[#threads + 1] = thread
    thread:set("thread_no", #threads)
end

-- ---- per thread (each has its own Lua state) ----

c202, c409, cother = 0, 0, 0

local POOL_SIZE = 16384
local pool, next_req = {}, 0

function init(args)
    -- thread_no was set by setup() before init runs; mix it in so threads draw different users.
    math.randomseed(os.time() * 1000 + (thread_no or 0) * 7919)
    for i = 1, POOL_SIZE do
        local body = '{"user_id":' .. string.format("%d", math.random(1, nusers)) .. sku_part
        pool[i] = wrk.format("POST", "/v1/orders", headers, body)
    end
end

function request()
    next_req = next_req % POOL_SIZE + 1
    return pool[next_req]
end

function response(status, hdrs, body)
    if status == 202 then
        c202 = c202 + 1
    elseif status == 409 then
        c409 = c409 + 1
    else
        cother = cother + 1
    end
end

if rate > 0 then
    local ok, ffi = pcall(require, "ffi")
    local now_ms
    if ok then
        ffi.cdef([[
            typedef struct { long tv_sec; long tv_nsec; } orders_timespec;
            int clock_gettime(int clk_id, orders_timespec *tp);
        ]])
        local ts = ffi.new("orders_timespec")
        now_ms = function()
            ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
            return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
        end
    end
    local interval_ms = 1000 * nthreads / rate
    local next_ms = nil
    if now_ms then
        function delay()
            local now = now_ms()
            if next_ms == nil then
                next_ms = now
            end
            local wait = next_ms - now
            next_ms = next_ms + interval_ms
            return wait > 0 and wait or 0
        end
    else
        -- No clock without LuaJIT's ffi: a fixed pause per connection between answer and
        -- request. Cruder (the rate drops as latency grows), still bounded by ORDERS_RATE.
        function delay()
            return interval_ms
        end
    end
end

-- ---- main state again, after the run ----

function done(summary, latency, requests)
    local a, b, o = 0, 0, 0
    for _, t in ipairs(threads) do
        a = a + t:get("c202")
        b = b + t:get("c409")
        o = o + t:get("cother")
    end
    local e = summary.errors
    io.write(string.format(
        "orders-result c202=%d c409=%d other=%d connect_err=%d read_err=%d write_err=%d " ..
        "timeout_err=%d duration_us=%d mean_us=%d p50_us=%d p99_us=%d max_us=%d paced=%d offered_rps=%d\n",
        a, b, o, e.connect, e.read, e.write, e.timeout, summary.duration, math.floor(latency.mean),
        math.floor(latency:percentile(50)), math.floor(latency:percentile(99)), latency.max,
        rate > 0 and 1 or 0, rate))
end
