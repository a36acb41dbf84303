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
}

impl Default for AlertSettings {
    /// API.md: thresholds 80 and 100, enabled, no URL.
    fn default() -> Self {
        Self {
            webhook_url: None,
            thresholds: vec![80, 100],
            enabled: true,
            signing_secret: None,
        }
    }
}

/// The customer's settings, or the defaults.
#[tracing::instrument(name = "postgres alerts.settings", level = "debug", skip_all)]
pub async fn settings(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<AlertSettings> {
    let stored: Option<AlertSettings> = sqlx::query_as(
        "SELECT webhook_url, thresholds, enabled, signing_secret FROM usage_alert_settings \
         WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await?;
    Ok(stored.unwrap_or_default())
}

#[tracing::instrument(name = "postgres alerts.save_settings", level = "debug", skip_all)]
pub async fn save_settings(
    conn: &mut PgConnection,
    customer: Uuid,
    settings: &AlertSettings,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO usage_alert_settings (customer_id, webhook_url, thresholds, enabled, signing_secret) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (customer_id) DO UPDATE SET webhook_url = $2, thresholds = $3, enabled = $4, \
             signing_secret = $5, updated_at = NOW()",
    )
    .bind(customer)
    .bind(&settings.webhook_url)
    .bind(&settings.thresholds)
    .bind(settings.enabled)
    .bind(&settings.signing_secret)
    .execute(conn)
    .await?;
    Ok(())
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
                CASE WHEN s.webhook_url IS NOT NULL AND s.enabled THEN 'pending' ELSE 'none' END, \
                CASE WHEN s.webhook_url IS NOT NULL AND s.enabled THEN d.at END \
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
                delivery, attempts \
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
    pub webhook_url: Option<String>,
    pub enabled: Option<bool>,
    pub signing_secret: Option<String>,
}

/// Takes up to `limit` deliveries due by `now`, locked until the caller's
/// transaction ends: replicas running the worker side by side skip what
/// another holds.
#[tracing::instrument(name = "postgres alerts.due_deliveries", level = "debug", skip_all)]
pub async fn due_deliveries(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<DueDelivery>> {
    sqlx::query_as(
        "SELECT a.id, a.customer_id, a.threshold, a.period_start, a.period_end, a.tokens_used, \
                a.tokens_total, a.crossed_at, a.attempts, s.webhook_url, s.enabled, s.signing_secret \
         FROM usage_alerts a LEFT JOIN usage_alert_settings s ON s.customer_id = a.customer_id \
         WHERE a.delivery = 'pending' AND a.next_attempt_at <= $1 \
         ORDER BY a.next_attempt_at LIMIT $2 FOR UPDATE OF a SKIP LOCKED",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// What became of one attempt.
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
}

#[tracing::instrument(name = "postgres alerts.record_attempt", level = "debug", skip_all)]
pub async fn record_attempt(
    conn: &mut PgConnection,
    id: Uuid,
    attempt: Attempt<'_>,
) -> sqlx::Result<()> {
    let (delivery, next, error) = match attempt {
        Attempt::Delivered => ("delivered", None, None),
        Attempt::Retry { next, error } => ("pending", Some(next), Some(error)),
        Attempt::Failed { error } => ("failed", None, Some(error)),
    };
    sqlx::query(
        "UPDATE usage_alerts SET delivery = $2, attempts = attempts + 1, next_attempt_at = $3, \
             last_error = $4, delivered_at = CASE WHEN $2 = 'delivered' THEN NOW() END \
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
