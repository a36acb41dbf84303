-- Daily aggregates kept exact by the flusher.
--
-- `usage_analytics_daily` gains what an exact running update needs: the
-- number of events, and the processing-time sum and sample count from which
-- `avg_processing_time_ms` is derived (an average of averages would drift).
-- `tokens_consumed` widens to BIGINT: an unlimited plan can pass 2^31
-- tokens of one app in a day.
ALTER TABLE usage_analytics_daily
    ALTER COLUMN tokens_consumed TYPE BIGINT,
    ALTER COLUMN tokens_consumed SET NOT NULL,
    ALTER COLUMN sessions_count SET NOT NULL,
    ALTER COLUMN unique_users SET NOT NULL,
    ADD COLUMN events_count INTEGER NOT NULL DEFAULT 0,
    -- Sum of metadata.processing_time_ms, in microseconds, and how many
    -- events carried it.
    ADD COLUMN processing_time_total_us BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN processing_time_samples INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW();

-- The distinct sessions and visitors already counted for a customer, app
-- and (UTC) day, so a session seen again in a later batch is not counted
-- twice. `kind` is 's' (session_id) or 'v' (visitor: metadata.visitor_id,
-- else IP address and user agent); `hash` is the first 16 bytes of the
-- SHA-256 of the kind and identity, stored as a UUID: fixed width, so the
-- key compares fast. The primary key makes two flushers racing over the
-- same identity count it once: the second insert waits for the first to
-- commit, then does nothing.
--
-- Partitioned by month like token_usage and dropped with it by the
-- retention job: an event older than the retention period is never
-- flushed late, so its day's sets are no longer needed.
CREATE TABLE usage_daily_distinct (
    customer_id UUID NOT NULL,
    app_id UUID NOT NULL,
    date DATE NOT NULL,
    hash UUID NOT NULL,
    kind "char" NOT NULL CHECK (kind IN ('s', 'v')),
    PRIMARY KEY (customer_id, app_id, date, hash)
) PARTITION BY RANGE (date);

-- token_usage takes every consume, tens of thousands a second; each index
-- and foreign key costs the flusher on every row (together about half of
-- the insert, measured in benches/RESULTS.md).
-- - The foreign keys go: the flusher writes only events that the consume
--   script charged to a loaded customer for an app of the catalog, and a
--   ledger keeps its usage rows when a customer is deleted.
-- - `idx_token_usage_created_at` goes: time ranges are served by partition
--   pruning and `idx_token_usage_customer_created`, and retention drops
--   whole partitions.
-- - `idx_token_usage_session` goes: sessions are counted in the daily
--   aggregates; a session's events are found by customer and time.
-- - `idx_token_usage_app_created` goes: an app's usage over time is read
--   from `usage_analytics_daily` (`idx_usage_analytics_app_date`).
ALTER TABLE token_usage DROP CONSTRAINT token_usage_customer_id_fkey;
ALTER TABLE token_usage DROP CONSTRAINT token_usage_app_id_fkey;
DROP INDEX idx_token_usage_created_at;
DROP INDEX idx_token_usage_session;
DROP INDEX idx_token_usage_app_created;

-- The usage report reads a customer's days with their app, tokens and
-- sessions: a covering index lets it do so from the index alone once the
-- days are settled (all-visible), a year of ten apps in a few milliseconds.
DROP INDEX idx_usage_analytics_customer_date;
CREATE INDEX idx_usage_analytics_customer_date ON usage_analytics_daily (customer_id, date)
    INCLUDE (app_id, tokens_consumed, sessions_count);
