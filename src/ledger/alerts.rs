//! Merchants' usage alerts: their settings, the crossings the flusher
//! records, and the deliveries' queue.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::usage::UsageRow;

/// A merchant's settings, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AlertSettings {
    pub webhook_url: Option<String>,
    pub thresholds: Vec<i16>,
    pub enabled: bool,
    /// Sealed (`ledger::sealed`).
    pub signing_secret: Option<String>,
    /// After a rotation, the secret before it (sealed), which signs too
    /// until `previous_secret_expires_at`.
    pub previous_signing_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Written by the delivery worker only ([`endpoint_failed`]).
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

impl Default for AlertSettings {
    /// API.md: thresholds 80 and 100, enabled, no URL.
    fn default() -> Self {
        Self {
            webhook_url: None,
            thresholds: vec![80, 100],
            enabled: true,
            signing_secret: None,
            previous_signing_secret: None,
            previous_secret_expires_at: None,
            disabled_at: None,
            disabled_reason: None,
        }
    }
}

impl AlertSettings {
    /// The sealed secrets deliveries are signed with at `now`: the current
    /// one, and the previous one during its overlap.
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        secrets_at(
            &self.signing_secret,
            &self.previous_signing_secret,
            self.previous_secret_expires_at,
            now,
        )
    }
}

/// The current secret, and the previous one while its overlap lasts.
fn secrets_at<'a>(
    current: &'a Option<String>,
    previous: &'a Option<String>,
    previous_until: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Vec<&'a str> {
    let previous = previous
        .as_deref()
        .filter(|_| previous_until.is_some_and(|end| end > now));
    current.as_deref().into_iter().chain(previous).collect()
}

