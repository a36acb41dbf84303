//! The usage streams' consumer group as Redis reports it, and stream ids:
//! read by the flusher (to trim and to measure the backlog) and by a
//! rebuild (to find a customer's events not yet in the ledger).

use fred::{prelude::*, types::Value};

/// The consumer group every flusher reads the usage streams through.
pub const GROUP: &str = "flusher";

pub(crate) struct GroupInfo {
    pub last_delivered: String,
    pub pending: u64,
    /// Entries not yet delivered, when Redis knows.
    pub lag: Option<u64>,
}

/// The `flusher` group's line of XINFO GROUPS, if the group exists.
pub(crate) async fn group_info(redis: &Client, stream: &str) -> anyhow::Result<Option<GroupInfo>> {
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
pub(crate) async fn oldest_pending(redis: &Client, stream: &str) -> anyhow::Result<Option<String>> {
    let pending: Value = redis.xpending(stream, GROUP, ()).await?;
    Ok(match pending {
        Value::Array(v) if v.len() >= 2 => v[1].as_string(),
        _ => None,
    })
}

/// The ids of an XRANGE reply.
pub(crate) fn entry_ids(reply: Value) -> Vec<String> {
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
pub(crate) fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The milliseconds part of a stream id.
pub(crate) fn id_millis(id: &str) -> Option<u64> {
    Some(parse_id(id).0).filter(|ms| *ms > 0)
}

/// Whether stream id `a` sorts before `b`.
pub(crate) fn id_lt(a: &str, b: &str) -> bool {
    parse_id(a) < parse_id(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_by_time_then_sequence() {
        assert!(id_lt("1-5", "2-0"));
        assert!(id_lt("2-1", "2-10"));
        assert!(!id_lt("2-0", "2-0"));
        assert_eq!(id_millis("1764150000000-3"), Some(1_764_150_000_000));
    }
}
