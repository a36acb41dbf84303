//! What a batch of new usage rows adds to the daily aggregates.
//!
//! Aggregates are per customer, app and UTC day:
//!
//! - `tokens_consumed` and `events_count`: sums over the rows;
//! - `sessions_count`: distinct `session_id`s;
//! - `unique_users`: distinct visitors, each identified by
//!   `metadata.visitor_id`, else by its IP address and user agent (an event
//!   with none of the three has no visitor);
//! - `avg_processing_time_ms`: the mean of `metadata.processing_time_ms`
//!   over the events that carry it, kept as a sum (in µs) and a count.
//!
//! Distinct counts are exact, not estimated: each session and visitor of a
//! day is recorded once in `usage_daily_distinct` under a 128-bit hash of
//! its identity, and only a first sighting adds one to the day. (A
//! HyperLogLog would be smaller, but its ~0.8 % error would show on a
//! merchant's invoice-adjacent dashboard, and its registers would live in
//! Redis, which is not the ledger.) The odds of two identities of one day
//! sharing a 128-bit hash are below 10^-20.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::ledger::usage::UsageRow;

/// One row of `usage_analytics_daily`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DayKey {
    pub customer_id: Uuid,
    pub app_id: Uuid,
    pub date: NaiveDate,
}

/// What new rows add to one day. `sessions` and `visitors` are filled in
/// once Postgres has said which identities are new.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayTotals {
    pub tokens: i64,
    pub events: i64,
    pub processing_time_us: i64,
    pub processing_time_samples: i64,
    pub sessions: i64,
    pub visitors: i64,
}

/// A session or a visitor seen on a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Sighting {
    pub day: DayKey,
    pub kind: Identity,
    pub hash: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    Session,
    Visitor,
}

impl Identity {
    /// The `kind` column of `usage_daily_distinct`.
    pub fn code(self) -> i8 {
        match self {
            Self::Session => b's' as i8,
            Self::Visitor => b'v' as i8,
        }
    }

    pub fn from_code(code: i8) -> Option<Self> {
        match code as u8 {
            b's' => Some(Self::Session),
            b'v' => Some(Self::Visitor),
            _ => None,
        }
    }
}

/// The day totals and the sightings of a batch of newly inserted rows.
pub fn summarize<'a>(
    rows: impl IntoIterator<Item = &'a UsageRow>,
) -> (BTreeMap<DayKey, DayTotals>, BTreeSet<Sighting>) {
    let mut days: BTreeMap<DayKey, DayTotals> = BTreeMap::new();
    let mut sightings = BTreeSet::new();
    for row in rows {
        let day = DayKey {
            customer_id: row.customer_id,
            app_id: row.app_id,
            date: row.created_at.date_naive(),
        };
        let totals = days.entry(day).or_default();
        totals.tokens += i64::from(row.tokens);
        totals.events += 1;
        if let Some(us) = processing_time_us(&row.metadata) {
            totals.processing_time_us += us;
            totals.processing_time_samples += 1;
        }
        if let Some(session) = &row.session_id {
            sightings.insert(Sighting {
                day,
                kind: Identity::Session,
                hash: hash(session.as_bytes()),
            });
        }
        if let Some(visitor) = visitor_identity(row) {
            sightings.insert(Sighting {
                day,
                kind: Identity::Visitor,
                hash: hash(visitor.as_bytes()),
            });
        }
    }
    (days, sightings)
}

/// `metadata.processing_time_ms` in whole microseconds. The API accepted
/// only numbers from 0 to 86,400,000, so anything else is not a sample.
fn processing_time_us(metadata: &serde_json::Value) -> Option<i64> {
    let ms = metadata.get("processing_time_ms")?.as_f64()?;
    (0.0..=86_400_000.0)
        .contains(&ms)
        .then(|| (ms * 1000.0).round() as i64)
}

/// Who used the app: `visitor_id` when the embed sends one, else the IP
/// address and user agent together.
fn visitor_identity(row: &UsageRow) -> Option<String> {
    if let Some(visitor) = row
        .metadata
        .get("visitor_id")
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
    {
        return Some(format!("v:{visitor}"));
    }
    if row.ip_address.is_none() && row.user_agent.is_none() {
        return None;
    }
    Some(format!(
        "a:{}|{}",
        row.ip_address
            .map(|ip| ip.ip().to_string())
            .unwrap_or_default(),
        row.user_agent.as_deref().unwrap_or_default()
    ))
}

fn hash(identity: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(identity);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;

    fn row(session: Option<&str>, metadata: serde_json::Value, hour: u32) -> UsageRow {
        UsageRow {
            id: Uuid::now_v7(),
            customer_id: Uuid::from_u128(1),
            app_id: Uuid::from_u128(2),
            tokens: 5,
            purchased_tokens: 0,
            session_id: session.map(str::to_owned),
            ip_address: metadata
                .get("ip_address")
                .and_then(|v| v.as_str())
                .map(|s| s.parse::<std::net::IpAddr>().unwrap().into()),
            user_agent: metadata
                .get("user_agent")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            metadata,
            embed_key_id: None,
            created_at: Utc.with_ymd_and_hms(2026, 11, 26, hour, 0, 0).unwrap(),
        }
    }

    #[test]
    fn a_day_sums_tokens_and_processing_time_and_counts_each_identity_once() {
        let rows = [
            row(
                Some("s1"),
                json!({"visitor_id": "v1", "processing_time_ms": 100}),
                1,
            ),
            row(
                Some("s1"),
                json!({"visitor_id": "v1", "processing_time_ms": 0.5}),
                2,
            ),
            row(
                Some("s2"),
                json!({"ip_address": "10.0.0.1", "user_agent": "UA"}),
                3,
            ),
            row(None, json!({}), 4),
        ];

        let (days, sightings) = summarize(&rows);

        let totals = days.values().next().unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!((totals.tokens, totals.events), (20, 4));
        assert_eq!(
            (totals.processing_time_us, totals.processing_time_samples),
            (100_500, 2)
        );
        let count = |kind| sightings.iter().filter(|s| s.kind == kind).count();
        assert_eq!(count(Identity::Session), 2, "s1 and s2");
        assert_eq!(count(Identity::Visitor), 2, "v1 and 10.0.0.1 with UA");
    }

    #[test]
    fn days_are_utc_days() {
        let mut late = row(None, json!({}), 23);
        late.created_at += chrono::Duration::minutes(59);
        let mut next = row(None, json!({}), 23);
        next.created_at += chrono::Duration::minutes(61);

        let (days, _) = summarize([&late, &next]);

        let dates: Vec<_> = days.keys().map(|k| k.date.to_string()).collect();
        assert_eq!(dates, ["2026-11-26", "2026-11-27"]);
    }

    #[test]
    fn a_visitor_id_outranks_the_address_and_agent() {
        let with_id = row(
            None,
            json!({"visitor_id": "v1", "ip_address": "10.0.0.1"}),
            1,
        );
        let without = row(None, json!({"ip_address": "10.0.0.1"}), 1);
        assert_eq!(visitor_identity(&with_id).as_deref(), Some("v:v1"));
        assert_eq!(visitor_identity(&without).as_deref(), Some("a:10.0.0.1|"));
        assert_eq!(visitor_identity(&row(None, json!({}), 1)), None);
    }
}
