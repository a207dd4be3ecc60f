-- 003_reaper.sql - the reaper's own bookkeeping: which events it asked for, and which Redis it
-- last reconciled. Idempotent, like every migration. See docs/reaper.md.

-- Events the reaper published and waits to see applied: an order.expired ('expire') or an
-- order.voided ('void'). A sweep claims an order by inserting (or, after EXPIRY_RETRY_MS,
-- re-stamping) its row in a one-statement transaction; only the replica whose statement returned
-- the row publishes, so replicas never publish the same request twice in one period, and no lock
-- is held while Kafka answers. Rows are deleted once the consumer has decided the order.
CREATE TABLE IF NOT EXISTS reaper_requests (
    order_id     text        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('expire', 'void')),
    sku_id       bigint      NOT NULL CHECK (sku_id > 0),
    requested_at timestamptz NOT NULL,
    requested_by text        NOT NULL,   -- WORKER_ID of the replica that published last
    attempts     integer     NOT NULL DEFAULT 1 CHECK (attempts > 0),
    PRIMARY KEY (order_id, kind)
);

-- Facts about Redis the reaper checks on every sweep to notice that Redis lost data:
--   redis_epoch   the random token it wrote to Redis (key stockpipe:reaper:epoch) after the last
--                 complete reconcile; a Redis without it has been emptied or replaced
--   redis_run_id  the server's run_id then (changes on every restart)
--   redis_replid  the server's master_replid then (changes when a replica is promoted)
CREATE TABLE IF NOT EXISTS reaper_state (
    name       text        PRIMARY KEY,
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
