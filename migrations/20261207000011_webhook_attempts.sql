-- Merchants' webhooks as Svix and Stripe run theirs: every attempt kept,
-- secrets rotated with an overlap, endpoints that only fail disabled.

-- Every attempt to deliver a crossing: by the worker (`scheduled`) or asked
-- for by the merchant (`resend`). Kept as long as its crossing.
CREATE TABLE usage_alert_attempts (
    id BIGSERIAL PRIMARY KEY,
    alert_id UUID NOT NULL REFERENCES usage_alerts(id) ON DELETE CASCADE,
    attempted_at TIMESTAMP WITH TIME ZONE NOT NULL,
    trigger VARCHAR(20) NOT NULL CHECK (trigger IN ('scheduled', 'resend')),
    url TEXT NOT NULL,
    -- The receiver's answer, when there was one.
    http_status SMALLINT,
    -- Why it did not land: a refused address, a network error, a non-2xx.
    error TEXT,
    latency_ms INTEGER NOT NULL,
    -- The start of the answer's body (egress::EXCERPT_BYTES).
    response_excerpt TEXT,
    -- When the worker tries again after this attempt; NULL when it will
    -- not (delivered, given up, or a resend).
    next_attempt_at TIMESTAMP WITH TIME ZONE
);
CREATE INDEX idx_usage_alert_attempts_alert ON usage_alert_attempts(alert_id, attempted_at);

ALTER TABLE usage_alert_settings
    -- After a rotation: the secret before it, sealed, signing too until
    -- previous_secret_expires_at.
    ADD COLUMN previous_signing_secret TEXT,
    ADD COLUMN previous_secret_expires_at TIMESTAMP WITH TIME ZONE,
    -- The first failed attempt since the last delivered one.
    ADD COLUMN failing_since TIMESTAMP WITH TIME ZONE,
    -- Set when every attempt failed for ALERT_ENDPOINT_DISABLE_AFTER_HOURS;
    -- cleared when the merchant saves the URL again.
    ADD COLUMN disabled_at TIMESTAMP WITH TIME ZONE,
    ADD COLUMN disabled_reason TEXT;

-- `disabled`: the crossing came while the endpoint was disabled; it is
-- recorded and can be resent, but not tried.
ALTER TABLE usage_alerts DROP CONSTRAINT usage_alerts_delivery_check;
ALTER TABLE usage_alerts ADD CONSTRAINT usage_alerts_delivery_check
    CHECK (delivery IN ('pending', 'delivered', 'failed', 'none', 'disabled'));
