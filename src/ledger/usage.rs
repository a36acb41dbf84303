//! Usage rows and daily aggregates: the flusher's writes and the
//! dashboards' queries.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::value::RawValue;
use sqlx::{types::ipnetwork::IpNetwork, PgConnection};
use uuid::Uuid;

use crate::domain::usage::{DayKey, DayTotals, Identity, Sighting};

/// One usage event, as decoded from the stream.
#[derive(Debug, Clone)]
pub struct UsageRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub app_id: Uuid,
    pub tokens: i32,
    pub purchased_tokens: i32,
    pub session_id: Option<String>,
    /// The request's metadata object as it came (`{}` when there was none),
    /// stored without being rebuilt.
    pub metadata: Box<RawValue>,
    /// Read from the metadata, for the columns and the aggregates.
    pub ip_address: Option<IpNetwork>,
    pub user_agent: Option<String>,
    pub visitor_id: Option<String>,
    pub processing_time_ms: Option<f64>,
    pub embed_key_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// Set when Postgres refused the row as sent: it is then stored with
    /// only what the ledger must have, and the event's details kept here.
    pub set_aside: Option<SetAside>,
    /// The usage alert thresholds this charge carried the period's usage
    /// across (`x` of the stream entry), if any.
    pub crossing: Option<Crossing>,
}

/// Thresholds a charge crossed (see `lua/consume.lua`, step 8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub thresholds: Vec<i16>,
    /// The period's usage after the charge.
    pub tokens_used: i64,
    /// The period's allowance.
    pub tokens_total: i64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
}

/// An event's details Postgres refused, kept beside the row stored without
/// them (`usage_set_aside`).
#[derive(Debug, Clone)]
pub struct SetAside {
    /// The event's `d` field as it was in the stream.
    pub details: String,
    pub reason: String,
}

impl UsageRow {
    /// This row with everything but the charge itself set aside: no
    /// session, metadata `{}`, nothing read from the metadata. What remains
    /// is ids, counts and a time, which Postgres always stores, so a charge
    /// is never lost for what came with it.
    pub fn with_details_set_aside(&self, details: &str, reason: &str) -> UsageRow {
        UsageRow {
            session_id: None,
            metadata: empty_object(),
            ip_address: None,
            user_agent: None,
            visitor_id: None,
            processing_time_ms: None,
            set_aside: Some(SetAside {
                details: details.to_owned(),
                reason: reason.to_owned(),
            }),
            ..self.clone()
        }
    }
}

/// `{}`, the metadata of an event that came without.
pub fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).expect("{} is JSON")
}

