//! Configuration, read once from the environment and validated at start.
//!
//! Names follow the specification and API.md (`DATABASE_URL`, `REDIS_URL`,
//! `JWT_SECRET`, …). With nothing set the service runs against Redis and
//! Postgres on localhost with development secrets and says so in its log;
//! with `APP_ENV=production` a missing or weak secret refuses to start.
//! Secrets are wrapped in [`Secret`], whose `Debug` never prints them.

use crate::period::Cadence;
use std::{collections::HashMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

/// A value that must never reach a log line.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which parts of the service this process runs. `serve` runs all of them by
/// default; a deployment that scales them apart runs one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub flusher: bool,
    pub scheduler: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        flusher: true,
        scheduler: true,
    };
    pub const API_ONLY: Roles = Roles {
        api: true,
        flusher: false,
        scheduler: false,
    };
}

impl FromStr for Roles {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = Roles {
            api: false,
            flusher: false,
            scheduler: false,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => roles = Roles::ALL,
                "api" => roles.api = true,
                "flusher" => roles.flusher = true,
                "scheduler" => roles.scheduler = true,
                other => {
                    return Err(format!(
                        "unknown role `{other}` (expected api, flusher, scheduler or all)"
                    ))
                }
            }
        }
        if roles
            == (Roles {
                api: false,
                flusher: false,
                scheduler: false,
            })
        {
            return Err("no role given".into());
        }
        Ok(roles)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: SocketAddr,
    pub production: bool,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub consume: ConsumeSettings,
    pub flusher: FlusherSettings,
    pub rate_limits: RateLimitSettings,
    pub stripe: StripeSettings,
    /// `DATA_ENCRYPTION_KEYS`: the key ring sealing secrets at rest
    /// (`ledger::sealed`), first key sealing.
    pub data_encryption_keys: Secret,
    pub cors_origins: Vec<String>,
    /// `ENABLE_BETA_APPS`: beta apps are listed in the catalog.
    pub enable_beta_apps: bool,
    /// `ENABLE_USAGE_ALERTS` (true): merchants are told when their period
    /// usage crosses a threshold of their allowance.
    pub enable_usage_alerts: bool,
    /// `USAGE_ALERT_RETRY_BASE_MS` (30000): the first wait before a failed
    /// alert delivery is tried again; it doubles each time, up to an hour.
    pub usage_alert_retry_base: Duration,
    pub webhooks: WebhookSettings,
    pub log_level: String,
    pub log_json: bool,
    /// `SENTRY_DSN`: errors and panics reported to Sentry, when set.
    pub sentry_dsn: Option<Secret>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`: spans exported over OTLP/HTTP
    /// (protobuf) to `<endpoint>/v1/traces`, when set.
    pub otlp_endpoint: Option<String>,
    pub http: HttpSettings,
    /// True when some setting fell back to a development default.
    pub uses_dev_defaults: bool,
}

/// Merchants' webhooks (usage alerts) and what they may reach
/// (`egress`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `ALERT_WEBHOOK_ALLOW_CIDRS` (empty): ranges a webhook may reach
    /// although they are internal, for on-premises receivers.
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// `ALERT_SECRET_OVERLAP_HOURS` (24): after a rotation, deliveries
    /// are signed with the old secret too for this long.
    pub secret_overlap: Duration,
    /// `ALERT_ENDPOINT_DISABLE_AFTER_HOURS` (24): an endpoint that failed
    /// every attempt for this long is disabled.
    pub disable_after: Duration,
}

/// How long a client may take to send a request. Defaults are a reverse
/// proxy's (nginx gives 60 s to headers and body each; these are tighter
/// for an API whose requests are small): a client that trickles its
/// request holds a connection no longer than these.
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// `HTTP_HEADER_TIMEOUT_SECS` (30): the whole header block must arrive
    /// within this, counted from when the server starts waiting for it, so
    /// it also closes keep-alive connections idle this long (hyper's
    /// header read timeout).
    pub header_timeout: Duration,
    /// `HTTP_BODY_TIMEOUT_SECS` (30): the longest wait for the next piece
    /// of a body (nginx's `client_body_timeout`).
    pub body_timeout: Duration,
    /// `HTTP_REQUEST_TIMEOUT_SECS` (60): the whole body must have arrived
    /// this long after the request began, however steadily it trickles.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: Secret,
    pub max_connections: u32,
    /// Apply migrations when `serve` starts (the `migrate` command always does).
    pub migrate_on_start: bool,
    /// Monthly `token_usage` partitions kept ready beyond the current month.
    pub partitions_ahead_months: u32,
    /// Raw usage rows older than this many days are dropped, a month's
    /// partition at a time; the daily aggregates are kept.
    pub usage_retention_days: u32,
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: Secret,
    pub pool_size: usize,
    /// Prefix of every key; tests give each instance its own.
    pub key_prefix: String,
    /// Usage streams the events are spread over. Fixed for the life of a
    /// deployment: it decides which slot holds each customer's keys.
    pub stream_shards: u16,
    /// Deadline for an answer from Redis on a request path. Past it the
    /// request fails with 503 `unavailable` (see `hot/charge.rs` for how a
    /// consume splits it).
    pub timeout: Duration,
    /// How long a consume whose reply was late waits to read its outcome
    /// record; default 40 % of `timeout`.
    pub settle_timeout: Duration,
    /// `REBUILD_MAX_BACKLOG`: the most unflushed entries of a shard stream
    /// a rebuild reads to count a customer's charges the ledger lacks;
    /// beyond, it answers 503 until the flusher catches up.
    pub rebuild_max_backlog: usize,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub jwt_secret: Secret,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub jwt_leeway_secs: u64,
}

#[derive(Debug, Clone)]
pub struct ConsumeSettings {
    pub idempotency_ttl: Duration,
    /// How long `past_due` may still consume (API.md: 72 h).
    pub grace_period: Duration,
    /// `BILLING_PERIOD_SECONDS`: periods of a fixed length instead of
    /// calendar months, for simulations and demos (see [`crate::period`]).
    pub billing_period: Cadence,
}

#[derive(Debug, Clone)]
pub struct FlusherSettings {
    pub batch_size: usize,
    /// How long a partial batch waits to fill up.
    pub max_batch_age: Duration,
    /// This process's name in the consumer group.
    pub consumer_name: String,
    /// An entry pending this long with another consumer is taken over
    /// (XAUTOCLAIM): its consumer is presumed dead.
    pub claim_idle: Duration,
    /// Deliveries after which an entry that cannot be decoded or written
    /// goes to the dead-letter stream.
    pub max_deliveries: u64,
    /// Flushers this process runs side by side, each its own consumer
    /// (`<consumer_name>-<n>`) with its own Postgres connection, so one
    /// batch is written while the next is read and decoded.
    pub workers: usize,
    /// Whether this flusher trims the streams, claims abandoned entries and
    /// exports the backlog (one per process does).
    pub upkeep: bool,
    /// `ENABLE_USAGE_ALERTS`: record the usage alert crossings the events
    /// carry.
    pub record_alerts: bool,
}

/// Stripe: the API and the webhook endpoint.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// `STRIPE_API_BASE`: Stripe's API, or a stand-in in tests.
    pub api_base: String,
    pub secret_key: Secret,
    pub publishable_key: String,
    /// `STRIPE_WEBHOOK_SECRET`, comma-separated while a secret is rolled:
    /// a delivery signed with any of them is accepted. Empty: every
    /// delivery is refused.
    pub webhook_secrets: Vec<Secret>,
    /// `PAYG_PRICE_CENTS_PER_1000_TOKENS`: the price of pay-as-you-go tokens.
    pub cents_per_1000_tokens: i64,
}

/// A rate limit: a sustained rate and the burst allowed on top of it,
/// enforced as GCRA (`lua/gcra.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests per hour at the sustained rate; 0 = no limit.
    pub per_hour: u32,
    /// Requests that may come at once after a quiet spell.
    pub burst: u32,
}

