//! The customer row lock, and the snapshot a hot state is rebuilt from.
//!
//! Every change to what the consume script reads (activations, keys,
//! grants, the subscription) takes `SELECT … FOR NO KEY UPDATE` on the
//! customer's row first, and so does a rebuild. Writers of one customer's
//! hot state are therefore serialised across all processes. `NO KEY`
//! keeps the lock from blocking the flusher, whose foreign-key checks on
//! `token_usage` take only `KEY SHARE`.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{
    domain::billing::hot_period,
    hot::account::{AccountState, SubscriptionStatus},
    period::Cadence,
};

/// Locks the customer's row until the transaction ends. False when there
/// is no such customer.
#[tracing::instrument(name = "postgres accounts.lock_customer", level = "debug", skip_all)]
pub async fn lock_customer(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<bool> {
    let found: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM customers WHERE id = $1 FOR NO KEY UPDATE")
            .bind(customer)
            .fetch_optional(conn)
            .await?;
    Ok(found.is_some())
}

/// The recorded period and what decides the ones after it.
#[derive(sqlx::FromRow)]
struct PeriodRow {
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    anchor: Option<DateTime<Utc>>,
    cancel_at_period_end: bool,
}

/// The period a consume at `now` falls in, as the consume script would
/// start it: the recorded one while it lasts; after its end (the
/// scheduler down, Stripe's renewal late), the period after it counted
/// from the anchor that contains `now`, however many boundaries passed.
/// A subscription ending with its period has none after it. Returns the
/// window and whether it lies past the recorded period.
fn current_window(
    row: &PeriodRow,
    now: DateTime<Utc>,
    cadence: Cadence,
) -> Option<(DateTime<Utc>, DateTime<Utc>, bool)> {
    let (start, end) = (row.start?, row.end?);
    if now < end || row.cancel_at_period_end {
        return Some((start, end, false));
    }
    let (start, end) = cadence.containing(row.anchor?, end, now);
    Some((start, end, true))
}

#[derive(sqlx::FromRow)]
struct BalanceRow {
    stored: Vec<Uuid>,
    period_start: Option<DateTime<Utc>>,
    purchased: i64,
    allowance: Option<i32>,
    status: Option<String>,
    past_due_since: Option<DateTime<Utc>>,
    period_used: i64,
    period_end: Option<DateTime<Utc>>,
    anchor: Option<DateTime<Utc>>,
    next_allowance: Option<i32>,
    cancel_at_period_end: Option<bool>,
    alert_thresholds: Option<Vec<i16>>,
    alerted: Vec<i16>,
}

/// The ledger's view of a customer, to rebuild its hot state from.
pub struct Snapshot {
    pub state: AccountState,
    /// The billing period's start, when there is one.
    pub period_start: Option<DateTime<Utc>>,
    /// Of the events asked about, those the ledger holds (and counts in
    /// `state`).
    pub stored: HashSet<Uuid>,
    /// The merchant's usage alert thresholds (the defaults without
    /// settings); `None` when the merchant turned alerts off.
    pub alert_thresholds: Option<Vec<i16>>,
}

/// Reads everything the consume script needs, as Postgres knows it at
/// `now`, and which of `events` (charges seen in Redis) it holds. The
/// balance and that answer come from one statement, hence one snapshot: the
/// flusher writes usage rows and `purchased_tokens_used` in one
/// transaction, and both are seen together or not at all, and an event is
/// counted in the balance exactly when it is among those held.
///
/// The period's usage is counted in the period `now` falls in
/// ([`current_window`]), which may lie past the one the ledger recorded:
/// the consume script moves on at each boundary by itself, and the rows
/// it charged there belong to that period, not to the recorded one. The
/// window is read first, under the customer's row lock the caller holds
/// (every change of the period takes it), so it cannot move before the
/// snapshot.
#[tracing::instrument(name = "postgres accounts.snapshot", level = "debug", skip_all)]
pub async fn snapshot(
    conn: &mut PgConnection,
    customer: Uuid,
    grace: chrono::Duration,
    events: &[Uuid],
    now: DateTime<Utc>,
    cadence: Cadence,
) -> sqlx::Result<Snapshot> {
    let recorded: Option<PeriodRow> = sqlx::query_as(
        "SELECT billing_cycle_start AS start, billing_cycle_end AS end, \
                COALESCE(billing_anchor, billing_cycle_start) AS anchor, cancel_at_period_end \
         FROM customer_billing WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(&mut *conn)
    .await?;
    let window = recorded
        .as_ref()
        .and_then(|r| current_window(r, now, cadence));
    let row: BalanceRow = sqlx::query_as(
        r#"
        SELECT ARRAY(SELECT u.id FROM token_usage u WHERE u.id = ANY($2)) AS stored,
               $3::timestamptz AS period_start,
               b.cancel_at_period_end,
               CASE WHEN COALESCE(s.enabled, true) THEN COALESCE(s.thresholds, '{80,100}') END
                   AS alert_thresholds,
               ARRAY(SELECT a.threshold FROM usage_alerts a
                     WHERE a.customer_id = c.id AND a.period_end = $4) AS alerted,
               c.purchased_tokens_credited - c.purchased_tokens_used AS purchased,
               CASE WHEN $5 THEN COALESCE(pp.tokens_per_month, p.tokens_per_month)
                    ELSE p.tokens_per_month END AS allowance,
               b.status,
               b.past_due_since,
               $4::timestamptz AS period_end,
               COALESCE(b.billing_anchor, b.billing_cycle_start) AS anchor,
               COALESCE(pp.tokens_per_month, p.tokens_per_month) AS next_allowance,
               COALESCE((
                   SELECT SUM(u.tokens_consumed - u.purchased_tokens_consumed)
                   FROM token_usage u
                   WHERE u.customer_id = c.id
                     AND u.created_at >= $3
                     AND u.created_at < $4
               ), 0)::BIGINT AS period_used
        FROM customers c
        LEFT JOIN customer_billing b ON b.customer_id = c.id
        LEFT JOIN billing_plans p ON p.id = b.plan_id
        LEFT JOIN billing_plans pp ON pp.id = b.pending_plan_id
        LEFT JOIN usage_alert_settings s ON s.customer_id = c.id
        WHERE c.id = $1
        "#,
    )
    .bind(customer)
    .bind(events)
    .bind(window.map(|w| w.0))
    .bind(window.map(|w| w.1))
    .bind(window.is_some_and(|w| w.2))
    .fetch_one(&mut *conn)
    .await?;

    let active_apps: Vec<String> = sqlx::query_scalar(
        "SELECT a.slug FROM customer_apps ca JOIN apps a ON a.id = ca.app_id \
         WHERE ca.customer_id = $1 AND ca.status = 'active' AND a.status <> 'disabled'",
    )
    .bind(customer)
    .fetch_all(&mut *conn)
    .await?;

    let keys: Vec<(Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT id, expires_at FROM embed_api_keys \
         WHERE customer_id = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > NOW())",
    )
    .bind(customer)
    .fetch_all(&mut *conn)
    .await?;

    let status = match row.status.as_deref() {
        None => SubscriptionStatus::None,
        Some(s) => SubscriptionStatus::parse(s).unwrap_or(SubscriptionStatus::Unpaid),
    };
    let ending = row.cancel_at_period_end.unwrap_or(false);
    let period = match (row.period_end, row.anchor) {
        (Some(end), Some(anchor)) => {
            let mut period = hot_period(
                cadence,
                anchor,
                end,
                row.next_allowance.or(row.allowance).map_or(0, i64::from),
            );
            // A subscription ending with its period: none follows it.
            if ending {
                period.next_ends_ms.clear();
            }
            Some(period)
        }
        _ => None,
    };
    let closes_at_ms = match (ending, row.period_end) {
        (true, Some(end)) => end.timestamp_millis(),
        _ => 0,
    };
    let joined = |values: &[i16]| {
        values
            .iter()
            .map(i16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let state = AccountState {
        period,
        allowance: row.allowance.map_or(0, i64::from),
        used: row.period_used,
        purchased: row.purchased,
        status,
        grace_until_ms: row
            .past_due_since
            .map_or(0, |t| (t + grace).timestamp_millis()),
        closes_at_ms,
        period_start_ms: row.period_start.map_or(0, |t| t.timestamp_millis()),
        // The domain decides whether alerts are on (ENABLE_USAGE_ALERTS).
        alert_at: String::new(),
        alerted: joined(&row.alerted),
        active_apps,
        embed_keys: keys
            .into_iter()
            .map(|(id, exp)| (id, exp.map_or(0, |t| t.timestamp_millis())))
            .collect(),
    };
    Ok(Snapshot {
        state,
        period_start: row.period_start,
        stored: row.stored.into_iter().collect(),
        alert_thresholds: row.alert_thresholds,
    })
}