/// The customer's settings, or the defaults.
#[tracing::instrument(name = "postgres alerts.settings", level = "debug", skip_all)]
pub async fn settings(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<AlertSettings> {
    let stored: Option<AlertSettings> = sqlx::query_as(
        "SELECT webhook_url, thresholds, enabled, signing_secret, previous_signing_secret, \
                previous_secret_expires_at, disabled_at, disabled_reason \
         FROM usage_alert_settings WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await?;
    Ok(stored.unwrap_or_default())
}

/// Saves what a merchant sets (the URL, thresholds, switch and secrets);
/// `reenable` (the URL was saved) clears a disabled endpoint's state.
#[tracing::instrument(name = "postgres alerts.save_settings", level = "debug", skip_all)]
pub async fn save_settings(
    conn: &mut PgConnection,
    customer: Uuid,
    settings: &AlertSettings,
    reenable: bool,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO usage_alert_settings (customer_id, webhook_url, thresholds, enabled, signing_secret, \
             previous_signing_secret, previous_secret_expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (customer_id) DO UPDATE SET webhook_url = $2, thresholds = $3, enabled = $4, \
             signing_secret = $5, previous_signing_secret = $6, previous_secret_expires_at = $7, \
             failing_since = CASE WHEN $8 THEN NULL ELSE usage_alert_settings.failing_since END, \
             disabled_at = CASE WHEN $8 THEN NULL ELSE usage_alert_settings.disabled_at END, \
             disabled_reason = CASE WHEN $8 THEN NULL ELSE usage_alert_settings.disabled_reason END, \
             updated_at = NOW()",
    )
    .bind(customer)
    .bind(&settings.webhook_url)
    .bind(&settings.thresholds)
    .bind(settings.enabled)
    .bind(&settings.signing_secret)
    .bind(&settings.previous_signing_secret)
    .bind(settings.previous_secret_expires_at)
    .bind(reenable)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a failed attempt on the customer's endpoint: it has been failing
/// since its first failure after a delivered one, and is disabled when
/// that was `disable_after` ago (its pending deliveries are then held).
/// Returns whether this disabled it.
#[tracing::instrument(name = "postgres alerts.endpoint_failed", level = "debug", skip_all)]
pub async fn endpoint_failed(
    conn: &mut PgConnection,
    customer: Uuid,
    now: DateTime<Utc>,
    disable_after: chrono::Duration,
    error: &str,
) -> sqlx::Result<bool> {
    let disabled: Option<bool> = sqlx::query_scalar(
        "UPDATE usage_alert_settings SET \
             failing_since = COALESCE(failing_since, $2), \
             disabled_at = CASE WHEN disabled_at IS NULL AND COALESCE(failing_since, $2) <= $2 - $3 \
                                THEN $2 ELSE disabled_at END, \
             disabled_reason = CASE WHEN disabled_at IS NULL AND COALESCE(failing_since, $2) <= $2 - $3 \
                                    THEN $4 ELSE disabled_reason END \
         WHERE customer_id = $1 \
         RETURNING COALESCE(disabled_at = $2, false)",
    )
    .bind(customer)
    .bind(now)
    .bind(disable_after)
    .bind(format!(
        "every attempt failed for {} h; the last: {error}",
        disable_after.num_hours()
    ))
    .fetch_optional(&mut *conn)
    .await?;
    let disabled = disabled == Some(true);
    if disabled {
        // What was waiting for its retry is held with the rest.
        sqlx::query(
            "UPDATE usage_alerts SET delivery = 'disabled', next_attempt_at = NULL \
             WHERE customer_id = $1 AND delivery = 'pending'",
        )
        .bind(customer)
        .execute(conn)
        .await?;
    }
    Ok(disabled)
}

/// A delivered attempt: the endpoint is healthy again.
#[tracing::instrument(name = "postgres alerts.endpoint_delivered", level = "debug", skip_all)]
pub async fn endpoint_delivered(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE usage_alert_settings SET failing_since = NULL \
         WHERE customer_id = $1 AND failing_since IS NOT NULL",
    )
    .bind(customer)
    .execute(conn)
    .await?;
    Ok(())
}

/// Endpoints disabled now (the `usage_alert_endpoints_disabled` gauge).
#[tracing::instrument(name = "postgres alerts.disabled_endpoints", level = "debug", skip_all)]
pub async fn disabled_endpoints(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM usage_alert_settings WHERE disabled_at IS NOT NULL")
        .fetch_one(conn)
        .await
}

/// Records the crossings the rows carry (rows newly inserted: each event
/// once), each once per customer, period and threshold; pending delivery
/// when the merchant has a URL and alerts on, `none` otherwise. Returns the
/// thresholds newly recorded.
#[tracing::instrument(name = "postgres alerts.record_crossings", level = "debug", skip_all)]
pub async fn record_crossings(
    conn: &mut PgConnection,
    rows: &[&UsageRow],
) -> sqlx::Result<Vec<i16>> {
    let mut ids = Vec::new();
    let (mut customers, mut thresholds, mut starts, mut ends) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut used, mut totals, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let Some(crossing) = &row.crossing else {
            continue;
        };
        for threshold in &crossing.thresholds {
            ids.push(Uuid::now_v7());
            customers.push(row.customer_id);
            thresholds.push(*threshold);
            starts.push(crossing.period_start);
            ends.push(crossing.period_end);
            used.push(crossing.tokens_used);
            totals.push(crossing.tokens_total);
            at.push(row.created_at);
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "INSERT INTO usage_alerts (id, customer_id, threshold, period_start, period_end, tokens_used, \
             tokens_total, crossed_at, delivery, next_attempt_at) \
         SELECT d.id, d.customer, d.threshold, d.period_start, d.period_end, d.used, d.total, d.at, \
                CASE WHEN s.webhook_url IS NULL OR NOT s.enabled THEN 'none' \
                     WHEN s.disabled_at IS NOT NULL THEN 'disabled' ELSE 'pending' END, \
                CASE WHEN s.webhook_url IS NOT NULL AND s.enabled AND s.disabled_at IS NULL THEN d.at END \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::int2[], $4::timestamptz[], $5::timestamptz[], \
                     $6::int8[], $7::int8[], $8::timestamptz[]) \
              AS d(id, customer, threshold, period_start, period_end, used, total, at) \
         LEFT JOIN usage_alert_settings s ON s.customer_id = d.customer \
         ORDER BY d.customer, d.period_end, d.threshold \
         ON CONFLICT (customer_id, period_end, threshold) DO NOTHING \
         RETURNING threshold",
    )
    .bind(ids)
    .bind(customers)
    .bind(thresholds)
    .bind(starts)
    .bind(ends)
    .bind(used)
    .bind(totals)
    .bind(at)
    .fetch_all(conn)
    .await
}

/// A crossing as the API lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertEvent {
    pub id: Uuid,
    pub threshold: i16,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub tokens_used: i64,
    pub tokens_total: i64,
    pub crossed_at: DateTime<Utc>,
    pub delivery: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The customer's crossings, newest first.
#[tracing::instrument(name = "postgres alerts.events", level = "debug", skip_all)]
pub async fn events(
    conn: &mut PgConnection,
    customer: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<AlertEvent>> {
    sqlx::query_as(
        "SELECT id, threshold, period_start, period_end, tokens_used, tokens_total, crossed_at, \
                delivery, attempts, last_error, next_attempt_at \
         FROM usage_alerts WHERE customer_id = $1 ORDER BY crossed_at DESC, threshold DESC LIMIT $2",
    )
    .bind(customer)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// A delivery due now, with where it goes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueDelivery {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub threshold: i16,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub tokens_used: i64,
    pub tokens_total: i64,
    pub crossed_at: DateTime<Utc>,
    pub attempts: i32,
    pub delivery: String,
    pub webhook_url: Option<String>,
    pub enabled: Option<bool>,
    pub signing_secret: Option<String>,
    pub previous_signing_secret: Option<String>,
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    pub disabled_at: Option<DateTime<Utc>>,
}

impl DueDelivery {
    /// The settings' secrets, as [`AlertSettings::signing_secrets`].
    pub fn signing_secrets(&self, now: DateTime<Utc>) -> Vec<&str> {
        secrets_at(
            &self.signing_secret,
            &self.previous_signing_secret,
            self.previous_secret_expires_at,
            now,
        )
    }
}

/// The columns of a [`DueDelivery`], from `usage_alerts a` and
/// `usage_alert_settings s`.
const DELIVERY_COLUMNS: &str = "a.id, a.customer_id, a.threshold, a.period_start, a.period_end, \
     a.tokens_used, a.tokens_total, a.crossed_at, a.attempts, a.delivery, s.webhook_url, s.enabled, \
     s.signing_secret, s.previous_signing_secret, s.previous_secret_expires_at, s.disabled_at";

/// Takes up to `limit` deliveries due by `now`, locked until the caller's
/// transaction ends: replicas running the worker side by side skip what
/// another holds.
#[tracing::instrument(name = "postgres alerts.due_deliveries", level = "debug", skip_all)]
pub async fn due_deliveries(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<DueDelivery>> {
    sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} \
         FROM usage_alerts a LEFT JOIN usage_alert_settings s ON s.customer_id = a.customer_id \
         WHERE a.delivery = 'pending' AND a.next_attempt_at <= $1 \
         ORDER BY a.next_attempt_at LIMIT $2 FOR UPDATE OF a SKIP LOCKED"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// One of the customer's crossings with where it goes now (a resend);
/// `None` when it is not theirs.
#[tracing::instrument(name = "postgres alerts.delivery", level = "debug", skip_all)]
pub async fn delivery(
    conn: &mut PgConnection,
    customer: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<DueDelivery>> {
    sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} \
         FROM usage_alerts a LEFT JOIN usage_alert_settings s ON s.customer_id = a.customer_id \
         WHERE a.id = $1 AND a.customer_id = $2"
    ))
    .bind(id)
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// What became of a delivery after one attempt.
pub enum Attempt<'a> {
    Delivered,
    /// Tried again at `next`.
    Retry {
        next: DateTime<Utc>,
        error: &'a str,
    },
    /// Given up: 24 hours of retries, or no URL any more.
    Failed {
        error: &'a str,
    },
    /// A resend that did not land: the delivery stays as it was.
    Unchanged {
        error: &'a str,
    },
}

/// One request to the merchant's endpoint, for the attempt history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRecord {
    pub attempted_at: DateTime<Utc>,
    /// `scheduled` (the worker) or `resend`.
    pub trigger: String,
    pub url: String,
    pub http_status: Option<i16>,
    pub error: Option<String>,
    pub latency_ms: i32,
    pub response_excerpt: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// Records one attempt: its history row, and what it made of the delivery.
#[tracing::instrument(name = "postgres alerts.record_attempt", level = "debug", skip_all)]
pub async fn record_attempt(
    conn: &mut PgConnection,
    id: Uuid,
    record: &AttemptRecord,
    attempt: Attempt<'_>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO usage_alert_attempts (alert_id, attempted_at, trigger, url, http_status, \
             error, latency_ms, response_excerpt, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(record.attempted_at)
    .bind(&record.trigger)
    .bind(&record.url)
    .bind(record.http_status)
    .bind(&record.error)
    .bind(record.latency_ms)
    .bind(&record.response_excerpt)
    .bind(record.next_attempt_at)
    .execute(&mut *conn)
    .await?;
    record_attempt_outcome(conn, id, attempt).await
}

/// What an attempt made of the delivery, without a history row (nothing
/// was sent: no URL, alerts off).
#[tracing::instrument(
    name = "postgres alerts.record_attempt_outcome",
    level = "debug",
    skip_all
)]
pub async fn record_attempt_outcome(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: Attempt<'_>,
) -> sqlx::Result<()> {
    let (delivery, next, error) = match attempt {
        Attempt::Delivered => (Some("delivered"), None, None),
        Attempt::Retry { next, error } => (Some("pending"), Some(next), Some(error)),
        Attempt::Failed { error } => (Some("failed"), None, Some(error)),
        Attempt::Unchanged { error } => (None, None, Some(error)),
    };
    sqlx::query(
        "UPDATE usage_alerts SET attempts = attempts + 1, last_error = $4, \
             delivery = COALESCE($2, delivery), \
             next_attempt_at = CASE WHEN $2 IS NULL THEN next_attempt_at ELSE $3 END, \
             delivered_at = CASE WHEN $2 = 'delivered' THEN NOW() \
                                 WHEN $2 IS NULL THEN delivered_at END \
         WHERE id = $1",
    )
    .bind(id)
    .bind(delivery)
    .bind(next)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks pending deliveries of a disabled endpoint `disabled`: they are
/// kept, and can be resent once the endpoint is fixed.
#[tracing::instrument(name = "postgres alerts.hold_for_disabled", level = "debug", skip_all)]
pub async fn hold_for_disabled(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE usage_alerts SET delivery = 'disabled', next_attempt_at = NULL, \
             last_error = 'endpoint disabled' WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The attempts at one of the customer's crossings, oldest first; `None`
/// when the crossing is not theirs.
#[tracing::instrument(name = "postgres alerts.attempts", level = "debug", skip_all)]
pub async fn attempts(
    conn: &mut PgConnection,
    customer: Uuid,
    id: Uuid,
) -> sqlx::Result<Option<Vec<AttemptRecord>>> {
    let theirs: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM usage_alerts WHERE id = $1 AND customer_id = $2")
            .bind(id)
            .bind(customer)
            .fetch_optional(&mut *conn)
            .await?;
    if theirs.is_none() {
        return Ok(None);
    }
    sqlx::query_as(
        "SELECT attempted_at, trigger, url, http_status, error, latency_ms, response_excerpt, \
                next_attempt_at \
         FROM usage_alert_attempts WHERE alert_id = $1 ORDER BY attempted_at, id",
    )
    .bind(id)
    .fetch_all(conn)
    .await
    .map(Some)
}