impl Limit {
    pub const NONE: Limit = Limit {
        per_hour: 0,
        burst: 0,
    };

    /// An hourly budget: all of it may be spent at once, and it refills
    /// evenly over the hour. The specification gives the API's route groups
    /// a rate and no burst; this reads "100 an hour" as a merchant would.
    pub fn hourly(per_hour: u32) -> Limit {
        Limit {
            per_hour,
            burst: per_hour,
        }
    }

    /// An embed key's limit: its `rate_limit` per hour, with a burst of 36
    /// seconds of that rate, the proportion the specification gives the
    /// consume limit (10000/hour, burst 100). A key is shared by every
    /// shopper of a shop, so it must take a busy minute, but a leaked key
    /// must not spend an hour's budget in a second.
    pub fn embed_key(rate_limit: i32) -> Limit {
        let per_hour = rate_limit.max(1) as u32;
        Limit {
            per_hour,
            burst: per_hour.div_ceil(100),
        }
    }

    pub fn is_none(&self) -> bool {
        self.per_hour == 0
    }

    /// Microseconds between requests at the sustained rate (rounded down,
    /// so a limit is never stricter than configured), 0 without a limit.
    pub fn interval_us(&self) -> i64 {
        if self.is_none() {
            return 0;
        }
        (3_600_000_000 / i64::from(self.per_hour)).max(1)
    }
}

