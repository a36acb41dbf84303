//! The flusher: usage events from the Redis streams into `token_usage`.
//!
//! Each shard stream is read through the consumer group `flusher`
//! (XREADGROUP), so several flusher processes share the work and an entry
//! stays pending until it is acknowledged. A batch takes entries from the
//! shards in turn, up to `FLUSH_BATCH_SIZE`; one Postgres transaction
//! inserts its rows in one statement (idempotent by event id)
//! and brings the balances in step with exactly the rows it inserted; the
//! entries are acknowledged (XACK) only after the commit. A crash between
//! commit and XACK redelivers entries whose rows exist: the insert skips
//! them and nothing is counted twice.
//!
//! Reads are per shard and non-blocking, so the flusher works the same on
//! Redis Cluster, where one command cannot span slots.
//!
//! [`Flusher::step`] does one pass and is public, so tests drain the
//! streams deterministically.

use std::{collections::HashSet, net::IpAddr, time::Duration};

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use fred::{prelude::*, types::Value};
use sqlx::{types::ipnetwork::IpNetwork, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{FlusherSettings, RedisSettings},
    hot::Keys,
    ledger::{partitions, usage},
};

pub const GROUP: &str = "flusher";

/// How often acknowledged entries are trimmed from the streams.
const TRIM_EVERY: Duration = Duration::from_secs(5);

pub struct Flusher {
    redis: Client,
    db: PgPool,
    keys: Keys,
    settings: FlusherSettings,
    /// Months known to have a partition.
    partitions: HashSet<NaiveDate>,
    /// The shard the next pass starts from, so no shard is starved.
    next_shard: u16,
}

