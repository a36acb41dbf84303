-- Counters that sum usage widen to BIGINT. A consume may charge up to
-- 2^31 - 1 tokens, and an unlimited plan at the hot path's throughput
-- passes 2^31 tokens, or events, of one customer in days: an INTEGER sum
-- would then make every later flush of that customer fail.
ALTER TABLE customer_billing
    ALTER COLUMN tokens_used TYPE BIGINT,
    ALTER COLUMN tokens_remaining TYPE BIGINT;

ALTER TABLE usage_analytics_daily
    ALTER COLUMN events_count TYPE BIGINT,
    ALTER COLUMN sessions_count TYPE BIGINT,
    ALTER COLUMN unique_users TYPE BIGINT,
    ALTER COLUMN processing_time_samples TYPE BIGINT;
