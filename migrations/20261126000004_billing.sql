-- Billing: plan changes at the period's end, Stripe ordering, encrypted
-- Stripe customer ids, refunds of purchases.

ALTER TABLE customer_billing
    -- The day periods are counted from: period n ends at anchor + n months
    -- (clamped to the month's last day), so a period starting on the 31st
    -- does not drift to the 28th after February.
    ADD COLUMN billing_anchor TIMESTAMP WITH TIME ZONE,
    -- A downgrade waits here for the period's end.
    ADD COLUMN pending_plan_id VARCHAR(50) REFERENCES billing_plans(id),
    ADD COLUMN cancel_at_period_end BOOLEAN NOT NULL DEFAULT false,
    -- `created` of the newest Stripe event applied to this subscription:
    -- an older event delivered late is not applied over a newer state.
    ADD COLUMN stripe_synced_at TIMESTAMP WITH TIME ZONE,
    -- AES-256-GCM ciphertext (`v1:<key id>:<base64>`), longer than Stripe's id.
    ALTER COLUMN stripe_customer_id TYPE TEXT;

UPDATE customer_billing SET billing_anchor = billing_cycle_start WHERE billing_anchor IS NULL;

ALTER TABLE token_purchases
    ADD COLUMN tokens_refunded INTEGER NOT NULL DEFAULT 0 CHECK (tokens_refunded >= 0),
    ADD COLUMN completed_at TIMESTAMP WITH TIME ZONE;

-- The scheduled rollover looks for periods that have ended.
CREATE INDEX idx_customer_billing_cycle_end ON customer_billing(billing_cycle_end)
    WHERE stripe_subscription_id IS NULL;