/// Keeps the details of rows stored without them; a redelivered event's
/// record is already there and stays as it is.
#[tracing::instrument(name = "postgres usage.record_set_aside", level = "debug", skip_all)]
pub async fn record_set_aside(conn: &mut PgConnection, rows: &[&UsageRow]) -> sqlx::Result<()> {
    let (mut ids, mut customers, mut details, mut reasons) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        if let Some(aside) = &row.set_aside {
            ids.push(row.id);
            customers.push(row.customer_id);
            details.push(aside.details.as_bytes());
            // Postgres's message may quote the value it refused.
            reasons.push(aside.reason.replace('\0', ""));
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO usage_set_aside (event_id, customer_id, details, reason) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bytea[], $4::text[]) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(ids)
    .bind(customers)
    .bind(details)
    .bind(reasons)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts the rows in one statement; rows already present (a redelivered
/// event) are skipped. Returns the ids of the rows newly inserted, so the
/// caller adds to balances and aggregates only once per event.
#[tracing::instrument(name = "postgres usage.insert_batch", level = "debug", skip_all)]
pub async fn insert_batch(
    conn: &mut PgConnection,
    rows: &[&UsageRow],
) -> sqlx::Result<HashSet<Uuid>> {
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut customers = Vec::with_capacity(n);
    let mut apps = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut purchased = Vec::with_capacity(n);
    let mut sessions = Vec::with_capacity(n);
    let mut metadata = Vec::with_capacity(n);
    let mut ips = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for r in rows {
        ids.push(r.id);
        customers.push(r.customer_id);
        apps.push(r.app_id);
        tokens.push(r.tokens);
        purchased.push(r.purchased_tokens);
        sessions.push(r.session_id.as_deref());
        metadata.push(sqlx::types::Json(&*r.metadata));
        ips.push(r.ip_address);
        agents.push(r.user_agent.as_deref());
        keys.push(r.embed_key_id);
        times.push(r.created_at);
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        r#"
        INSERT INTO token_usage (id, customer_id, app_id, tokens_consumed, purchased_tokens_consumed,
                                 session_id, metadata, ip_address, user_agent, embed_key_id, created_at)
        SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::int4[], $5::int4[],
                             $6::text[], $7::jsonb[], $8::inet[], $9::text[], $10::uuid[], $11::timestamptz[])
        ON CONFLICT (id, created_at) DO NOTHING
        RETURNING id
        "#,
    )
    .bind(ids)
    .bind(customers)
    .bind(apps)
    .bind(tokens)
    .bind(purchased)
    .bind(sessions)
    .bind(metadata)
    .bind(ips)
    .bind(agents)
    .bind(keys)
    .bind(times)
    .fetch_all(conn)
    .await?;
    Ok(inserted.into_iter().collect())
}

/// Records the sessions and visitors of new rows; returns, per day, how
/// many of them were seen for the first time that day.
#[tracing::instrument(name = "postgres usage.record_sightings", level = "debug", skip_all)]
pub async fn record_sightings(
    conn: &mut PgConnection,
    sightings: &BTreeSet<Sighting>,
) -> sqlx::Result<BTreeMap<(DayKey, Identity), i64>> {
    let mut firsts = BTreeMap::new();
    if sightings.is_empty() {
        return Ok(firsts);
    }
    let n = sightings.len();
    let (mut customers, mut apps, mut dates, mut kinds, mut hashes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Sorted (a BTreeSet), so two flushers take the key locks in one order.
    for s in sightings {
        customers.push(s.day.customer_id);
        apps.push(s.day.app_id);
        dates.push(s.day.date);
        kinds.push(s.kind.code());
        hashes.push(s.hash);
    }
    let new: Vec<(Uuid, Uuid, NaiveDate, i8)> = sqlx::query_as(
        r#"
        INSERT INTO usage_daily_distinct (customer_id, app_id, date, kind, hash)
        SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::date[], $4::"char"[], $5::uuid[])
        ON CONFLICT DO NOTHING
        RETURNING customer_id, app_id, date, kind
        "#,
    )
    .bind(customers)
    .bind(apps)
    .bind(dates)
    .bind(kinds)
    .bind(hashes)
    .fetch_all(conn)
    .await?;
    for (customer_id, app_id, date, kind) in new {
        let day = DayKey {
            customer_id,
            app_id,
            date,
        };
        if let Some(kind) = Identity::from_code(kind) {
            *firsts.entry((day, kind)).or_default() += 1;
        }
    }
    Ok(firsts)
}

/// Adds new rows' totals to `usage_analytics_daily`, in key order so two
/// flushers lock the same rows in the same order.
#[tracing::instrument(name = "postgres usage.add_to_daily", level = "debug", skip_all)]
pub async fn add_to_daily(
    conn: &mut PgConnection,
    days: &BTreeMap<DayKey, DayTotals>,
) -> sqlx::Result<()> {
    if days.is_empty() {
        return Ok(());
    }
    let n = days.len();
    let mut customers = Vec::with_capacity(n);
    let mut apps = Vec::with_capacity(n);
    let mut dates = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut sessions = Vec::with_capacity(n);
    let mut visitors = Vec::with_capacity(n);
    let mut time_us = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    for (day, t) in days {
        customers.push(day.customer_id);
        apps.push(day.app_id);
        dates.push(day.date);
        tokens.push(t.tokens);
        events.push(t.events);
        sessions.push(t.sessions);
        visitors.push(t.visitors);
        time_us.push(t.processing_time_us);
        samples.push(t.processing_time_samples);
    }
    sqlx::query(
        r#"
        INSERT INTO usage_analytics_daily AS d
            (customer_id, app_id, date, tokens_consumed, events_count, sessions_count, unique_users,
             processing_time_total_us, processing_time_samples, avg_processing_time_ms)
        SELECT c, a, dt, t, e, s, v, us, n,
               CASE WHEN n > 0 THEN ROUND(us::numeric / n / 1000, 2) END
        FROM UNNEST($1::uuid[], $2::uuid[], $3::date[], $4::int8[], $5::int8[], $6::int8[],
                    $7::int8[], $8::int8[], $9::int8[]) AS u(c, a, dt, t, e, s, v, us, n)
        ON CONFLICT (customer_id, app_id, date) DO UPDATE SET
            tokens_consumed = d.tokens_consumed + EXCLUDED.tokens_consumed,
            events_count = d.events_count + EXCLUDED.events_count,
            sessions_count = d.sessions_count + EXCLUDED.sessions_count,
            unique_users = d.unique_users + EXCLUDED.unique_users,
            processing_time_total_us = d.processing_time_total_us + EXCLUDED.processing_time_total_us,
            processing_time_samples = d.processing_time_samples + EXCLUDED.processing_time_samples,
            avg_processing_time_ms = CASE
                WHEN d.processing_time_samples + EXCLUDED.processing_time_samples > 0 THEN ROUND(
                    (d.processing_time_total_us + EXCLUDED.processing_time_total_us)::numeric
                    / (d.processing_time_samples + EXCLUDED.processing_time_samples) / 1000, 2)
                END,
            updated_at = NOW()
        "#,
    )
    .bind(customers)
    .bind(apps)
    .bind(dates)
    .bind(tokens)
    .bind(events)
    .bind(sessions)
    .bind(visitors)
    .bind(time_us)
    .bind(samples)
    .execute(conn)
    .await?;
    Ok(())
}

/// Keeps the balances in Postgres in step with newly inserted rows:
/// `customers.purchased_tokens_used`, `customer_billing.tokens_used` (the
/// allowance drawn in the current period) and `customer_apps.last_used_at`.
/// Should two flushers deadlock on these rows, Postgres aborts one
/// transaction; its entries stay pending and the next pass retries them.
#[tracing::instrument(name = "postgres usage.apply_to_balances", level = "debug", skip_all)]
pub async fn apply_to_balances(
    conn: &mut PgConnection,
    rows: &[&UsageRow],
) -> sqlx::Result<Vec<f64>> {
    let mut purchased: BTreeMap<Uuid, i64> = BTreeMap::new();
    let mut last_used: BTreeMap<(Uuid, Uuid), DateTime<Utc>> = BTreeMap::new();
    let mut first_used: BTreeMap<(Uuid, Uuid), DateTime<Utc>> = BTreeMap::new();
    // The allowance part of each row, with its time: only rows inside the
    // customer's current period count towards `tokens_used`.
    let (mut ids, mut amounts, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        *purchased.entry(row.customer_id).or_default() += i64::from(row.purchased_tokens);
        let from_allowance = i64::from(row.tokens - row.purchased_tokens);
        if from_allowance > 0 {
            ids.push(row.customer_id);
            amounts.push(from_allowance);
            times.push(row.created_at);
        }
        let seen = last_used
            .entry((row.customer_id, row.app_id))
            .or_insert(row.created_at);
        *seen = (*seen).max(row.created_at);
        let first = first_used
            .entry((row.customer_id, row.app_id))
            .or_insert(row.created_at);
        *first = (*first).min(row.created_at);
    }

    let (customers, totals): (Vec<Uuid>, Vec<i64>) =
        purchased.into_iter().filter(|(_, p)| *p > 0).unzip();
    if !customers.is_empty() {
        sqlx::query(
            "UPDATE customers c SET purchased_tokens_used = c.purchased_tokens_used + d.amount \
             FROM UNNEST($1::uuid[], $2::int8[]) AS d(id, amount) WHERE c.id = d.id",
        )
        .bind(customers)
        .bind(totals)
        .execute(&mut *conn)
        .await?;
    }

    if !ids.is_empty() {
        sqlx::query(
            "UPDATE customer_billing b SET tokens_used = b.tokens_used + d.amount, \
               tokens_remaining = CASE WHEN p.tokens_per_month < 0 THEN NULL \
                                       ELSE GREATEST(p.tokens_per_month - (b.tokens_used + d.amount), 0) END, \
               updated_at = NOW() \
             FROM (SELECT u.id, SUM(u.amount)::int8 AS amount FROM UNNEST($1::uuid[], $2::int8[], $3::timestamptz[]) AS u(id, amount, at) \
                   JOIN customer_billing cb ON cb.customer_id = u.id \
                   WHERE u.at >= cb.billing_cycle_start AND u.at < cb.billing_cycle_end \
                   GROUP BY u.id ORDER BY u.id) AS d, billing_plans p \
             WHERE b.customer_id = d.id AND p.id = b.plan_id",
        )
        .bind(ids)
        .bind(amounts)
        .bind(times)
        .execute(&mut *conn)
        .await?;
    }

    if !last_used.is_empty() {
        let mut customers = Vec::with_capacity(last_used.len());
        let mut apps = Vec::with_capacity(last_used.len());
        let mut times = Vec::with_capacity(last_used.len());
        for ((c, a), t) in last_used {
            customers.push(c);
            apps.push(a);
            times.push(t);
        }
        sqlx::query(
            "UPDATE customer_apps ca SET last_used_at = GREATEST(COALESCE(ca.last_used_at, d.at), d.at) \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS d(customer_id, app_id, at) \
             WHERE ca.customer_id = d.customer_id AND ca.app_id = d.app_id",
        )
        .bind(customers)
        .bind(apps)
        .bind(times)
        .execute(&mut *conn)
        .await?;
    }
    first_charges(conn, first_used).await
}

/// Marks the first charge of each activation that had none
/// (`first_used_at`, set once: a flusher racing another waits for the row
/// and then finds it set) and returns the seconds from each activation to
/// its first charge (`time_to_first_consume_seconds`).
async fn first_charges(
    conn: &mut PgConnection,
    first_used: BTreeMap<(Uuid, Uuid), DateTime<Utc>>,
) -> sqlx::Result<Vec<f64>> {
    if first_used.is_empty() {
        return Ok(Vec::new());
    }
    let (mut customers, mut apps, mut times) = (Vec::new(), Vec::new(), Vec::new());
    for ((c, a), t) in first_used {
        customers.push(c);
        apps.push(a);
        times.push(t);
    }
    sqlx::query_scalar(
        "UPDATE customer_apps ca SET first_used_at = d.at \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) AS d(customer_id, app_id, at) \
         WHERE ca.customer_id = d.customer_id AND ca.app_id = d.app_id AND ca.first_used_at IS NULL \
         RETURNING GREATEST(EXTRACT(EPOCH FROM d.at - ca.activated_at), 0)::float8",
    )
    .bind(customers)
    .bind(apps)
    .bind(times)
    .fetch_all(conn)
    .await
}

/// The customer's billing period `[start, end)`, if subscribed.
#[tracing::instrument(name = "postgres usage.current_period", level = "debug", skip_all)]
pub async fn current_period(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<(DateTime<Utc>, DateTime<Utc>)>> {
    sqlx::query_as(
        "SELECT billing_cycle_start, billing_cycle_end FROM customer_billing WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// One line of the usage report, of the kind `grouping` says.
#[derive(Debug, sqlx::FromRow)]
pub struct ReportLine {
    /// SQL's `GROUPING(app_id, date)`: [`ReportLine::APP`] (an app's
    /// totals over the range), [`ReportLine::DAY`] (a day's totals over all
    /// apps) or [`ReportLine::APP_DAY`] (an app's totals on one day).
    pub grouping: i32,
    pub slug: Option<String>,
    pub name: Option<String>,
    pub date: Option<NaiveDate>,
    pub tokens: i64,
    pub sessions: i64,
}

impl ReportLine {
    pub const APP_DAY: i32 = 0;
    pub const APP: i32 = 1;
    pub const DAY: i32 = 2;
}

/// The customer's daily aggregates from `from` to `to` (inclusive), summed
/// per app and per day (and, with `by_app_and_day`, per app and day) in one
/// pass (GROUPING SETS) over the covering index on `(customer_id, date)`;
/// apps are joined to the few sums, not the rows.
#[tracing::instrument(name = "postgres usage.report", level = "debug", skip_all)]
pub async fn report(
    conn: &mut PgConnection,
    customer: Uuid,
    from: NaiveDate,
    to: NaiveDate,
    by_app_and_day: bool,
) -> sqlx::Result<Vec<ReportLine>> {
    sqlx::query_as(
        r#"
        WITH sums AS (
            SELECT GROUPING(d.app_id, d.date)::int4 AS grouping, d.app_id, d.date,
                   SUM(d.tokens_consumed)::int8 AS tokens, SUM(d.sessions_count)::int8 AS sessions
            FROM usage_analytics_daily d
            WHERE d.customer_id = $1 AND d.date BETWEEN $2 AND $3
            GROUP BY GROUPING SETS ((d.app_id), (d.date), (d.app_id, d.date))
            HAVING $4 OR GROUPING(d.app_id, d.date) <> 0
        )
        SELECT s.grouping, a.slug, a.name, s.date, s.tokens, s.sessions
        FROM sums s LEFT JOIN apps a ON a.id = s.app_id
        ORDER BY a.slug, s.date
        "#,
    )
    .bind(customer)
    .bind(from)
    .bind(to)
    .bind(by_app_and_day)
    .fetch_all(conn)
    .await
}
