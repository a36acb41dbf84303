//! Acknowledging a written batch, and moving aside what cannot be written.

use fred::{prelude::*, types::Value};
use std::collections::BTreeMap;

use super::{Batch, Entry, Flusher, Written, GROUP};

impl Flusher {
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
            // In the ledger now, whether or not the acknowledgement lands.
            let seen = &mut self.unflushed_seen[usize::from(shard)];
            *seen = seen.saturating_sub(ids.len() as u64);
            let _: i64 = self
                .redis
                .xack(self.keys.usage_stream(shard), GROUP, ids)
                .await?;
        }
        metrics::counter!("flusher_events_persisted_total").increment(written.inserted as u64);
        metrics::counter!("flusher_events_duplicate_total").increment(written.duplicates as u64);
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
}
