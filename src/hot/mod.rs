//! The hot store: Redis, and the Lua scripts that keep balances exact.
//!
//! Redis holds each customer's live balance and the usage events not yet
//! persisted; Postgres (the [`crate::ledger`]) is the durable record it is
//! rebuilt from. Every change to a balance runs inside one Lua script, so
//! each is atomic and takes one round trip.
//!
//! - [`keys`]: the key layout and why it is hash-tagged.
//! - [`charge`]: the consume script and its outcomes; `coalesce`: how
//!   concurrent consumes share one script call.
//! - [`account`]: loading a customer's hot state, and changing it in place.
//! - [`rate_limit`]: the route groups' rate limits (the consume limits are
//!   inside the consume script).

pub mod account;
pub mod backlog;
pub mod charge;
mod coalesce;
pub mod keys;
pub mod rate_limit;
pub mod streams;
pub mod version;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use fred::{
    prelude::*,
    types::{config::UnresponsiveConfig, scripts::Script},
};

pub use keys::Keys;

use crate::config::RedisSettings;

/// The scripts, compiled into the binary so the code and the Lua it calls
/// can never be deployed apart.
pub(crate) struct Scripts {
    pub consume: Script,
    pub account_load: Script,
    pub account_update: Script,
    pub account_take: Script,
    pub account_rollover: Script,
    pub settle: Script,
}

impl Scripts {
    /// The scripts that rate-limit start with `gcra.lua`, the one
    /// definition of the algorithm they share.
    const CONSUME: &'static str = concat!(
        include_str!("../../lua/gcra.lua"),
        include_str!("../../lua/consume.lua")
    );
    pub(crate) const RATE_LIMIT: &'static str = concat!(
        include_str!("../../lua/gcra.lua"),
        include_str!("../../lua/rate_limit.lua")
    );

    fn new() -> Self {
        Self {
            consume: Script::from_lua(Self::CONSUME),
            account_load: Script::from_lua(include_str!("../../lua/account_load.lua")),
            account_update: Script::from_lua(include_str!("../../lua/account_update.lua")),
            account_take: Script::from_lua(include_str!("../../lua/account_take.lua")),
            account_rollover: Script::from_lua(include_str!("../../lua/account_rollover.lua")),
            settle: Script::from_lua(include_str!("../../lua/settle.lua")),
        }
    }
}

/// A handle on Redis for the request paths. Cloning is cheap.
#[derive(Clone)]
pub struct HotStore {
    pool: Pool,
    /// A connection of its own, to learn the outcome of a consume whose
    /// reply is stuck behind others on the pool's connections.
    side: Client,
    keys: Keys,
    scripts: Arc<Scripts>,
    timeout: Duration,
    /// Redis's clock minus ours, in ms, so a script can be given a deadline
    /// on Redis's clock (see [`charge`]).
    clock_offset_ms: Arc<AtomicI64>,
    /// `redis_script_duration_seconds{script="consume"}`: the consume
    /// script's round trip as the request path sees it.
    script_time: metrics::Histogram,
    /// The queues of consumes waiting for their lane's next script call.
    coalescer: Arc<coalesce::Coalescer>,
    /// Each shard's stream and disabled-apps set, as a call names them.
    shard_keys: coalesce::ShardKeys,
    /// A Redis Cluster: a script call stays within one shard.
    clustered: bool,
    /// Whether the server's version was found new enough (`version`).
    version_checked: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum HotError {
    /// Redis is down, or did not answer within the deadline.
    #[error("redis unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("redis error")]
    Internal(#[source] anyhow::Error),
}

impl From<fred::error::Error> for HotError {
    fn from(e: fred::error::Error) -> Self {
        use fred::error::ErrorKind::*;
        match e.kind() {
            Timeout | IO | Canceled | Backpressure | NotFound | Cluster => {
                HotError::Unavailable(e.into())
            }
            _ if e.details().starts_with("LOADING") || e.details().starts_with("BUSY") => {
                HotError::Unavailable(e.into())
            }
            _ => HotError::Internal(e.into()),
        }
    }
}

/// Builds a fred client configuration from `REDIS_URL` (`rediss://` turns
/// TLS on; `redis-cluster://` and `rediss-cluster://` name a Redis Cluster
/// by some of its nodes), with the reconnect policy every client of the
/// service shares.
pub fn builder(url: &str, command_timeout: Duration) -> anyhow::Result<Builder> {
    let config = Config::from_url(url)?;
    // In a cluster a slot moving to another master (a resharding, a
    // failover) answers MOVED or ASK: the command did not run, and the
    // client sends it on to the slot's master, which counts as another
    // attempt. What the service sends is safe to run twice (a consume
    // finds its own outcome record, lua/consume.lua "Sent twice"; a settle
    // its fence; account changes their done-once marker; the flusher's
    // reads and writes are idempotent; a route limiter at worst counts one
    // request twice), so a command may go out six times: while a slot
    // moves, one call can meet MOVED, then ASK, then MOVED again (fewer
    // attempts failed calls in tests/api/cluster.rs). In a cluster a
    // command is also sent again after a broken connection. One server
    // never redirects, and there a command is not sent again: the caller
    // settles instead (hot/charge.rs).
    let attempts = if config.server.is_clustered() { 6 } else { 1 };
    let mut builder = Builder::from_config(config);
    builder
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            // Commands are small and latency-bound: no Nagle delay.
            c.tcp.nodelay = Some(true);
            c.max_command_attempts = attempts;
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(Duration::from_secs(2)),
                interval: Duration::from_millis(500),
            };
        })
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2));
    Ok(builder)
}

