-- 005_shards.sql - the Redis shards of a sale (docs/reservation.md, "Hot-SKU sharding").
-- Idempotent, like every migration. See docs/events.md (stock.set's `shards`).

-- A hot SKU's sale may be opened over N shards in Redis (its stock spread over N keys with
-- different hash tags, on different primaries of a cluster). PostgreSQL keeps one row per SKU
-- whatever N is: its stock is the whole sale's. The consumer writes `shards` from the stock.set
-- that opened the sale (1 when the event has none), and the reaper reads it to find an order's
-- home shard (user_id mod shards) and to rebuild or audit every shard of the sale. Fixed for the
-- life of the sale.
ALTER TABLE inventory ADD COLUMN IF NOT EXISTS shards integer NOT NULL DEFAULT 1;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'inventory_shards_range') THEN
        ALTER TABLE inventory ADD CONSTRAINT inventory_shards_range CHECK (shards BETWEEN 1 AND 16);
    END IF;
END $$;
