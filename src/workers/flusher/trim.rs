//! Trimming the streams of what every consumer has acknowledged.

use fred::prelude::*;

use super::Flusher;
use crate::hot::streams::{group_info, id_lt, oldest_pending};

impl Flusher {
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
}
