//! A customer's usage events still in Redis: charged, not yet known to be
//! in the ledger.
//!
//! A rebuild of a lost account hash takes the balance from the ledger,
//! which lacks what the flusher has not written yet. Those events are in
//! the customer's shard stream, in its unflushed part: from the oldest
//! entry pending with a flusher (delivered, maybe written, not yet
//! acknowledged), or past the last one delivered when none is pending, to
//! the end. What lies below was acknowledged, hence committed; entries in
//! the range may be committed too (written, not yet acknowledged, or
//! acknowledged since), so the caller asks the ledger which of them it
//! holds.

use fred::prelude::*;
use uuid::Uuid;

use super::{
    streams::{group_info, oldest_pending},
    HotError, HotStore,
};

/// Entries read per XRANGE.
const PAGE: u64 = 1000;

/// One charge found in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnflushedEvent {
    pub id: Uuid,
    pub tokens: i64,
    /// Of which drawn from purchased tokens.
    pub purchased: i64,
    /// When it was charged, epoch ms (Redis's clock).
    pub at_ms: i64,
}

/// The part of the `d` field that names the event and its customer.
#[derive(serde::Deserialize)]
struct Owner {
    e: Uuid,
    c: Uuid,
}

impl HotStore {
    /// The customer's events in the unflushed part of its shard stream, or
    /// `None` when that part holds more than `limit` entries (the flusher
    /// is far behind: reading it all would cost more than waiting).
    pub async fn unflushed_usage(
        &self,
        customer: Uuid,
        limit: usize,
    ) -> Result<Option<Vec<UnflushedEvent>>, HotError> {
        let needle = customer.hyphenated().to_string();
        self.unflushed(self.keys.shard_of(customer), limit, |fields| {
            // Most entries are other customers': a substring test spares
            // parsing them.
            if !field(fields, "d")?.contains(&needle) {
                return None;
            }
            charge_in(fields)
                .filter(|(owner, _)| *owner == customer)
                .map(|(_, event)| event)
        })
        .await
    }

    /// Every customer's events in the unflushed part of `shard`'s stream,
    /// with their customer, or `None` past `limit` entries.
    pub async fn unflushed_usage_of_shard(
        &self,
        shard: u16,
        limit: usize,
    ) -> Result<Option<Vec<(Uuid, UnflushedEvent)>>, HotError> {
        self.unflushed(shard, limit, charge_in).await
    }

    /// What `pick` makes of each entry in the unflushed part of `shard`'s
    /// stream, in order.
    async fn unflushed<T>(
        &self,
        shard: u16,
        limit: usize,
        mut pick: impl FnMut(&[(String, String)]) -> Option<T>,
    ) -> Result<Option<Vec<T>>, HotError> {
        let redis = self.client();
        let stream = self.keys.usage_stream(shard);
        let unavailable = |e: anyhow::Error| HotError::Unavailable(e);
        // The last delivered id first: entries delivered after it lie
        // above it, and entries below it not yet acknowledged show in the
        // pending summary read next.
        let mut from = match group_info(redis, stream).await.map_err(unavailable)? {
            None => "-".to_owned(),
            Some(group) => match oldest_pending(redis, stream).await.map_err(unavailable)? {
                Some(oldest) => oldest,
                None => format!("({}", group.last_delivered),
            },
        };
        let mut found = Vec::new();
        let mut scanned = 0;
        loop {
            let page: Vec<(String, Vec<(String, String)>)> =
                redis.xrange(stream, from.as_str(), "+", Some(PAGE)).await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            from = format!("({last}");
            scanned += page.len();
            if scanned > limit {
                return Ok(None);
            }
            let full = page.len() as u64 == PAGE;
            found.extend(page.iter().filter_map(|(_, fields)| pick(fields)));
            if !full {
                break;
            }
        }
        Ok(Some(found))
    }
}

/// The entry's field `name`.
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The entry as a charge: its customer and the event.
fn charge_in(fields: &[(String, String)]) -> Option<(Uuid, UnflushedEvent)> {
    let owner: Owner = serde_json::from_str(field(fields, "d")?).ok()?;
    let event = UnflushedEvent {
        id: owner.e,
        tokens: field(fields, "t")?.parse().ok()?,
        purchased: field(fields, "p")?.parse().ok()?,
        at_ms: field(fields, "ts")?.parse().ok()?,
    };
    Some((owner.c, event))
}
