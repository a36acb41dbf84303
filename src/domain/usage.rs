//! Usage: what a batch of new usage rows adds to the daily aggregates, and
//! the report the merchants' dashboards read.
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

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    domain::accounts::Accounts,
    error::{ApiError, FieldError},
    hot::HotStore,
    ledger::usage::{self as ledger_usage, ReportLine, UsageRow},
};

/// The longest range of days one report covers.
pub const MAX_REPORT_DAYS: i64 = 366;

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
    pub hash: Uuid,
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
        if let Some(us) = row.processing_time_ms.and_then(processing_time_us) {
            totals.processing_time_us += us;
            totals.processing_time_samples += 1;
        }
        if let Some(session) = &row.session_id {
            sightings.insert(Sighting {
                day,
                kind: Identity::Session,
                hash: hash(b's', session.as_bytes()),
            });
        }
        if let Some(visitor) = visitor_identity(row) {
            sightings.insert(Sighting {
                day,
                kind: Identity::Visitor,
                hash: hash(b'v', visitor.as_bytes()),
            });
        }
    }
    (days, sightings)
}

/// `metadata.processing_time_ms` in whole microseconds. The API accepted
/// only numbers from 0 to 86,400,000, so anything else is not a sample.
fn processing_time_us(ms: f64) -> Option<i64> {
    (0.0..=86_400_000.0)
        .contains(&ms)
        .then(|| (ms * 1000.0).round() as i64)
}

/// Who used the app: `visitor_id` when the embed sends one, else the IP
/// address and user agent together.
fn visitor_identity(row: &UsageRow) -> Option<String> {
    if let Some(visitor) = row.visitor_id.as_deref().filter(|v| !v.is_empty()) {
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

/// 128 bits of SHA-256 over the kind and the identity, as a UUID (the
/// column's type).
fn hash(kind: u8, identity: &[u8]) -> Uuid {
    let digest = Sha256::new()
        .chain_update([kind, b':'])
        .chain_update(identity)
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(out)
}

/// `GET /api/v1/customer/tokens/usage`, as in the specification.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub current_period: CurrentPeriod,
    pub usage_by_app: Vec<AppUsage>,
    pub daily_usage: Vec<DayUsage>,
}

/// The billing period, live from the hot store.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CurrentPeriod {
    /// The period's first instant; `null` without a subscription.
    pub start_date: Option<DateTime<Utc>>,
    /// The period's last second (it ends one second later); `null` without
    /// a subscription.
    pub end_date: Option<DateTime<Utc>>,
    /// Tokens drawn from the plan's allowance this period.
    pub tokens_used: i64,
    /// Tokens that can still be consumed: the allowance left plus purchased
    /// tokens, as `consume` reports it; -1 on an unlimited plan.
    pub tokens_remaining: i64,
    /// The allowance plus the purchased tokens left (`tokens_used +
    /// tokens_remaining` while the allowance lasts); -1 on an unlimited plan.
    pub tokens_total: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AppUsage {
    /// The app's slug, e.g. `vto-001`.
    pub app_id: String,
    pub app_name: String,
    pub tokens_consumed: i64,
    /// Distinct `session_id`s per day, summed over the range.
    pub sessions: i64,
    /// `tokens_consumed / sessions`, to two decimals; `null` without
    /// sessions.
    pub avg_tokens_per_session: Option<f64>,
}

/// One day of the range (UTC), every day present, zero when unused.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DayUsage {
    pub date: NaiveDate,
    pub tokens: i64,
    /// With `breakdown=app` only: the day's tokens by app slug (apps used
    /// that day; they sum to `tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps: Option<BTreeMap<String, i64>>,
}

/// Where a report's data comes from.
pub struct Reports<'a> {
    pub hot: &'a HotStore,
    pub accounts: &'a Accounts,
    pub db: &'a PgPool,
}

