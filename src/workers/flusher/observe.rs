//! Measuring the backlog of every shard stream, for the gauges.

use std::time::{SystemTime, UNIX_EPOCH};

use fred::{prelude::*, types::Value};

use super::{Flusher, StreamBacklog};
use crate::hot::streams::{entry_ids, group_info, id_millis, oldest_pending};

impl Flusher {
    /// Measures every shard's backlog and exports it: `usage_stream_entries`,
    /// `usage_stream_pending`, `usage_stream_undelivered` and
    /// `usage_stream_oldest_unflushed_seconds`, per shard. Remembers each
    /// shard's unflushed count, to say how many charges a loss took.
    pub async fn observe(&mut self) -> anyhow::Result<Vec<StreamBacklog>> {
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
            self.unflushed_seen[usize::from(shard)] = backlog.pending + backlog.undelivered;
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
}
