-- Operating the service: merchants' usage alerts and the time from an
-- activation to its first charge.

-- A merchant's usage alert settings (API.md "Usage alerts"). No row means
-- the defaults: thresholds 80 and 100, enabled, no URL.
CREATE TABLE usage_alert_settings (
    customer_id UUID PRIMARY KEY REFERENCES customers(id) ON DELETE CASCADE,
    webhook_url TEXT,
    thresholds SMALLINT[] NOT NULL DEFAULT '{80,100}',
    enabled BOOLEAN NOT NULL DEFAULT true,
    -- The deliveries' signing secret, sealed (`ledger::sealed`), made with
    -- the first URL and kept when the URL changes.
    signing_secret TEXT,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

-- Every crossing of a threshold, once per customer, period and threshold
-- (the consume that crossed it reports it in its usage event; the flusher
-- writes it with the event), and its delivery.
CREATE TABLE usage_alerts (
    -- Also the delivery's id: the same on every retry.
    id UUID PRIMARY KEY,
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    threshold SMALLINT NOT NULL CHECK (threshold BETWEEN 1 AND 100),
    period_start TIMESTAMP WITH TIME ZONE NOT NULL,
    period_end TIMESTAMP WITH TIME ZONE NOT NULL,
    tokens_used BIGINT NOT NULL,
    tokens_total BIGINT NOT NULL,
    crossed_at TIMESTAMP WITH TIME ZONE NOT NULL,
    -- pending (a URL was set at the crossing), delivered, failed (24 h of
    -- retries without a 2xx), none (no URL).
    delivery VARCHAR(20) NOT NULL CHECK (delivery IN ('pending', 'delivered', 'failed', 'none')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMP WITH TIME ZONE,
    last_error TEXT,
    delivered_at TIMESTAMP WITH TIME ZONE,
    UNIQUE (customer_id, period_end, threshold)
);
CREATE INDEX idx_usage_alerts_customer ON usage_alerts(customer_id, crossed_at DESC);
-- The delivery worker's queue.
CREATE INDEX idx_usage_alerts_due ON usage_alerts(next_attempt_at) WHERE delivery = 'pending';

-- When an activation was first charged: set once, by the flusher, with the
-- row that carried it (time_to_first_consume_seconds).
ALTER TABLE customer_apps ADD COLUMN first_used_at TIMESTAMP WITH TIME ZONE;
