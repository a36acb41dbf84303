//! Taking a batch: this consumer's pending entries first, then new ones,
//! over the shards in turn; and taking over what a dead flusher left.

use fred::{prelude::*, types::Value};

use super::{Batch, Entry, Flusher, GROUP, READ_CHUNK};

impl Flusher {
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

    async fn read(
        &mut self,
        shard: u16,
        from: &str,
        count: usize,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let reply = match self.read_once(shard, from, count).await {
            Err(e) if e.details().starts_with("NOGROUP") => {
                self.group_lost(shard).await?;
                self.read_once(shard, from, count).await?
            }
            reply => reply?,
        };
        parse_xread(reply, shard, batch);
        Ok(())
    }

    async fn read_once(&self, shard: u16, from: &str, count: usize) -> Result<Value, Error> {
        self.redis
            .xreadgroup(
                GROUP,
                &self.settings.consumer_name,
                Some(count as u64),
                None,
                false,
                self.keys.usage_stream(shard),
                from,
            )
            .await
    }

    /// A shard's stream without its consumer group: Redis lost its data (a
    /// restart without persistence, a failover to a replica that had not
    /// received it, a flush) and the consumes since made a new stream. The
    /// group is made again from the stream's start, so those are flushed,
    /// and the balances are rebuilt from the ledger (README, "Redis
    /// durability").
    ///
    /// The charges made before the loss and not yet flushed are gone with
    /// the stream, and nothing left in Redis or Postgres counts them: the
    /// count reported is the shard's unflushed backlog as this flusher last
    /// measured it (at most `OBSERVE_EVERY` before), less what it flushed
    /// since. Charges made after that measurement are not in it, and
    /// events another flusher wrote meanwhile are, so it is the size of
    /// the loss, not a list of it.
    async fn group_lost(&mut self, shard: u16) -> anyhow::Result<()> {
        // Not made here when another flusher made it again first (and
        // reported it).
        if self.create_group(self.keys.usage_stream(shard)).await? {
            let lost = std::mem::take(&mut self.unflushed_seen[usize::from(shard)]);
            tracing::error!(
                shard,
                possibly_lost = lost,
                "the usage stream had lost its consumer group: Redis lost its data, \
                 and the charges not flushed before it are lost; the group is made again"
            );
            metrics::counter!("usage_stream_groups_lost_total").increment(1);
            metrics::counter!("usage_events_possibly_lost_total").increment(lost);
        }
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
}

/// XREADGROUP's reply for one stream: `[[stream, [[id, [f, v, …] | nil], …]]]`.
/// Appends its entries to `batch`.
pub(super) fn parse_xread(reply: Value, shard: u16, batch: &mut Batch) {
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