/// One stream entry: its id and its fields, or `None` fields for an entry
/// deleted while pending.
type Entry = (String, Option<Vec<(String, String)>>);

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
        let flusher = Self {
            redis: client,
            db,
            keys: Keys::new(&redis.key_prefix, redis.stream_shards),
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

    /// One batch: this consumer's pending entries first (left by a failed
    /// or crashed attempt before XACK), then new ones, over the shards in
    /// turn, up to the batch size in all; persisted in one transaction,
    /// then acknowledged. Returns how many entries it took.
    pub async fn step(&mut self) -> anyhow::Result<usize> {
        let shards = self.keys.shards();
        let budget = self.settings.batch_size;
        let mut batch: Vec<(u16, Vec<Entry>)> = Vec::new();
        let mut taken = 0;
        for i in 0..shards {
            if taken >= budget {
                break;
            }
            let shard = (self.next_shard + i) % shards;
            let stream = self.keys.usage_stream(shard);
            let mut entries = self.read(stream, "0", budget - taken).await?;
            if entries.is_empty() {
                entries = self.read(stream, ">", budget - taken).await?;
            }
            if !entries.is_empty() {
                taken += entries.len();
                batch.push((shard, entries));
            }
        }
        self.next_shard = (self.next_shard + 1) % shards;
        if taken > 0 {
            self.persist(&batch).await?;
        }
        Ok(taken)
    }

    async fn persist(&mut self, batch: &[(u16, Vec<Entry>)]) -> anyhow::Result<()> {
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        let mut dead = Vec::new();
        for (shard, entries) in batch {
            for (id, fields) in entries {
                match fields.as_deref().map(decode) {
                    Some(Ok(row)) if seen.insert((row.id, row.created_at)) => rows.push(row),
                    // A duplicate inside the batch.
                    Some(Ok(_)) => {}
                    Some(Err(reason)) => {
                        dead.push((*shard, id, fields.as_deref().unwrap_or_default(), reason))
                    }
                    // Deleted while pending: nothing left to persist.
                    None => {}
                }
            }
        }

        for row in &rows {
            let month = partitions::month_of(row.created_at.date_naive());
            if !self.partitions.contains(&month) {
                partitions::ensure_month(&self.db, month).await?;
                self.partitions.insert(month);
            }
        }

        let mut tx = self.db.begin().await?;
        let inserted = usage::insert_batch(&mut tx, &rows).await?;
        usage::apply_to_balances(&mut tx, &inserted).await?;
        tx.commit().await?;

        for (shard, id, fields, reason) in &dead {
            self.dead_letter(*shard, id, fields, reason).await?;
        }
        for (shard, entries) in batch {
            let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
            let _: i64 = self
                .redis
                .xack(self.keys.usage_stream(*shard), GROUP, ids)
                .await?;
        }
        metrics::counter!("flusher_events_persisted_total").increment(inserted.len() as u64);
        metrics::counter!("flusher_events_duplicate_total")
            .increment((rows.len() - inserted.len()) as u64);
        Ok(())
    }

    async fn read(&self, stream: &str, from: &str, count: usize) -> anyhow::Result<Vec<Entry>> {
        let reply: Value = self
            .redis
            .xreadgroup(
                GROUP,
                &self.settings.consumer_name,
                Some(count as u64),
                None,
                false,
                stream,
                from,
            )
            .await?;
        Ok(parse_xread(reply))
    }

    /// Moves an entry that cannot be decoded aside, so the rest flow on.
    async fn dead_letter(
        &self,
        shard: u16,
        id: &str,
        fields: &[(String, String)],
        reason: &str,
    ) -> anyhow::Result<()> {
        tracing::error!(
            entry = id,
            reason,
            "usage event cannot be decoded; moved to the dead-letter stream"
        );
        metrics::counter!("flusher_dead_letters_total").increment(1);
        let mut values: Vec<(String, String)> = vec![
            ("source_id".into(), id.into()),
            ("reason".into(), reason.into()),
        ];
        values.extend(fields.iter().cloned());
        let _: String = self
            .redis
            .xadd(
                format!("{}:dead", self.keys.usage_stream(shard)),
                false,
                None,
                "*",
                values,
            )
            .await?;
        Ok(())
    }

    /// Deletes entries every consumer has acknowledged: everything below the
    /// oldest pending entry, or, with none pending, up to the last one
    /// delivered. Never MAXLEN, which could drop undelivered entries.
    pub async fn trim(&self) -> anyhow::Result<()> {
        for stream in self.keys.usage_streams() {
            let pending: Value = self.redis.xpending(stream, GROUP, ()).await?;
            let oldest_pending = match &pending {
                Value::Array(v) if v.len() >= 2 => v[1].as_string(),
                _ => None,
            };
            let floor = match oldest_pending {
                Some(id) => id,
                None => match last_delivered(&self.redis, stream).await? {
                    Some(id) => id,
                    None => continue,
                },
            };
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

    /// Runs until `shutdown`; a batch in flight is finished first.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut last_trim = tokio::time::Instant::now();
        loop {
            if shutdown.is_cancelled() {
                break;
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
                    tracing::warn!(error = ?e, retry_in = ?backoff, "flush failed; the events stay pending");
                    metrics::counter!("flusher_errors_total").increment(1);
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    wait
                }
            };
            if last_trim.elapsed() >= TRIM_EVERY {
                if let Err(e) = self.trim().await {
                    tracing::warn!(error = ?e, "stream trim failed");
                }
                last_trim = tokio::time::Instant::now();
            }
            if !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let _ = self.redis.quit().await;
        tracing::info!("flusher stopped");
    }
}

async fn last_delivered(redis: &Client, stream: &str) -> anyhow::Result<Option<String>> {
    let groups: Value = redis.xinfo_groups(stream).await?;
    let Value::Array(groups) = groups else {
        return Ok(None);
    };
    for group in groups {
        let Value::Array(fields) = group else {
            continue;
        };
        let mut name = None;
        let mut last = None;
        for pair in fields.chunks(2) {
            match pair[0].as_str().as_deref() {
                Some("name") => name = pair[1].as_string(),
                Some("last-delivered-id") => last = pair[1].as_string(),
                _ => {}
            }
        }
        if name.as_deref() == Some(GROUP) {
            return Ok(last);
        }
    }
    Ok(None)
}

/// XREADGROUP's reply for one stream: `[[stream, [[id, [f, v, …] | nil], …]]]`.
fn parse_xread(reply: Value) -> Vec<Entry> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut out = Vec::new();
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
            let fields = match fields {
                Value::Array(kv) => Some(
                    kv.chunks(2)
                        .filter_map(|c| Some((c[0].as_string()?, c.get(1)?.as_string()?)))
                        .collect(),
                ),
                _ => None,
            };
            out.push((id, fields));
        }
    }
    out
}

/// The `d` field of an event, as [`crate::hot::charge::EventDetails`] writes it.
#[derive(serde::Deserialize)]
struct Details {
    e: Uuid,
    c: Uuid,
    a: Uuid,
    s: Option<String>,
    k: Option<Uuid>,
    m: Option<serde_json::Value>,
}

/// Decodes one event as `lua/consume.lua` writes it.
pub fn decode(fields: &[(String, String)]) -> Result<usage::UsageRow, String> {
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
    let metadata = details.m.unwrap_or_else(|| serde_json::json!({}));
    if !metadata.is_object() {
        return Err("metadata is not an object".into());
    }
    let ip_address = metadata
        .get("ip_address")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<IpAddr>().ok())
        .map(IpNetwork::from);
    let user_agent = metadata
        .get("user_agent")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    Ok(usage::UsageRow {
        id: details.e,
        customer_id: details.c,
        app_id: details.a,
        tokens: tokens as i32,
        purchased_tokens: purchased as i32,
        session_id: details.s,
        metadata,
        ip_address,
        user_agent,
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
}