/// Limits per customer and route group (API.md "Rate limits").
#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    /// `GET /api/v1/apps…`
    pub apps: Limit,
    /// `POST /api/v1/customer/apps/{id}/activate`
    pub activate: Limit,
    /// `POST /api/v1/customer/tokens/consume`, checked inside the consume
    /// script; each embed key has its own limit on top.
    pub consume: Limit,
    /// `/api/v1/customer/billing/*`
    pub billing: Limit,
    /// `API_RATE_LIMIT_REDIS_URL`: where the route groups' limiters live
    /// (default `REDIS_URL`). The consume limits always live beside the
    /// balance they guard, in `REDIS_URL`.
    pub redis_url: Secret,
}

const DEV_JWT_SECRET: &str = "development-only-jwt-secret-change-me-0123456789";
const DEV_DATABASE_URL: &str = "postgres://postgres:postgres@127.0.0.1:5432/connected_apps";
const DEV_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
const DEV_DATA_KEYS: &str = "dev:ZGV2ZWxvcG1lbnQtb25seS1rZXktMzItYnl0ZXMhISE=";

/// A Redis URL the client can use: one server (`redis://`, `rediss://` for
/// TLS) or a Redis Cluster named by some of its nodes
/// (`redis-cluster://host:port?node=host:port&…`, `rediss-cluster://`),
/// checked by the client's own parser so a typo fails at start.
fn check_redis_url(name: &str, url: &str) -> Result<(), ConfigError> {
    const SCHEMES: [&str; 4] = [
        "redis://",
        "rediss://",
        "redis-cluster://",
        "rediss-cluster://",
    ];
    if !SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(ConfigError::new(
            name,
            "must be a redis://, rediss://, redis-cluster:// or rediss-cluster:// URL",
        ));
    }
    fred::types::config::Config::from_url(url)
        .map(|_| ())
        .map_err(|e| ConfigError::new(name, &format!("is not a usable Redis URL: {}", e.details())))
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Reads settings from a map of variables, so tests need not touch the
    /// process environment.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Env { vars };
        let production = match env.get("APP_ENV") {
            None | Some("" | "development") => false,
            Some("production") => true,
            // A typo here would silently mean development defaults.
            Some(_) => {
                return Err(ConfigError::new(
                    "APP_ENV",
                    "must be `production` or `development`",
                ))
            }
        };
        let mut dev_defaults = false;
        let mut required = |name: &str, dev: &str| -> Result<String, ConfigError> {
            match env.get(name) {
                Some(v) if !v.is_empty() => Ok(v.to_owned()),
                _ if production => Err(ConfigError::new(name, "is required in production")),
                _ => {
                    dev_defaults = true;
                    Ok(dev.to_owned())
                }
            }
        };
        let database_url = required("DATABASE_URL", DEV_DATABASE_URL)?;
        let redis_url = required("REDIS_URL", DEV_REDIS_URL)?;
        let jwt_secret = required("JWT_SECRET", DEV_JWT_SECRET)?;
        let data_encryption_keys = required("DATA_ENCRYPTION_KEYS", DEV_DATA_KEYS)?;
        if jwt_secret.len() < 32 {
            return Err(ConfigError::new("JWT_SECRET", "must be at least 32 bytes"));
        }
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "must be a postgres:// URL",
            ));
        }
        check_redis_url("REDIS_URL", &redis_url)?;

        // The development secrets are in this repository: anyone who can
        // reach the port could mint an admin token or open sealed data.
        // They may serve only this machine.
        let public_secrets: Vec<&str> = [
            ("JWT_SECRET", jwt_secret == DEV_JWT_SECRET),
            (
                "DATA_ENCRYPTION_KEYS",
                data_encryption_keys == DEV_DATA_KEYS,
            ),
        ]
        .into_iter()
        .filter_map(|(name, public)| public.then_some(name))
        .collect();
        if production && !public_secrets.is_empty() {
            return Err(ConfigError::new(
                public_secrets[0],
                "is the public development value; production needs its own",
            ));
        }
        let port: u16 = env.parse("PORT", 8000)?;
        let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
        let default_host = if public_secrets.is_empty() {
            [0, 0, 0, 0].into()
        } else {
            loopback
        };
        let host: std::net::IpAddr = env.parse("BIND_ADDRESS", default_host)?;
        if !host.is_loopback() && !public_secrets.is_empty() {
            return Err(ConfigError::new(
                "BIND_ADDRESS",
                &format!(
                    "is {host}, not loopback, while {} holds the public development value: set {} (or bind to 127.0.0.1)",
                    public_secrets.join(" and "),
                    public_secrets.join(" and ")
                ),
            ));
        }
        let leeway: u64 = env.ranged("JWT_LEEWAY_SECS", 30, 0..=60)?;
        let shards: u16 = env.ranged("USAGE_STREAM_SHARDS", 16, 1..=1024)?;
        let key_prefix = env.get("REDIS_KEY_PREFIX").unwrap_or("ca").to_owned();
        if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::new(
                "REDIS_KEY_PREFIX",
                "must be non-empty without braces or spaces",
            ));
        }
        let timeout_ms: u64 = env.ranged("REDIS_TIMEOUT_MS", 250, 10..=60_000)?;
        let batch_size: usize = env.ranged("FLUSH_BATCH_SIZE", 8000, 1..=50_000)?;
        let rate_limit_redis_url = env
            .get("API_RATE_LIMIT_REDIS_URL")
            .filter(|v| !v.is_empty())
            .unwrap_or(&redis_url)
            .to_owned();
        check_redis_url("API_RATE_LIMIT_REDIS_URL", &rate_limit_redis_url)?;
        let consume_limit = Limit {
            per_hour: env.parse("RATE_LIMIT_CONSUME_PER_HOUR", 10_000)?,
            burst: env.parse("RATE_LIMIT_CONSUME_BURST", 100)?,
        };
        if !consume_limit.is_none() && consume_limit.burst == 0 {
            return Err(ConfigError::new(
                "RATE_LIMIT_CONSUME_BURST",
                "must be at least 1",
            ));
        }
        let rate_limits = RateLimitSettings {
            apps: Limit::hourly(env.parse("RATE_LIMIT_APPS_PER_HOUR", 100)?),
            activate: Limit::hourly(env.parse("RATE_LIMIT_ACTIVATE_PER_HOUR", 10)?),
            consume: consume_limit,
            billing: Limit::hourly(env.parse("RATE_LIMIT_BILLING_PER_HOUR", 50)?),
            redis_url: Secret::new(rate_limit_redis_url),
        };
        let api_base = env
            .get("STRIPE_API_BASE")
            .filter(|v| !v.is_empty())
            .unwrap_or("https://api.stripe.com/")
            .to_owned();
        if !(api_base.starts_with("https://") || api_base.starts_with("http://")) {
            return Err(ConfigError::new(
                "STRIPE_API_BASE",
                "must be an http:// or https:// URL",
            ));
        }
        let stripe = StripeSettings {
            api_base,
            secret_key: Secret::new(env.get("STRIPE_SECRET_KEY").unwrap_or_default()),
            publishable_key: env
                .get("STRIPE_PUBLISHABLE_KEY")
                .unwrap_or_default()
                .to_owned(),
            webhook_secrets: env
                .get("STRIPE_WEBHOOK_SECRET")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
                .collect(),
            cents_per_1000_tokens: env.ranged(
                "PAYG_PRICE_CENTS_PER_1000_TOKENS",
                500,
                1..=1_000_000,
            )?,
        };
        let log_level = env.get("LOG_LEVEL").unwrap_or("info").to_ascii_lowercase();
        // ASCII first: tracing-subscriber's parser slices filters by bytes
        // and panics inside a multi-byte character, and no target or
        // level is named outside ASCII.
        if !log_level.is_ascii() || tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::new(
                "LOG_LEVEL",
                "must be a level (error, warn, info, debug, trace) or a tracing filter",
            ));
        }
        let sentry_dsn = match env.get("SENTRY_DSN").filter(|v| !v.is_empty()) {
            Some(dsn) if dsn.parse::<sentry::types::Dsn>().is_err() => {
                return Err(ConfigError::new("SENTRY_DSN", "is not a Sentry DSN"))
            }
            dsn => dsn.map(Secret::new),
        };
        let otlp_endpoint = match env
            .get("OTEL_EXPORTER_OTLP_ENDPOINT")
            .filter(|v| !v.is_empty())
        {
            Some(url) if !(url.starts_with("http://") || url.starts_with("https://")) => {
                return Err(ConfigError::new(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    "must be an http:// or https:// URL",
                ))
            }
            url => url.map(|u| u.trim_end_matches('/').to_owned()),
        };
        let log_json = match env.get("LOG_FORMAT") {
            None | Some("" | "json") => true,
            Some("text") => false,
            Some(_) => return Err(ConfigError::new("LOG_FORMAT", "must be `json` or `text`")),
        };
        let mut cors_origins = Vec::new();
        for origin in env
            .get("CORS_ORIGINS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            // An origin is scheme://host[:port], nothing after: a browser
            // never sends a path, so one here would never match.
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            if !rest.is_some_and(|r| !r.is_empty() && !r.contains('/')) {
                return Err(ConfigError::new(
                    "CORS_ORIGINS",
                    &format!("holds `{origin}`, which is not an origin (https://host[:port])"),
                ));
            }
            cors_origins.push(origin.to_owned());
        }
        let mut allow_cidrs = Vec::new();
        for cidr in env
            .get("ALERT_WEBHOOK_ALLOW_CIDRS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            match cidr.parse::<ipnet::IpNet>() {
                Ok(net) => allow_cidrs.push(net.trunc()),
                Err(_) => {
                    return Err(ConfigError::new(
                        "ALERT_WEBHOOK_ALLOW_CIDRS",
                        &format!("holds `{cidr}`, which is not a CIDR range (10.20.0.0/16)"),
                    ))
                }
            }
        }
        let webhooks = WebhookSettings {
            allow_cidrs,
            secret_overlap: Duration::from_secs(
                3600 * env.ranged("ALERT_SECRET_OVERLAP_HOURS", 24, 0..=720)?,
            ),
            disable_after: Duration::from_secs(
                3600 * env.ranged("ALERT_ENDPOINT_DISABLE_AFTER_HOURS", 24, 1..=720)?,
            ),
        };
        let consumer_name = match env.get("FLUSHER_CONSUMER") {
            Some(name) if name.is_empty() || name.contains(char::is_whitespace) => {
                return Err(ConfigError::new(
                    "FLUSHER_CONSUMER",
                    "must be a name without spaces",
                ))
            }
            Some(name) => name.to_owned(),
            None => format!("flusher-{}", uuid::Uuid::new_v4().simple()),
        };

        Ok(Settings {
            bind: SocketAddr::new(host, port),
            production,
            database: DatabaseSettings {
                url: Secret::new(database_url),
                max_connections: env.ranged("DATABASE_MAX_CONNECTIONS", 10, 1..=1000)?,
                migrate_on_start: env.parse("MIGRATE_ON_START", true)?,
                partitions_ahead_months: env.ranged("USAGE_PARTITIONS_AHEAD_MONTHS", 3, 0..=36)?,
                usage_retention_days: env.ranged("USAGE_RETENTION_DAYS", 400, 1..=36_500)?,
            },
            redis: RedisSettings {
                url: Secret::new(redis_url),
                pool_size: env.ranged("REDIS_POOL_SIZE", 1, 1..=64)?,
                key_prefix,
                stream_shards: shards,
                timeout: Duration::from_millis(timeout_ms),
                settle_timeout: Duration::from_millis(env.ranged(
                    "REDIS_SETTLE_TIMEOUT_MS",
                    (timeout_ms * 2 / 5).max(1),
                    1..=60_000,
                )?),
                rebuild_max_backlog: env.ranged("REBUILD_MAX_BACKLOG", 50_000, 1..=10_000_000)?,
            },
            auth: AuthSettings {
                jwt_secret: Secret::new(jwt_secret),
                jwt_issuer: env.get("JWT_ISSUER").unwrap_or("varai.com").to_owned(),
                jwt_audience: env
                    .get("JWT_AUDIENCE")
                    .unwrap_or("connected-apps")
                    .to_owned(),
                jwt_leeway_secs: leeway,
            },
            consume: ConsumeSettings {
                // At least a minute: a retry must find its first answer.
                idempotency_ttl: Duration::from_secs(env.ranged(
                    "IDEMPOTENCY_TTL_SECS",
                    86_400,
                    60..=30 * 86_400,
                )?),
                grace_period: Duration::from_secs(
                    3600 * env.ranged::<u64>("PAST_DUE_GRACE_HOURS", 72, 0..=24 * 90)?,
                ),
                billing_period: match env.get("BILLING_PERIOD_SECONDS") {
                    None => Cadence::Monthly,
                    Some(_) => Cadence::Seconds(env.ranged(
                        "BILLING_PERIOD_SECONDS",
                        2_592_000,
                        1..=31_536_000,
                    )?),
                },
            },
            flusher: FlusherSettings {
                batch_size,
                max_batch_age: Duration::from_millis(env.ranged(
                    "FLUSH_MAX_AGE_MS",
                    250,
                    1..=60_000,
                )?),
                consumer_name,
                // Shorter than a slow batch would take over entries a live
                // flusher is still writing.
                claim_idle: Duration::from_millis(env.ranged(
                    "FLUSH_CLAIM_IDLE_MS",
                    30_000,
                    1_000..=86_400_000,
                )?),
                max_deliveries: env.ranged("FLUSH_MAX_DELIVERIES", 5, 1..=1000)?,
                workers: env.ranged("FLUSHER_WORKERS", 2, 1..=64)?,
                upkeep: true,
                record_alerts: env.parse("ENABLE_USAGE_ALERTS", true)?,
            },
            rate_limits,
            stripe,
            data_encryption_keys: Secret::new(data_encryption_keys),
            cors_origins,
            enable_beta_apps: env.parse("ENABLE_BETA_APPS", false)?,
            enable_usage_alerts: env.parse("ENABLE_USAGE_ALERTS", true)?,
            usage_alert_retry_base: Duration::from_millis(env.ranged(
                "USAGE_ALERT_RETRY_BASE_MS",
                30_000,
                1..=3_600_000,
            )?),
            webhooks,
            log_level,
            log_json,
            sentry_dsn,
            otlp_endpoint,
            http: HttpSettings {
                header_timeout: Duration::from_secs(env.ranged(
                    "HTTP_HEADER_TIMEOUT_SECS",
                    30,
                    1..=3600,
                )?),
                body_timeout: Duration::from_secs(env.ranged(
                    "HTTP_BODY_TIMEOUT_SECS",
                    30,
                    1..=3600,
                )?),
                request_timeout: Duration::from_secs(env.ranged(
                    "HTTP_REQUEST_TIMEOUT_SECS",
                    60,
                    1..=3600,
                )?),
            },
            uses_dev_defaults: dev_defaults,
        })
    }
}

