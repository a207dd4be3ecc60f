-- 001_init.sql - the data model: inventory, orders, consumed offsets, stock-return ledger.
-- Idempotent: every object is created only if missing, so running it twice changes nothing.
-- Names are kept stable on purpose: operators and auditors query these tables directly.

-- One row per SKU put on sale. `stock` is what PostgreSQL still holds; it only leaves through the
-- consumer's versioned optimistic update
--   UPDATE inventory SET stock = stock - n, version = version + 1
--    WHERE sku_id = $1 AND version = $2 AND stock >= n
-- and the CHECK below is the last line of defence: stock can never go below zero.
CREATE TABLE IF NOT EXISTS inventory (
    sku_id          bigint      PRIMARY KEY CHECK (sku_id > 0),
    stock           bigint      NOT NULL CHECK (stock >= 0),
    version         bigint      NOT NULL DEFAULT 0,
    supplied        bigint      NOT NULL CHECK (supplied >= 0),   -- opened + restocked, in total
    per_user_limit  integer     NOT NULL CHECK (per_user_limit >= 0), -- 0 = no limit
    pay_timeout_s   integer     NOT NULL CHECK (pay_timeout_s > 0),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);

-- One row per order that reached the log. Times come from the events (not now()), so a replay of
-- the log rebuilds the very same rows.
CREATE TABLE IF NOT EXISTS orders (
    order_id        text        PRIMARY KEY,
    user_id         bigint      NOT NULL CHECK (user_id > 0),
    sku_id          bigint      NOT NULL CHECK (sku_id > 0),
    qty             integer     NOT NULL CHECK (qty > 0),
    status          text        NOT NULL
                    CHECK (status IN ('pending', 'paid', 'expired', 'rejected', 'cancelled')),
    reject_reason   text,                                  -- why a 'rejected' order was refused
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    paid_at         timestamptz,
    closed_at       timestamptz,                           -- when it became expired/cancelled
    refund_due      boolean     NOT NULL DEFAULT false,    -- paid after it had expired
    kafka_partition integer,                               -- where its order.created sits
    kafka_offset    bigint,
    CHECK (status <> 'rejected' OR reject_reason IS NOT NULL),
    CHECK (expires_at >= created_at)
);

-- The reaper's sweep: pending orders by deadline, without scanning the whole table.
CREATE INDEX IF NOT EXISTS orders_pending_by_expiry ON orders (expires_at) WHERE status = 'pending';
-- Per-user counts (reconcile) and per-SKU audits.
CREATE INDEX IF NOT EXISTS orders_by_sku_user ON orders (sku_id, user_id);

-- The next Kafka offset to apply, per partition, written in the same transaction as the batch it
-- follows. The consumer seeks here on start and on every assignment: this, not Kafka's committed
-- group offset, is what makes the effect of each event exactly-once.
CREATE TABLE IF NOT EXISTS consumer_offsets (
    topic           text        NOT NULL,
    partition       integer     NOT NULL CHECK (partition >= 0),
    next_offset     bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- The stock-return ledger: one row per order whose stock went back to `inventory` (expired, or a
-- voided reservation). The primary key makes a second return of the same order impossible. The
-- reaper gives each row's qty back to Redis once, then stamps returned_to_redis_at.
CREATE TABLE IF NOT EXISTS stock_returns (
    order_id             text        PRIMARY KEY,
    sku_id               bigint      NOT NULL CHECK (sku_id > 0),
    user_id              bigint      NOT NULL CHECK (user_id > 0),
    qty                  integer     NOT NULL CHECK (qty > 0),
    reason               text        NOT NULL CHECK (reason IN ('expired', 'voided')),
    created_at           timestamptz NOT NULL,
    returned_to_redis_at timestamptz
);

-- The reaper's drain: rows not yet given back to Redis.
CREATE INDEX IF NOT EXISTS stock_returns_not_returned
    ON stock_returns (created_at) WHERE returned_to_redis_at IS NULL;
