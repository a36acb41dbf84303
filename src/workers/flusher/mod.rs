//! The flusher: usage events from the Redis streams into the ledger.
//!
//! Each shard stream is read through the consumer group `flusher`
//! (XREADGROUP), so several flusher processes share the work and an entry
//! stays pending until it is acknowledged. A batch takes entries from the
//! shards in turn, up to `FLUSH_BATCH_SIZE`, and one Postgres transaction
//!
//! 1. inserts its rows in one statement, idempotent by event id;
//! 2. for exactly the rows newly inserted, records their sessions and
//!    visitors and adds their totals to `usage_analytics_daily`;
//! 3. brings the balances and `last_used_at` in step.
//!
//! The entries are acknowledged (XACK) only after the commit. A crash
//! between commit and XACK redelivers entries whose rows exist: the insert
//! skips them and nothing is counted twice. The same holds for two
//! flushers racing over the same entries: the second insert of an event
//! waits for the first to commit, then does nothing.
//!
//! Recovery:
//! - Postgres down or restarting: the batch fails, its entries stay
//!   pending, and the flusher retries with backoff while Redis holds the
//!   backlog.
//! - A batch refused for its data (a constraint, a bad value) is split in
//!   halves until the entries at fault are found; the rest are written.
//!   An entry that cannot be decoded or written stays pending and is
//!   retried; after `FLUSH_MAX_DELIVERIES` deliveries it moves to the
//!   shard's dead-letter stream and is counted in
//!   `flusher_dead_letters_total`.
//! - Entries pending with a consumer idle for `FLUSH_CLAIM_IDLE_MS` (a
//!   dead process) are taken over with XAUTOCLAIM.
//!
//! Reads are per shard and non-blocking, so the flusher works the same on
//! Redis Cluster, where one command cannot span slots.
//!
//! The parts, one file each: [`take`] (read a batch, and claim what a dead
//! flusher left), [`write`] (decode and insert), [`acknowledge`] (XACK, or
//! the dead-letter stream), [`trim`] and [`observe`] (the backlog gauges);
//! [`crate::hot::streams`] reads the consumer group's state for the last two.
//!
//! [`Flusher::step`] does one pass and is public, so tests drain the
//! streams deterministically; its parts ([`Flusher::take`],
//! [`Flusher::write`], [`Flusher::acknowledge`]) are public too, so a test
//! can stop between them as a crash would.

mod acknowledge;
mod observe;
mod take;
mod trim;
mod write;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use chrono::NaiveDate;
use fred::{prelude::*, types::Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{FlusherSettings, RedisSettings},
    hot::Keys,
};

pub use write::decode;

pub use crate::hot::streams::GROUP;

/// Entries asked for per XREADGROUP. Replies of thousands of entries run
/// to megabytes; smaller ones are decoded without growing and re-scanning
/// a large buffer.
const READ_CHUNK: usize = 500;

/// How often the flusher trims and claims abandoned entries.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// How often the backlog gauges are refreshed.
const OBSERVE_EVERY: Duration = Duration::from_secs(1);

pub struct Flusher {
    redis: Client,
    db: PgPool,
    keys: Keys,
    settings: FlusherSettings,
    /// Months known to have their partitions.
    partitions: HashSet<NaiveDate>,
    /// The shard the next pass starts from, so no shard is starved.
    next_shard: u16,
    /// Shards where this consumer may hold pending entries (left by a
    /// failed batch, a previous run under the same name, or claimed), which
    /// the next pass reads before new ones.
    own_pending: Vec<bool>,
    /// Per shard, the events not yet flushed as last measured by
    /// [`Flusher::observe`], less those this process has flushed since: the
    /// charges that may be gone should Redis lose the stream now.
    unflushed_seen: Vec<u64>,
}

/// Entries taken from the streams, not yet acknowledged.
#[derive(Debug, Default)]
pub struct Batch {
    entries: Vec<Entry>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[derive(Debug)]
struct Entry {
    shard: u16,
    id: String,
    /// `None` for an entry deleted while pending.
    fields: Option<Vec<(String, String)>>,
}

/// What [`Flusher::write`] did with a batch.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows newly inserted.
    pub inserted: usize,
    /// Entries whose rows were already there (redelivered), or repeated
    /// inside the batch.
    pub duplicates: usize,
    /// Entries that could not be decoded or written, by index in the
    /// batch, with the reason. They are not acknowledged.
    failed: Vec<(usize, String)>,
}

/// The state of one shard stream, as exported in the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamBacklog {
    pub shard: u16,
    /// Entries in the stream (acknowledged ones until the next trim).
    pub entries: u64,
    /// Delivered to a flusher, not yet acknowledged.
    pub pending: u64,
    /// Not yet delivered to any flusher.
    pub undelivered: u64,
    /// Age of the oldest event not yet flushed (pending or undelivered).
    pub oldest_unflushed_ms: u64,
}