struct Env<'a> {
    vars: &'a HashMap<String, String>,
}

impl Env<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    fn parse<T: FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        match self.get(name) {
            None | Some("") => Ok(default),
            Some(raw) => raw
                .parse()
                .map_err(|e| ConfigError::new(name, &format!("could not be read ({e})"))),
        }
    }

    /// A number that must lie in `range`: a value outside it (a TTL of 0,
    /// a pool of no connections) would start a service that fails on
    /// every request, so it stops the start instead.
    fn ranged<T>(
        &self,
        name: &str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display,
        T::Err: fmt::Display,
    {
        let value = self.parse(name, default)?;
        if !range.contains(&value) {
            return Err(ConfigError::new(
                name,
                &format!("is {value}, outside {}..={}", range.start(), range.end()),
            ));
        }
        Ok(value)
    }
}

/// An invalid setting, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name} {problem}")]
pub struct ConfigError {
    name: String,
    problem: String,
}

impl ConfigError {
    fn new(name: &str, problem: &str) -> Self {
        Self {
            name: name.to_owned(),
            problem: problem.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_empty_environment_runs_with_development_defaults() {
        let s = Settings::from_map(&vars(&[])).unwrap();
        assert!(s.uses_dev_defaults);
        assert_eq!(s.bind.port(), 8000);
        assert_eq!(s.auth.jwt_issuer, "varai.com");
        assert_eq!(s.redis.timeout, Duration::from_millis(250));
    }

    #[test]
    fn redis_may_be_one_server_or_a_cluster_and_anything_else_stops_the_start() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://cache.internal:6380",
            "redis-cluster://127.0.0.1:7001?node=127.0.0.1:7002&node=127.0.0.1:7003",
            "rediss-cluster://cache-0.internal:6379",
        ] {
            let s = Settings::from_map(&vars(&[("REDIS_URL", url)]));
            assert!(s.is_ok(), "{url}: {:?}", s.err());
        }
        for url in [
            "http://127.0.0.1:6379",
            "redis-sentinel://127.0.0.1:26379",
            "redis://127.0.0.1:notaport",
        ] {
            let err = Settings::from_map(&vars(&[("REDIS_URL", url)])).unwrap_err();
            assert!(err.to_string().contains("REDIS_URL"), "{url}: {err}");
        }
    }

