-- One billing change of a customer at a time, held without a connection:
-- a lease row with an expiry (src/ledger/leases.rs). A process that dies
-- holding one leaves it until it expires.
CREATE TABLE billing_leases (
    customer_id UUID PRIMARY KEY,
    holder UUID NOT NULL,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL
);
