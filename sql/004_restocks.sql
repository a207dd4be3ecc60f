-- 004_restocks.sql - the restocks applied once: one row per keyed stock.add the consumer applied.
-- Idempotent, like every migration. See docs/consumer.md and docs/events.md.

-- A stock.add may carry a request_id (the admin call's Idempotency-Key, or an id the producer made
-- for it). A producer may publish the same restock twice (an admin's retry after a failure between
-- the publish and Redis), so PostgreSQL applies one (sku_id, request_id) once: the consumer inserts
-- the row in the transaction of the batch that applied it, and a later stock.add with the same
-- pair is a duplicate that changes nothing. A stock.add without request_id (events from before it)
-- is applied every time and has no row. Times come from the event (ts_ms) and the position from
-- Kafka, so a replay of the log rebuilds the very same rows (but stored_at, applied_to_redis_at).
-- The reaper gives each row to Redis once (restock.lua records the request ids it applied in the
-- Redis hash {sku:ID}:restocks) and stamps applied_to_redis_at.
CREATE TABLE IF NOT EXISTS restocks (
    sku_id              bigint      NOT NULL CHECK (sku_id > 0),
    request_id          text        NOT NULL,
    add_units           bigint      NOT NULL CHECK (add_units > 0),
    created_at          timestamptz NOT NULL,    -- the event's ts_ms
    kafka_partition     integer,
    kafka_offset        bigint,
    stored_at           timestamptz NOT NULL DEFAULT now(),
    applied_to_redis_at timestamptz,             -- the reaper stamps it once Redis holds the restock
    PRIMARY KEY (sku_id, request_id)
);

-- The reaper's drain: rows Redis does not hold yet.
CREATE INDEX IF NOT EXISTS restocks_not_applied ON restocks (stored_at) WHERE applied_to_redis_at IS NULL;
