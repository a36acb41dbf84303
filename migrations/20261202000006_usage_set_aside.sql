-- The details of usage events Postgres refused as sent (metadata with a
-- number jsonb cannot hold, a session id longer than its column, …). The
-- flusher then stores the charge itself (ids, tokens, time) in
-- token_usage, so no charge is lost for what came with it, and keeps the
-- event's details here, as the stream held them, for an operator to read.
CREATE TABLE usage_set_aside (
    event_id UUID PRIMARY KEY,
    customer_id UUID NOT NULL,
    -- The event's `d` field, byte for byte (it may hold what text cannot).
    details BYTEA NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);
