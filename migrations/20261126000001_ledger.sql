-- The durable ledger. Tables and indexes of the specification, names and
-- columns kept, plus what they reference or need: customers, embed API
-- keys, grants, API idempotency and Stripe webhook bookkeeping.

CREATE TABLE customers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(200) NOT NULL,
    email VARCHAR(320) NOT NULL UNIQUE,
    -- Pay-as-you-go balance: credited by purchases and grants, drawn by
    -- usage rows (kept in step by the flusher). Purchased tokens never expire.
    purchased_tokens_credited BIGINT NOT NULL DEFAULT 0 CHECK (purchased_tokens_credited >= 0),
    purchased_tokens_used BIGINT NOT NULL DEFAULT 0 CHECK (purchased_tokens_used >= 0),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE TABLE apps (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(100) NOT NULL,
    slug VARCHAR(50) UNIQUE NOT NULL,
    description TEXT,
    category VARCHAR(50) NOT NULL,
    token_cost INTEGER NOT NULL CHECK (token_cost > 0),
    status VARCHAR(20) DEFAULT 'available' CHECK (status IN ('available', 'beta', 'deprecated', 'disabled')),
    configuration_schema JSONB NOT NULL DEFAULT '{}',
    features JSONB NOT NULL DEFAULT '[]',
    documentation_url VARCHAR(255),
    icon_url VARCHAR(255),
    embed_script_url VARCHAR(255),
    pricing_tier VARCHAR(20) DEFAULT 'starter' CHECK (pricing_tier IN ('starter', 'professional', 'enterprise')),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE customer_apps (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    app_id UUID NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    status VARCHAR(20) DEFAULT 'active' CHECK (status IN ('active', 'paused', 'disabled')),
    configuration JSONB NOT NULL DEFAULT '{}',
    embed_code TEXT,
    activated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    last_used_at TIMESTAMP WITH TIME ZONE,
    UNIQUE(customer_id, app_id)
);

-- Partitioned by month on created_at; the service creates partitions ahead
-- of time (src/ledger/partitions.rs). The key includes created_at because a
-- partitioned table's unique constraints must; `id` is the usage event's
-- UUIDv7 and `created_at` the time Redis charged it, both fixed by the
-- event, so a redelivered event conflicts with its first row.
CREATE TABLE token_usage (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    app_id UUID NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    tokens_consumed INTEGER NOT NULL CHECK (tokens_consumed > 0),
    -- How many of tokens_consumed came from purchased tokens (the rest from
    -- the period's allowance); a rebuild of the hot state needs it.
    purchased_tokens_consumed INTEGER NOT NULL DEFAULT 0
        CHECK (purchased_tokens_consumed >= 0 AND purchased_tokens_consumed <= tokens_consumed),
    session_id VARCHAR(100),
    metadata JSONB DEFAULT '{}',
    ip_address INET,
    user_agent TEXT,
    embed_key_id UUID,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE billing_plans (
    id VARCHAR(50) PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    description TEXT,
    tokens_per_month INTEGER NOT NULL CHECK (tokens_per_month >= -1), -- -1 for unlimited
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    billing_cycle VARCHAR(20) DEFAULT 'monthly' CHECK (billing_cycle IN ('monthly', 'yearly')),
    stripe_price_id VARCHAR(100) UNIQUE,
    features JSONB DEFAULT '[]',
    -- Apps of this tier and below are open to the plan's customers.
    tier VARCHAR(20) NOT NULL DEFAULT 'starter' CHECK (tier IN ('starter', 'professional', 'enterprise')),
    is_active BOOLEAN DEFAULT true,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

CREATE TABLE customer_billing (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    plan_id VARCHAR(50) NOT NULL REFERENCES billing_plans(id),
    stripe_subscription_id VARCHAR(100) UNIQUE,
    stripe_customer_id VARCHAR(100),
    tokens_used INTEGER DEFAULT 0 CHECK (tokens_used >= 0),
    tokens_remaining INTEGER,
    billing_cycle_start TIMESTAMP WITH TIME ZONE,
    billing_cycle_end TIMESTAMP WITH TIME ZONE,
    status VARCHAR(20) DEFAULT 'active' CHECK (status IN ('active', 'past_due', 'canceled', 'unpaid')),
    -- When the subscription became past_due; consumes stop after the grace period.
    past_due_since TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE(customer_id)
);

CREATE TABLE token_purchases (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    tokens_purchased INTEGER NOT NULL CHECK (tokens_purchased > 0),
    price_cents INTEGER NOT NULL CHECK (price_cents > 0),
    stripe_payment_intent_id VARCHAR(100) UNIQUE,
    status VARCHAR(20) DEFAULT 'pending' CHECK (status IN ('pending', 'completed', 'failed', 'refunded')),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);

-- Tokens an operator adds by hand (POST /api/v1/admin/customers/{id}/grants).
CREATE TABLE token_grants (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    tokens INTEGER NOT NULL CHECK (tokens > 0),
    reason TEXT NOT NULL,
    granted_by VARCHAR(100),
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE TABLE usage_analytics_daily (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    app_id UUID NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    date DATE NOT NULL,
    tokens_consumed INTEGER DEFAULT 0,
    sessions_count INTEGER DEFAULT 0,
    unique_users INTEGER DEFAULT 0,
    avg_processing_time_ms DECIMAL(10,2),
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE(customer_id, app_id, date)
);

-- Embed keys for shoppers' browsers. Only a SHA-256 of the key is kept:
-- the key is 256 random bits, so a fast hash is as safe as bcrypt and
-- costs microseconds on the consume path instead of tens of milliseconds.
CREATE TABLE embed_api_keys (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id UUID NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    name VARCHAR(100),
    key_hash BYTEA NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    -- The first characters of the key, shown in listings so a merchant can tell keys apart.
    key_prefix VARCHAR(20) NOT NULL,
    app_permissions TEXT[] NOT NULL CHECK (cardinality(app_permissions) > 0),
    rate_limit INTEGER NOT NULL CHECK (rate_limit > 0),
    allowed_origins TEXT[] NOT NULL DEFAULT '{}',
    expires_at TIMESTAMP WITH TIME ZONE,
    revoked_at TIMESTAMP WITH TIME ZONE,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

-- Idempotency of the Postgres-backed POSTs (admin, billing); the consume
-- path keeps its own in Redis.
CREATE TABLE idempotency_keys (
    customer_id UUID NOT NULL,
    idempotency_key VARCHAR(255) NOT NULL,
    request_fingerprint CHAR(64) NOT NULL,
    response_status SMALLINT NOT NULL,
    response_body JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (customer_id, idempotency_key)
);

-- Each Stripe event is applied at most once.
CREATE TABLE stripe_webhook_events (
    id VARCHAR(255) PRIMARY KEY,
    event_type VARCHAR(100) NOT NULL,
    stripe_created_at TIMESTAMP WITH TIME ZONE NOT NULL,
    processed_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW()
);

-- Token usage indexes
CREATE INDEX idx_token_usage_customer_created ON token_usage(customer_id, created_at DESC);
CREATE INDEX idx_token_usage_app_created ON token_usage(app_id, created_at DESC);
CREATE INDEX idx_token_usage_session ON token_usage(session_id);
CREATE INDEX idx_token_usage_created_at ON token_usage(created_at);

-- Customer apps indexes
CREATE INDEX idx_customer_apps_customer ON customer_apps(customer_id);
CREATE INDEX idx_customer_apps_status ON customer_apps(status);
CREATE INDEX idx_customer_apps_last_used ON customer_apps(last_used_at DESC);

-- Analytics indexes
CREATE INDEX idx_usage_analytics_customer_date ON usage_analytics_daily(customer_id, date DESC);
CREATE INDEX idx_usage_analytics_app_date ON usage_analytics_daily(app_id, date DESC);

-- Billing indexes
CREATE INDEX idx_customer_billing_customer ON customer_billing(customer_id);
CREATE INDEX idx_customer_billing_stripe_sub ON customer_billing(stripe_subscription_id);
CREATE INDEX idx_customer_billing_cycle ON customer_billing(billing_cycle_start, billing_cycle_end);

-- Needed by what the specification adds
CREATE INDEX idx_embed_api_keys_customer ON embed_api_keys(customer_id);
CREATE INDEX idx_token_purchases_customer ON token_purchases(customer_id);
CREATE INDEX idx_token_grants_customer ON token_grants(customer_id);
