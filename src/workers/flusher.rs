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
//! [`Flusher::step`] does one pass and is public, so tests drain the
//! streams deterministically; its parts ([`Flusher::take`],
//! [`Flusher::write`], [`Flusher::acknowledge`]) are public too, so a test
//! can stop between them as a crash would.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use fred::{prelude::*, types::Value};
use serde_json::value::RawValue;
use sqlx::{types::ipnetwork::IpNetwork, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{FlusherSettings, RedisSettings},
    domain::usage::{summarize, Identity},
    hot::Keys,
    ledger::{
        partitions,
        usage::{self, UsageRow},
    },
};

pub const GROUP: &str = "flusher";

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
            let created: Result<Value, _> =
                self.redis.xgroup_create(stream, GROUP, "0", true).await;
            match created {
                Ok(_) => {}
                Err(e) if e.details().starts_with("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
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

    /// Takes up to a batch of entries: this consumer's pending ones first,
    /// then new ones, over the shards in turn.
    pub async fn take(&mut self) -> anyhow::Result<Batch> {
        let shards = self.keys.shards();
        let budget = self.settings.batch_size;
        let mut batch = Batch::default();
        for i in 0..shards {
            if batch.len() >= budget {
                break;
            }
            let shard = (self.next_shard + i) % shards;
            if self.own_pending[usize::from(shard)] {
                let before = batch.len();
                self.read(shard, "0", budget - batch.len(), &mut batch)
                    .await?;
                if batch.len() == before {
                    self.own_pending[usize::from(shard)] = false;
                }
            }
            // New entries, in reads of at most READ_CHUNK.
            while batch.len() < budget {
                let before = batch.len();
                let want = (budget - before).min(READ_CHUNK);
                self.read(shard, ">", want, &mut batch).await?;
                if batch.len() - before < want {
                    break;
                }
            }
        }
        self.next_shard = (self.next_shard + 1) % shards;
        Ok(batch)
    }

    /// Writes a batch to Postgres. A batch refused for its data is split
    /// until the entries at fault are isolated; any other error (Postgres
    /// unreachable, a deadlock) fails the whole call.
    pub async fn write(&mut self, batch: &Batch) -> anyhow::Result<Written> {
        let mut written = Written::default();
        let mut rows: Vec<(usize, UsageRow)> = Vec::with_capacity(batch.len());
        let mut seen = HashSet::with_capacity(batch.len());
        for (index, entry) in batch.entries.iter().enumerate() {
            let Some(fields) = &entry.fields else {
                // Deleted while pending: nothing left to persist.
                continue;
            };
            match decode(fields) {
                Ok(row) if seen.insert(row.id) => rows.push((index, row)),
                Ok(_) => written.duplicates += 1,
                Err(reason) => written.failed.push((index, reason)),
            }
        }
        for (_, row) in &rows {
            let month = partitions::month_of(row.created_at.date_naive());
            if !self.partitions.contains(&month) {
                partitions::ensure_month(&self.db, month).await?;
                self.partitions.insert(month);
            }
        }

        let mut parts = vec![&rows[..]];
        while let Some(part) = parts.pop() {
            if part.is_empty() {
                continue;
            }
            match self.write_rows(part).await {
                Ok(inserted) => {
                    written.inserted += inserted;
                    written.duplicates += part.len() - inserted;
                }
                Err(e) if is_data_error(&e) => {
                    if let [(index, _)] = part {
                        written.failed.push((*index, e.to_string()));
                    } else {
                        let (left, right) = part.split_at(part.len() / 2);
                        parts.push(right);
                        parts.push(left);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// One transaction: the rows, then the aggregates and balances of the
    /// rows it newly inserted. Returns how many it inserted.
    async fn write_rows(&self, rows: &[(usize, UsageRow)]) -> sqlx::Result<usize> {
        let all: Vec<&UsageRow> = rows.iter().map(|(_, row)| row).collect();
        let mut tx = self.db.begin().await?;
        let inserted_ids = usage::insert_batch(&mut tx, &all).await?;
        let inserted: Vec<&UsageRow> = all
            .into_iter()
            .filter(|row| inserted_ids.contains(&row.id))
            .collect();
        let (mut days, sightings) = summarize(inserted.iter().copied());
        for ((day, kind), firsts) in usage::record_sightings(&mut tx, &sightings).await? {
            if let Some(totals) = days.get_mut(&day) {
                match kind {
                    Identity::Session => totals.sessions += firsts,
                    Identity::Visitor => totals.visitors += firsts,
                }
            }
        }
        usage::add_to_daily(&mut tx, &days).await?;
        usage::apply_to_balances(&mut tx, &inserted).await?;
        tx.commit().await?;
        Ok(inserted.len())
    }

    /// Acknowledges a written batch. Entries that failed stay pending for
    /// another try, until their deliveries reach `FLUSH_MAX_DELIVERIES`;
    /// then they move to the dead-letter stream.
    pub async fn acknowledge(&mut self, batch: &Batch, written: &Written) -> anyhow::Result<()> {
        let mut keep = vec![false; batch.len()];
        for (index, reason) in &written.failed {
            let entry = &batch.entries[*index];
            let deliveries = self.deliveries(entry).await?;
            if deliveries >= self.settings.max_deliveries {
                self.dead_letter(entry, deliveries, reason).await?;
            } else {
                tracing::warn!(entry = %entry.id, deliveries, reason, "usage event not persisted; it will be retried");
                metrics::counter!("flusher_entries_retried_total").increment(1);
                keep[*index] = true;
                self.own_pending[usize::from(entry.shard)] = true;
            }
        }
        let mut by_shard: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for (entry, kept) in batch.entries.iter().zip(&keep) {
            if !kept {
                by_shard.entry(entry.shard).or_default().push(&entry.id);
            }
        }
        for (shard, ids) in by_shard {
            let _: i64 = self
                .redis
                .xack(self.keys.usage_stream(shard), GROUP, ids)
                .await?;
        }
        metrics::counter!("flusher_events_persisted_total").increment(written.inserted as u64);
        metrics::counter!("flusher_events_duplicate_total").increment(written.duplicates as u64);
        Ok(())
    }

    fn mark_pending(&mut self, batch: &Batch) {
        for entry in &batch.entries {
            self.own_pending[usize::from(entry.shard)] = true;
        }
    }

    async fn read(
        &self,
        shard: u16,
        from: &str,
        count: usize,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let reply: Value = self
            .redis
            .xreadgroup(
                GROUP,
                &self.settings.consumer_name,
                Some(count as u64),
                None,
                false,
                self.keys.usage_stream(shard),
                from,
            )
            .await?;
        parse_xread(reply, shard, batch);
        Ok(())
    }

    /// How many times an entry has been delivered (XPENDING's count).
    async fn deliveries(&self, entry: &Entry) -> anyhow::Result<u64> {
        let reply: Value = self
            .redis
            .xpending(
                self.keys.usage_stream(entry.shard),
                GROUP,
                (entry.id.as_str(), entry.id.as_str(), 1),
            )
            .await?;
        // [[id, consumer, idle ms, deliveries]]
        let deliveries = match reply {
            Value::Array(rows) => rows.into_iter().next().and_then(|row| match row {
                Value::Array(fields) => fields.get(3).and_then(Value::as_u64),
                _ => None,
            }),
            _ => None,
        };
        Ok(deliveries.unwrap_or(1))
    }

    /// Moves an entry aside, so the rest flow on, and acknowledges it.
    async fn dead_letter(
        &self,
        entry: &Entry,
        deliveries: u64,
        reason: &str,
    ) -> anyhow::Result<()> {
        tracing::error!(
            entry = %entry.id,
            deliveries,
            reason,
            "usage event cannot be persisted; moved to the dead-letter stream"
        );
        metrics::counter!("flusher_dead_letters_total").increment(1);
        let mut values: Vec<(String, String)> = vec![
            ("source_id".into(), entry.id.clone()),
            ("reason".into(), reason.into()),
            ("deliveries".into(), deliveries.to_string()),
        ];
        values.extend(entry.fields.iter().flatten().cloned());
        let _: String = self
            .redis
            .xadd(
                self.keys.dead_letter_stream(entry.shard),
                false,
                None,
                "*",
                values,
            )
            .await?;
        Ok(())
    }

    /// Takes over entries pending for at least `FLUSH_CLAIM_IDLE_MS` with
    /// any consumer (one that died, or this one after a failure), so they
    /// are read again by the next pass. Returns how many it claimed.
    pub async fn claim_abandoned(&mut self) -> anyhow::Result<usize> {
        let min_idle = self.settings.claim_idle.as_millis() as u64;
        let mut claimed = 0;
        for shard in 0..self.keys.shards() {
            let mut cursor = "0-0".to_owned();
            loop {
                // JUSTID: the entries move to this consumer without counting
                // a delivery; the read that follows counts it.
                let reply: Value = self
                    .redis
                    .xautoclaim(
                        self.keys.usage_stream(shard),
                        GROUP,
                        &self.settings.consumer_name,
                        min_idle,
                        cursor.as_str(),
                        Some(self.settings.batch_size as u64),
                        true,
                    )
                    .await?;
                let Value::Array(mut parts) = reply else {
                    break;
                };
                let ids = match parts.get(1) {
                    Some(Value::Array(ids)) => ids.len(),
                    _ => 0,
                };
                if ids > 0 {
                    claimed += ids;
                    self.own_pending[usize::from(shard)] = true;
                }
                let next = parts
                    .drain(..)
                    .next()
                    .and_then(|v| v.as_string())
                    .unwrap_or_else(|| "0-0".into());
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        if claimed > 0 {
            tracing::info!(claimed, "took over usage events of an idle flusher");
            metrics::counter!("flusher_entries_claimed_total").increment(claimed as u64);
        }
        Ok(claimed)
    }

    /// Deletes the entries every consumer has acknowledged: those below
    /// both the oldest pending entry and the last one delivered. Never
    /// MAXLEN, which could drop undelivered entries.
    pub async fn trim(&self) -> anyhow::Result<()> {
        for stream in self.keys.usage_streams() {
            // The last delivered id is read first: whatever is delivered
            // after it lies above it, and whatever below it is still
            // unacknowledged shows in the pending summary read next.
            let Some(group) = group_info(&self.redis, stream).await? else {
                continue;
            };
            let oldest_pending = oldest_pending(&self.redis, stream).await?;
            let floor = match oldest_pending {
                Some(pending) if id_lt(&pending, &group.last_delivered) => pending,
                _ => group.last_delivered,
            };
            if floor == "0-0" {
                continue;
            }
            let _: i64 = self
                .redis
                .custom(
                    fred::cmd!("XTRIM"),
                    vec![stream.clone(), "MINID".into(), floor],
                )
                .await?;
        }
        Ok(())
    }

    /// Measures every shard's backlog and exports it: `usage_stream_entries`,
    /// `usage_stream_pending`, `usage_stream_undelivered` and
    /// `usage_stream_oldest_unflushed_seconds`, per shard.
    pub async fn observe(&self) -> anyhow::Result<Vec<StreamBacklog>> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(usize::from(self.keys.shards()));
        for shard in 0..self.keys.shards() {
            let stream = self.keys.usage_stream(shard);
            let entries: u64 = self.redis.xlen(stream).await?;
            let mut backlog = StreamBacklog {
                shard,
                entries,
                ..Default::default()
            };
            if let Some(group) = group_info(&self.redis, stream).await? {
                backlog.pending = group.pending;
                // The first entry after the last delivered one is the oldest
                // undelivered.
                let first_undelivered: Value = self
                    .redis
                    .xrange(stream, format!("({}", group.last_delivered), "+", Some(1))
                    .await?;
                // When Redis does not know the lag (after deletions inside
                // the stream), every entry not pending is counted: an upper
                // bound, off by the acknowledged entries not yet trimmed.
                backlog.undelivered = group
                    .lag
                    .unwrap_or_else(|| entries.saturating_sub(group.pending));
                let oldest = match oldest_pending(&self.redis, stream).await? {
                    Some(id) => Some(id),
                    None => entry_ids(first_undelivered).into_iter().next(),
                };
                if let Some(ms) = oldest.as_deref().and_then(id_millis) {
                    backlog.oldest_unflushed_ms = now_ms.saturating_sub(ms);
                }
            }
            let label = shard.to_string();
            metrics::gauge!("usage_stream_entries", "shard" => label.clone())
                .set(backlog.entries as f64);
            metrics::gauge!("usage_stream_pending", "shard" => label.clone())
                .set(backlog.pending as f64);
            metrics::gauge!("usage_stream_undelivered", "shard" => label.clone())
                .set(backlog.undelivered as f64);
            metrics::gauge!("usage_stream_oldest_unflushed_seconds", "shard" => label)
                .set(backlog.oldest_unflushed_ms as f64 / 1000.0);
            out.push(backlog);
        }
        Ok(out)
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

/// Postgres refused the data itself (SQLSTATE classes 22, data exception,
/// and 23, integrity constraint violation): retrying the same rows gives
/// the same answer. Anything else may pass on a retry.
fn is_data_error(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")))
}

struct GroupInfo {
    last_delivered: String,
    pending: u64,
    /// Entries not yet delivered, when Redis knows.
    lag: Option<u64>,
}

/// The `flusher` group's line of XINFO GROUPS, if the group exists.
async fn group_info(redis: &Client, stream: &str) -> anyhow::Result<Option<GroupInfo>> {
    let groups: Value = match redis.xinfo_groups(stream).await {
        Ok(groups) => groups,
        // No stream yet.
        Err(e) if e.details().contains("no such key") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Value::Array(groups) = groups else {
        return Ok(None);
    };
    for group in groups {
        let Value::Array(fields) = group else {
            continue;
        };
        let (mut name, mut last, mut pending, mut lag) = (None, None, 0, None);
        for pair in fields.chunks(2) {
            let [key, value] = pair else { continue };
            match key.as_str().as_deref() {
                Some("name") => name = value.as_string(),
                Some("last-delivered-id") => last = value.as_string(),
                Some("pending") => pending = value.as_u64().unwrap_or(0),
                Some("lag") => lag = value.as_u64(),
                _ => {}
            }
        }
        if name.as_deref() == Some(GROUP) {
            return Ok(Some(GroupInfo {
                last_delivered: last.unwrap_or_else(|| "0-0".into()),
                pending,
                lag,
            }));
        }
    }
    Ok(None)
}

/// The smallest id pending in the group (XPENDING's summary form).
async fn oldest_pending(redis: &Client, stream: &str) -> anyhow::Result<Option<String>> {
    let pending: Value = redis.xpending(stream, GROUP, ()).await?;
    Ok(match pending {
        Value::Array(v) if v.len() >= 2 => v[1].as_string(),
        _ => None,
    })
}

/// The ids of an XRANGE reply.
fn entry_ids(reply: Value) -> Vec<String> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| match entry {
            Value::Array(mut pair) if !pair.is_empty() => pair.swap_remove(0).as_string(),
            _ => None,
        })
        .collect()
}

/// A stream id (`<ms>-<seq>`) as numbers.
fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The milliseconds part of a stream id.
fn id_millis(id: &str) -> Option<u64> {
    Some(parse_id(id).0).filter(|ms| *ms > 0)
}

/// Whether stream id `a` sorts before `b`.
fn id_lt(a: &str, b: &str) -> bool {
    parse_id(a) < parse_id(b)
}

/// XREADGROUP's reply for one stream: `[[stream, [[id, [f, v, …] | nil], …]]]`.
/// Appends its entries to `batch`.
fn parse_xread(reply: Value, shard: u16, batch: &mut Batch) {
    let Value::Array(streams) = reply else {
        return;
    };
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            continue;
        };
        if parts.len() < 2 {
            continue;
        }
        let Value::Array(entries) = parts.remove(1) else {
            continue;
        };
        for entry in entries {
            let Value::Array(mut pair) = entry else {
                continue;
            };
            if pair.len() < 2 {
                continue;
            }
            let fields = pair.remove(1);
            let Some(id) = pair[0].as_string() else {
                continue;
            };
            // Moved out, not copied: a batch holds megabytes of fields.
            let fields = match fields {
                Value::Array(kv) => {
                    let mut pairs = Vec::with_capacity(kv.len() / 2);
                    let mut kv = kv.into_iter();
                    while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                        if let (Some(k), Some(v)) = (k.into_string(), v.into_string()) {
                            pairs.push((k, v));
                        }
                    }
                    Some(pairs)
                }
                _ => None,
            };
            batch.entries.push(Entry { shard, id, fields });
        }
    }
}

/// The `d` field of an event, as [`crate::hot::charge::EventDetails`] writes it.
#[derive(serde::Deserialize)]
struct Details {
    e: Uuid,
    c: Uuid,
    a: Uuid,
    s: Option<String>,
    k: Option<Uuid>,
    m: Option<Box<RawValue>>,
}

/// The metadata fields the ledger reads (the API checked their types).
#[derive(serde::Deserialize)]
struct KnownMetadata<'a> {
    #[serde(default, borrow)]
    ip_address: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user_agent: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    visitor_id: Option<Cow<'a, str>>,
    #[serde(default)]
    processing_time_ms: Option<f64>,
}

/// Decodes one event as `lua/consume.lua` writes it.
pub fn decode(fields: &[(String, String)]) -> Result<UsageRow, String> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let int = |name: &str| -> Result<i64, String> {
        get(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("field `{name}` is not an integer"))
    };
    let details: Details = serde_json::from_str(get("d").ok_or("field `d` is missing")?)
        .map_err(|e| format!("field `d` is not an event: {e}"))?;
    let tokens = int("t")?;
    let purchased = int("p")?;
    if tokens < 1 || tokens > i64::from(i32::MAX) || purchased < 0 || purchased > tokens {
        return Err("token counts out of range".into());
    }
    let created_at: DateTime<Utc> = Utc
        .timestamp_millis_opt(int("ts")?)
        .single()
        .ok_or("field `ts` is not a time")?;
    let metadata = match details.m {
        Some(m) => m,
        None => RawValue::from_string("{}".into()).map_err(|e| e.to_string())?,
    };
    let known: KnownMetadata = serde_json::from_str(metadata.get())
        .map_err(|e| format!("metadata is not an object of the expected types: {e}"))?;
    let ip_address = known
        .ip_address
        .and_then(|s| s.parse::<IpAddr>().ok())
        .map(IpNetwork::from);
    let user_agent = known.user_agent.map(Cow::into_owned);
    let visitor_id = known.visitor_id.map(Cow::into_owned);
    let processing_time_ms = known.processing_time_ms;
    Ok(UsageRow {
        id: details.e,
        customer_id: details.c,
        app_id: details.a,
        tokens: tokens as i32,
        purchased_tokens: purchased as i32,
        session_id: details.s,
        metadata,
        ip_address,
        user_agent,
        visitor_id,
        processing_time_ms,
        embed_key_id: details.k,
        created_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_event_decodes_into_a_usage_row() {
        let id = Uuid::now_v7();
        let details = format!(
            r#"{{"e":"{id}","c":"0193a000-0000-7000-8000-000000000001","a":"0193a000-0000-7000-8000-000000000002","s":"sess-1","k":null,"m":{{"ip_address":"10.0.0.1","user_agent":"UA"}}}}"#
        );
        let row = decode(&fields(&[
            ("d", &details),
            ("t", "5"),
            ("p", "2"),
            ("ts", "1764150000000"),
        ]))
        .unwrap();
        assert_eq!(row.id, id);
        assert_eq!((row.tokens, row.purchased_tokens), (5, 2));
        assert_eq!(row.session_id.as_deref(), Some("sess-1"));
        assert_eq!(row.user_agent.as_deref(), Some("UA"));
        assert!(row.ip_address.is_some());
        assert_eq!(row.embed_key_id, None);
    }

    #[test]
    fn a_malformed_event_is_refused_with_a_reason() {
        let err = decode(&fields(&[("d", "{}"), ("t", "1")])).unwrap_err();
        assert!(err.contains("`d`"), "{err}");
    }

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(id_lt("1-5", "2-0"));
        assert!(id_lt("2-1", "2-10"));
        assert!(!id_lt("2-0", "2-0"));
        assert_eq!(id_millis("1764150000000-3"), Some(1_764_150_000_000));
    }
}