impl Reports<'_> {
    /// The usage report for `from..=to`, each defaulting to the current
    /// period's first and last day (the calendar month without a
    /// subscription).
    pub async fn usage(
        &self,
        customer: Uuid,
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
        by_app: bool,
    ) -> Result<UsageReport, ApiError> {
        let mut conn = self.db.acquire().await?;
        let period = ledger_usage::current_period(&mut conn, customer).await?;
        let balance = match self.hot.balance(customer).await? {
            Some(balance) => balance,
            None => {
                self.accounts.rebuild(customer).await?;
                self.hot.balance(customer).await?.ok_or_else(|| {
                    ApiError::Unavailable(anyhow::anyhow!("the account was not loaded"))
                })?
            }
        };
        let (from, to) = report_range(period, from, to, Utc::now())?;
        let lines = ledger_usage::report(&mut conn, customer, from, to, by_app).await?;

        let mut usage_by_app = Vec::new();
        let mut days: BTreeMap<NaiveDate, i64> = BTreeMap::new();
        let mut app_days: BTreeMap<NaiveDate, BTreeMap<String, i64>> = BTreeMap::new();
        for line in lines {
            match (line.grouping, line.slug, line.name, line.date) {
                (ReportLine::APP, Some(slug), Some(name), _) => usage_by_app.push(AppUsage {
                    app_id: slug,
                    app_name: name,
                    tokens_consumed: line.tokens,
                    sessions: line.sessions,
                    avg_tokens_per_session: (line.sessions > 0).then(|| {
                        (line.tokens as f64 / line.sessions as f64 * 100.0).round() / 100.0
                    }),
                }),
                (ReportLine::DAY, _, _, Some(date)) => {
                    days.insert(date, line.tokens);
                }
                (ReportLine::APP_DAY, Some(slug), _, Some(date)) => {
                    app_days.entry(date).or_default().insert(slug, line.tokens);
                }
                _ => {}
            }
        }
        let daily_usage = from
            .iter_days()
            .take_while(|d| *d <= to)
            .map(|date| DayUsage {
                date,
                tokens: days.get(&date).copied().unwrap_or(0),
                apps: by_app.then(|| app_days.remove(&date).unwrap_or_default()),
            })
            .collect();

        let unlimited = balance.allowance < 0;
        let left = (balance.allowance - balance.used).max(0) + balance.purchased;
        Ok(UsageReport {
            current_period: CurrentPeriod {
                start_date: period.map(|(start, _)| start),
                end_date: period.map(|(_, end)| end - chrono::Duration::seconds(1)),
                tokens_used: balance.used,
                tokens_remaining: if unlimited { -1 } else { left },
                tokens_total: if unlimited {
                    -1
                } else {
                    balance.allowance.max(balance.used) + balance.purchased
                },
            },
            usage_by_app,
            daily_usage,
        })
    }
}

/// The days a report covers: the query's `from` and `to`, or the period's.
fn report_range(
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    now: DateTime<Utc>,
) -> Result<(NaiveDate, NaiveDate), ApiError> {
    let (first, last) = match period {
        Some((start, end)) => (
            start.date_naive(),
            (end - chrono::Duration::milliseconds(1)).date_naive(),
        ),
        None => {
            let today = now.date_naive();
            let first = today.with_day(1).unwrap_or(today);
            let last = first
                .checked_add_months(chrono::Months::new(1))
                .and_then(|d| d.pred_opt())
                .unwrap_or(today);
            (first, last)
        }
    };
    let (from, to) = (from.unwrap_or(first), to.unwrap_or(last));
    if from > to {
        return Err(ApiError::Validation(vec![FieldError::new(
            "from",
            "must not be after `to`",
        )]));
    }
    if (to - from).num_days() >= MAX_REPORT_DAYS {
        return Err(ApiError::Validation(vec![FieldError::new(
            "to",
            "a report covers at most 366 days",
        )]));
    }
    Ok((from, to))
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
            visitor_id: metadata
                .get("visitor_id")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            processing_time_ms: metadata.get("processing_time_ms").and_then(|v| v.as_f64()),
            metadata: serde_json::value::to_raw_value(&metadata).unwrap(),
            embed_key_id: None,
            created_at: Utc.with_ymd_and_hms(2026, 11, 26, hour, 0, 0).unwrap(),
            set_aside: None,
            crossing: None,
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

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn a_report_covers_the_billing_period_by_default() {
        let start = Utc.with_ymd_and_hms(2026, 11, 10, 0, 0, 0).unwrap();
        let end = Utc.with_ymd_and_hms(2026, 12, 10, 0, 0, 0).unwrap();
        let range = report_range(Some((start, end)), None, None, Utc::now()).unwrap();
        assert_eq!(range, (date("2026-11-10"), date("2026-12-09")));
    }

    #[test]
    fn without_a_subscription_a_report_covers_the_calendar_month() {
        let now = Utc.with_ymd_and_hms(2028, 2, 10, 12, 0, 0).unwrap();
        let range = report_range(None, None, None, now).unwrap();
        assert_eq!(range, (date("2028-02-01"), date("2028-02-29")));
    }

    #[test]
    fn a_report_range_is_ordered_and_at_most_366_days() {
        let from = Some(date("2026-01-01"));
        assert!(report_range(None, from, Some(date("2026-12-31")), Utc::now()).is_ok());
        assert!(report_range(None, from, Some(date("2027-01-01")), Utc::now()).is_ok());
        assert!(report_range(None, from, Some(date("2027-01-02")), Utc::now()).is_err());
        assert!(report_range(None, from, Some(date("2025-12-31")), Utc::now()).is_err());
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