impl HotStore {
    /// Connects the pool. Does not fail when Redis is down at start: the
    /// pool keeps reconnecting, requests get 503 meanwhile, and
    /// `/health/ready` says so.
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        // The pool's commands get 60 % of the budget; a consume whose reply
        // is late spends the rest learning its outcome (hot/charge.rs).
        let pool = builder(settings.url.expose(), settings.timeout * 3 / 5)?
            .build_pool(settings.pool_size.max(1))?;
        let side = builder(settings.url.expose(), settings.settle_timeout)?.build()?;
        pool.connect();
        side.connect();
        let answering = tokio::time::timeout(Duration::from_secs(5), pool.wait_for_connect())
            .await
            .is_ok();
        if answering {
            // Too old a Redis stops the start here (see `version`).
            version::check(pool.next()).await?;
        } else {
            tracing::warn!("redis is not answering yet; retrying in the background");
        }
        let keys = Keys::new(&settings.key_prefix, settings.stream_shards);
        let scripts = Arc::new(Scripts::new());
        let clustered = pool.next().is_clustered();
        let shard_keys = coalesce::ShardKeys::new(&keys, clustered);
        let coalescer = Arc::new(coalesce::Coalescer::start(
            &pool,
            &scripts.consume,
            &shard_keys,
            clustered,
        ));
        let store = Self {
            shard_keys,
            clustered,
            pool,
            side,
            keys,
            scripts,
            coalescer,
            timeout: settings.timeout,
            clock_offset_ms: Arc::new(AtomicI64::new(0)),
            version_checked: Arc::new(AtomicBool::new(answering)),
            script_time: metrics::histogram!("redis_script_duration_seconds", "script" => "consume"),
        };
        if let Err(e) = store.sync_clock().await {
            tracing::warn!(error = %crate::telemetry::chain(&e), "could not read the redis clock yet");
        }
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether Redis is a cluster: there a script call, and so a batch of
    /// consumes, holds the keys of one shard only.
    pub fn clustered(&self) -> bool {
        self.clustered
    }

    pub(crate) fn client(&self) -> &Client {
        self.pool.next()
    }

    /// Disables an app for every customer at once (or enables it again),
    /// in every shard's copy of the set the consume script reads.
    pub async fn set_app_disabled(&self, slug: &str, disabled: bool) -> Result<(), HotError> {
        for shard in 0..self.keys.shards() {
            let key = self.keys.disabled_apps(shard);
            let _: i64 = if disabled {
                self.client().sadd(key, slug).await?
            } else {
                self.client().srem(key, slug).await?
            };
        }
        Ok(())
    }

    /// Whether Redis answers. Until the version of a Redis that did not
    /// answer at start has been checked, the check runs here, so a
    /// too-old Redis keeps the readiness probe failing with its reason.
    pub async fn ping(&self) -> Result<(), HotError> {
        let _: String = self.client().ping(None).await?;
        if !self.version_checked.load(Ordering::Relaxed) {
            version::check(self.client()).await.map_err(|e| {
                tracing::error!(error = %e, "redis is too old for the service");
                HotError::Unavailable(e)
            })?;
            self.version_checked.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Measures Redis's clock against ours (half the round trip is the
    /// error bound). Run at start and every few seconds by the API role.
    pub async fn sync_clock(&self) -> Result<(), HotError> {
        let before = now_ms();
        let redis_ms = self.redis_time_ms().await?;
        let after = now_ms();
        self.clock_offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
        Ok(())
    }

    /// Redis's clock, read now (`TIME`), in ms since the epoch: never
    /// behind the time of a charge already made, as an estimate from
    /// [`Self::redis_now_ms`] can be by a few milliseconds.
    pub async fn redis_time_ms(&self) -> Result<i64, HotError> {
        let time: Vec<i64> = self
            .client()
            .custom(fred::cmd!("TIME"), Vec::<String>::new())
            .await?;
        let (secs, micros) = (
            time.first().copied().unwrap_or(0),
            time.get(1).copied().unwrap_or(0),
        );
        Ok(secs * 1000 + micros / 1000)
    }

    /// Now, on Redis's clock, in ms since the epoch.
    pub(crate) fn redis_now_ms(&self) -> i64 {
        now_ms() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    pub async fn quit(&self) {
        let _ = self.pool.quit().await;
        let _ = self.side.quit().await;
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