    #[test]
    fn production_refuses_to_start_without_secrets() {
        let err = Settings::from_map(&vars(&[("APP_ENV", "production")])).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn rate_limits_default_to_the_specification() {
        let s = Settings::from_map(&vars(&[])).unwrap();
        let limits = &s.rate_limits;
        assert_eq!(
            limits.consume,
            Limit {
                per_hour: 10_000,
                burst: 100
            }
        );
        assert_eq!(limits.consume.interval_us(), 360_000);
        assert_eq!(limits.apps, Limit::hourly(100));
        assert_eq!(limits.activate, Limit::hourly(10));
        assert_eq!(limits.billing, Limit::hourly(50));
        assert_eq!(limits.redis_url.expose(), s.redis.url.expose());
    }

    #[test]
    fn an_embed_keys_burst_is_36_seconds_of_its_rate_and_at_least_one() {
        assert_eq!(Limit::embed_key(1000).burst, 10);
        assert_eq!(Limit::embed_key(1800).burst, 18);
        assert_eq!(Limit::embed_key(1).burst, 1);
        assert_eq!(Limit::embed_key(1).interval_us(), 3_600_000_000);
    }

    #[test]
    fn a_limit_of_zero_is_no_limit_and_a_zero_burst_is_refused() {
        let s = Settings::from_map(&vars(&[("RATE_LIMIT_APPS_PER_HOUR", "0")])).unwrap();
        assert!(s.rate_limits.apps.is_none());
        assert_eq!(s.rate_limits.apps.interval_us(), 0);
        let err = Settings::from_map(&vars(&[("RATE_LIMIT_CONSUME_BURST", "0")])).unwrap_err();
        assert!(err.to_string().contains("RATE_LIMIT_CONSUME_BURST"));
    }

    #[test]
    fn a_short_jwt_secret_is_refused() {
        let err = Settings::from_map(&vars(&[("JWT_SECRET", "short")])).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = Settings::from_map(&vars(&[(
            "DATABASE_URL",
            "postgres://app:hunter2-password@db/x",
        )]))
        .unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"));
        assert!(!printed.contains(DEV_JWT_SECRET));
    }

    #[test]
    fn roles_parse_from_a_list() {
        assert_eq!("all".parse::<Roles>().unwrap(), Roles::ALL);
        let r: Roles = "api, flusher".parse().unwrap();
        assert!(r.api && r.flusher && !r.scheduler);
        assert!("web".parse::<Roles>().is_err());
    }

    #[test]
    fn development_secrets_serve_only_this_machine() {
        let dev = Settings::from_map(&vars(&[])).unwrap();
        assert!(dev.bind.ip().is_loopback(), "{}", dev.bind);

        let exposed = Settings::from_map(&vars(&[("BIND_ADDRESS", "0.0.0.0")])).unwrap_err();
        assert!(exposed.to_string().contains("BIND_ADDRESS"), "{exposed}");
        assert!(exposed.to_string().contains("JWT_SECRET"), "{exposed}");

        let own_secrets = vars(&[
            ("JWT_SECRET", "a-real-secret-of-at-least-32-bytes-000"),
            (
                "DATA_ENCRYPTION_KEYS",
                "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ]);
        let served = Settings::from_map(&own_secrets).unwrap();
        assert!(served.bind.ip().is_unspecified(), "{}", served.bind);
    }

    #[test]
    fn production_refuses_the_public_development_secret_even_when_set() {
        let err = Settings::from_map(&vars(&[
            ("APP_ENV", "production"),
            ("DATABASE_URL", "postgres://db/x"),
            ("REDIS_URL", "redis://cache"),
            ("JWT_SECRET", DEV_JWT_SECRET),
            (
                "DATA_ENCRYPTION_KEYS",
                "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn settings_outside_their_meaningful_range_stop_the_start_naming_them() {
        for (name, value) in [
            ("IDEMPOTENCY_TTL_SECS", "0"),
            ("REDIS_POOL_SIZE", "0"),
            ("REDIS_TIMEOUT_MS", "0"),
            ("REDIS_SETTLE_TIMEOUT_MS", "0"),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            ("FLUSH_BATCH_SIZE", "0"),
            ("FLUSH_MAX_AGE_MS", "0"),
            ("FLUSH_CLAIM_IDLE_MS", "10"),
            ("FLUSH_MAX_DELIVERIES", "0"),
            ("FLUSHER_WORKERS", "0"),
            ("USAGE_RETENTION_DAYS", "0"),
            ("USAGE_STREAM_SHARDS", "0"),
            ("PAYG_PRICE_CENTS_PER_1000_TOKENS", "0"),
            ("HTTP_HEADER_TIMEOUT_SECS", "0"),
            ("HTTP_BODY_TIMEOUT_SECS", "0"),
            ("HTTP_REQUEST_TIMEOUT_SECS", "0"),
            ("PAST_DUE_GRACE_HOURS", "100000"),
            ("BILLING_PERIOD_SECONDS", "0"),
            ("APP_ENV", "prod"),
            ("LOG_FORMAT", "pretty"),
            ("LOG_LEVEL", "loud[="),
            // Found by the fuzzer: the filter parser panicked inside 'ݖ'.
            ("LOG_LEVEL", "\u{b}ɒݖꖖjso=go%9"),
            ("CORS_ORIGINS", "https://shop.example/path"),
            ("STRIPE_API_BASE", "api.stripe.com"),
            ("FLUSHER_CONSUMER", "two words"),
            ("ALERT_WEBHOOK_ALLOW_CIDRS", "10.0.0.0/33"),
            ("ALERT_SECRET_OVERLAP_HOURS", "1000"),
            ("SENTRY_DSN", "sentry.example/42"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ] {
            let err = Settings::from_map(&vars(&[(name, value)]))
                .err()
                .unwrap_or_else(|| panic!("{name}={value} was accepted"));
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn http_timeouts_default_to_a_reverse_proxys() {
        let s = Settings::from_map(&vars(&[])).unwrap();
        assert_eq!(s.http.header_timeout, Duration::from_secs(30));
        assert_eq!(s.http.body_timeout, Duration::from_secs(30));
        assert_eq!(s.http.request_timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_leeway_over_a_minute_is_refused() {
        assert!(Settings::from_map(&vars(&[("JWT_LEEWAY_SECS", "120")])).is_err());
    }
}
