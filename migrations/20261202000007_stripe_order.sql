-- Billing that follows Stripe's real event order.
--
-- stripe_synced_at (0004) now holds only the `created` of the newest
-- subscription event applied to the current subscription (Stripe's clock,
-- whole seconds): our own calls to Stripe no longer write it, and it is
-- cleared when another subscription becomes the current one, so an event
-- is compared only with events of the same subscription.
ALTER TABLE customer_billing
    -- The end of the latest period an `invoice.paid` paid for: a failure
    -- of an invoice for a period already paid (delivered late) changes
    -- nothing.
    ADD COLUMN paid_through TIMESTAMP WITH TIME ZONE,
    -- While `past_due`: the end of the period whose invoice failed. Only
    -- an invoice paid for that period or a later one clears it; a paid
    -- invoice of an earlier period, redelivered, does not.
    ADD COLUMN past_due_until_paid TIMESTAMP WITH TIME ZONE;

ALTER TABLE token_purchases
    -- Tokens an open dispute took back (as far as they were unspent),
    -- given back if the merchant wins it.
    ADD COLUMN tokens_disputed INTEGER NOT NULL DEFAULT 0 CHECK (tokens_disputed >= 0);

-- The customer's Stripe customer id, sealed (`ledger::sealed`), stored as
-- soon as Stripe made it: before any subscription exists, so a retry after
-- a declined card finds it rather than making a second one.
ALTER TABLE customers ADD COLUMN stripe_customer_id TEXT;
UPDATE customers c SET stripe_customer_id = b.stripe_customer_id
    FROM customer_billing b WHERE b.customer_id = c.id AND b.stripe_customer_id IS NOT NULL;