/// A flusher dropped before its run's end (one driven step by step, a
/// task cut short) closes its Redis connection: a client's connection task
/// outlives its handles, so a process making many flushers would otherwise
/// keep every one of their connections open.
impl Drop for Flusher {
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let redis = self.redis.clone();
            runtime.spawn(async move {
                let _ = redis.quit().await;
            });
        }
    }
}

impl Flusher {
    pub async fn connect(
        redis: &RedisSettings,
        db: PgPool,
        settings: FlusherSettings,
    ) -> anyhow::Result<Self> {
        // Its own connection, with a deadline fit for batches rather than
        // for the request path.
        let client = crate::hot::builder(redis.url.expose(), Duration::from_secs(10))?.build()?;
        client.init().await?;
        let keys = Keys::new(&redis.key_prefix, redis.stream_shards);
        let flusher = Self {
            redis: client,
            db,
            own_pending: vec![true; usize::from(keys.shards())],
            unflushed_seen: vec![0; usize::from(keys.shards())],
            keys,
            settings,
            partitions: HashSet::new(),
            next_shard: 0,
        };
        flusher.ensure_groups().await?;
        Ok(flusher)
    }

    /// Creates the consumer group on every shard stream (from the start of
    /// the stream, so events written before the group existed are read).
    pub async fn ensure_groups(&self) -> anyhow::Result<()> {
        for stream in self.keys.usage_streams() {
            self.create_group(stream).await?;
        }
        Ok(())
    }

    /// Creates the consumer group on `stream` from its start (and the
    /// stream if missing). `false` when it already existed (made by
    /// another flusher, or never lost).
    async fn create_group(&self, stream: &str) -> anyhow::Result<bool> {
        let created: Result<Value, _> = self.redis.xgroup_create(stream, GROUP, "0", true).await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if e.details().starts_with("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// One pass: take a batch, write it, acknowledge it. Returns how many
    /// entries it took.
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let started = Instant::now();
        let batch = self.take().await?;
        if batch.is_empty() {
            return Ok(0);
        }
        let taken = Instant::now();
        let written = match self.write(&batch).await {
            Ok(written) => written,
            Err(e) => {
                // Postgres unreachable, or a transaction aborted: every
                // entry stays pending and is read again first.
                self.mark_pending(&batch);
                return Err(e);
            }
        };
        let committed = Instant::now();
        self.acknowledge(&batch, &written).await?;
        metrics::histogram!("flusher_phase_duration_seconds", "phase" => "take")
            .record(taken.duration_since(started));
        metrics::histogram!("flusher_phase_duration_seconds", "phase" => "write")
            .record(committed.duration_since(taken));
        metrics::histogram!("flusher_phase_duration_seconds", "phase" => "acknowledge")
            .record(committed.elapsed());
        metrics::histogram!("flusher_batch_entries").record(batch.len() as f64);
        Ok(batch.len())
    }

    fn mark_pending(&mut self, batch: &Batch) {
        for entry in &batch.entries {
            self.own_pending[usize::from(entry.shard)] = true;
        }
    }

    async fn upkeep(&mut self) {
        if let Err(e) = self.claim_abandoned().await {
            tracing::warn!(error = %crate::telemetry::chain(&*e), "claiming abandoned usage events failed");
        }
        if let Err(e) = self.trim().await {
            tracing::warn!(error = %crate::telemetry::chain(&*e), "stream trim failed");
        }
    }

    /// Runs until `shutdown`. A batch in flight is written and acknowledged
    /// first: cancellation is only looked at between batches.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_upkeep: Option<Instant> = None;
        let mut last_observed: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if self.settings.upkeep && last_upkeep.is_none_or(|t| t.elapsed() >= UPKEEP_EVERY) {
                self.upkeep().await;
                last_upkeep = Some(Instant::now());
            }
            if self.settings.upkeep && last_observed.is_none_or(|t| t.elapsed() >= OBSERVE_EVERY) {
                if let Err(e) = self.observe().await {
                    tracing::warn!(error = %crate::telemetry::chain(&*e), "measuring the usage backlog failed");
                }
                last_observed = Some(Instant::now());
            }
            let wait = match self.step().await {
                // A full batch: more is waiting.
                Ok(n) if n >= self.settings.batch_size => {
                    backoff = Duration::from_millis(100);
                    Duration::ZERO
                }
                // A partial batch: let the next one fill up, for at most
                // FLUSH_MAX_AGE_MS, so batches stay large at any load.
                Ok(_) => {
                    backoff = Duration::from_millis(100);
                    self.settings.max_batch_age
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::chain(&*e), retry_in = ?backoff, "flush failed; the events stay pending");
                    metrics::counter!("flusher_errors_total").increment(1);
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    wait
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let _ = self.redis.quit().await;
        tracing::info!(consumer = %self.settings.consumer_name, "flusher stopped");
    }
}
