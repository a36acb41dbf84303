//! Configuration: any environment starts the service or names what is
//! wrong, never a panic.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use connected_apps::config::Settings;
use libfuzzer_sys::fuzz_target;

/// The variables the service reads; the fuzzer picks among them and
/// writes any values.
const NAMES: [&str; 43] = [
    "APP_ENV",
    "PORT",
    "BIND_ADDRESS",
    "DATABASE_URL",
    "DATABASE_MAX_CONNECTIONS",
    "MIGRATE_ON_START",
    "USAGE_PARTITIONS_AHEAD_MONTHS",
    "USAGE_RETENTION_DAYS",
    "REDIS_URL",
    "REDIS_POOL_SIZE",
    "REDIS_TIMEOUT_MS",
    "REDIS_SETTLE_TIMEOUT_MS",
    "REDIS_KEY_PREFIX",
    "USAGE_STREAM_SHARDS",
    "JWT_SECRET",
    "JWT_ISSUER",
    "JWT_LEEWAY_SECS",
    "IDEMPOTENCY_TTL_SECS",
    "PAST_DUE_GRACE_HOURS",
    "FLUSH_BATCH_SIZE",
    "FLUSH_MAX_AGE_MS",
    "FLUSHER_WORKERS",
    "FLUSHER_CONSUMER",
    "FLUSH_CLAIM_IDLE_MS",
    "FLUSH_MAX_DELIVERIES",
    "ENABLE_BETA_APPS",
    "CORS_ORIGINS",
    "RATE_LIMIT_CONSUME_PER_HOUR",
    "RATE_LIMIT_CONSUME_BURST",
    "API_RATE_LIMIT_REDIS_URL",
    "STRIPE_API_BASE",
    "STRIPE_WEBHOOK_SECRET",
    "DATA_ENCRYPTION_KEYS",
    "PAYG_PRICE_CENTS_PER_1000_TOKENS",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HTTP_HEADER_TIMEOUT_SECS",
    "HTTP_BODY_TIMEOUT_SECS",
    "HTTP_REQUEST_TIMEOUT_SECS",
    "REBUILD_MAX_BACKLOG",
    "BILLING_PERIOD_SECONDS",
    "SENTRY_DSN",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

#[derive(Arbitrary, Debug)]
struct Environment {
    vars: Vec<(u8, String)>,
}

fuzz_target!(|env: Environment| {
    let vars: HashMap<String, String> = env
        .vars
        .into_iter()
        .map(|(name, value)| (NAMES[usize::from(name) % NAMES.len()].to_owned(), value))
        .collect();
    match Settings::from_map(&vars) {
        Ok(settings) => {
            assert!(settings.redis.pool_size >= 1);
            assert!(!settings.consume.idempotency_ttl.is_zero());
        }
        Err(e) => assert!(e.to_string().starts_with("invalid configuration: ")),
    }
});
