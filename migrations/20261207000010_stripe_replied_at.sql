-- When Stripe's state of the subscription was last written from Stripe
-- itself (the reply to our own call, a read-back, the reconciliation)
-- rather than from an event: an event of the same subscription created
-- before it, or in the same seconds, may be older or newer than that
-- state, and is applied as Stripe's state read anew
-- (src/domain/stripe_events/mod.rs).
ALTER TABLE customer_billing ADD COLUMN stripe_read_at TIMESTAMP WITH TIME ZONE;
