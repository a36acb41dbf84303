//! Delivering merchants' usage alerts (API.md "Usage alerts").
//!
//! Each crossing the flusher recorded with a URL set is `pending`; this
//! worker (run by the scheduler role, any number of replicas: each takes
//! the deliveries it works on with `FOR UPDATE SKIP LOCKED`) posts it to the
//! merchant's `webhook_url`:
//!
//! - the body `{"id", "type": "usage.threshold_crossed", "created",
//!   "data": {…}}`, the same `id` on every attempt (the crossing's), so the
//!   receiver can drop repeats;
//! - signed as Stripe signs its webhooks: `Connected-Apps-Signature:
//!   t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`;
//! - a 2xx within 5 s is delivered; anything else is tried again after a
//!   delay that doubles from `USAGE_ALERT_RETRY_BASE_MS` (30 s) up to an
//!   hour, for 24 hours from the crossing, then `failed`.
//!
//! Consumes never wait for any of it: a crossing is found by the consume
//! script and travels with the usage event; only the flusher writes it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::stripe_signature,
    ledger::{
        alerts::{self, Attempt, DueDelivery},
        sealed::{alert_secret_place, Sealer},
    },
};

/// Deliveries taken per pass.
const BATCH: i64 = 50;
/// A receiver answers within this, or the attempt failed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait between attempts.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// How long after the crossing attempts go on.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often the worker looks for due deliveries.
const POLL_EVERY: Duration = Duration::from_secs(1);

pub struct AlertDeliveries {
    db: PgPool,
    http: reqwest::Client,
    sealer: std::sync::Arc<Sealer>,
    retry_base: Duration,
}

impl AlertDeliveries {
    pub fn new(db: PgPool, sealer: std::sync::Arc<Sealer>, retry_base: Duration) -> Self {
        // Every outcome exported from the start at 0, so a rate or an
        // increase over the first delivery of a process counts it.
        for outcome in ["delivered", "retried", "failed"] {
            metrics::counter!("usage_alert_deliveries_total", "outcome" => outcome).increment(0);
        }
        Self {
            db,
            http: reqwest::Client::builder()
                .timeout(TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent("connected-apps-usage-alerts")
                .build()
                .expect("the HTTP client's settings are valid"),
            sealer,
            retry_base,
        }
    }

    /// One pass: every delivery due now, attempted side by side. Returns
    /// how many were attempted.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let mut tx = self.db.begin().await?;
        let now = Utc::now();
        let due = alerts::due_deliveries(&mut tx, now, BATCH).await?;
        let attempts = futures::future::join_all(due.iter().map(|d| self.attempt(d))).await;
        for (delivery, result) in due.iter().zip(attempts) {
            let attempt = self.outcome(
                delivery,
                now,
                result.as_ref().map(|_| ()).map_err(String::as_str),
            );
            let label = match attempt {
                Attempt::Delivered => "delivered",
                Attempt::Retry { .. } => "retried",
                Attempt::Failed { .. } => "failed",
            };
            metrics::counter!("usage_alert_deliveries_total", "outcome" => label).increment(1);
            alerts::record_attempt(&mut tx, delivery.id, attempt).await?;
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// What one attempt's result means for the delivery.
    fn outcome<'a>(
        &self,
        delivery: &DueDelivery,
        now: DateTime<Utc>,
        result: Result<(), &'a str>,
    ) -> Attempt<'a> {
        let Err(error) = result else {
            return Attempt::Delivered;
        };
        let delay = self
            .retry_base
            .saturating_mul(2u32.saturating_pow(delivery.attempts.clamp(0, 20) as u32))
            .min(MAX_DELAY);
        let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
        let give_up =
            delivery.crossed_at + chrono::Duration::from_std(GIVE_UP_AFTER).unwrap_or_default();
        if next > give_up || delivery.webhook_url.is_none() {
            Attempt::Failed { error }
        } else {
            Attempt::Retry { next, error }
        }
    }

    /// Posts one delivery; `Err` with why it did not land.
    #[tracing::instrument(name = "usage alert delivery", level = "debug", skip_all, fields(alert = %delivery.id))]
    async fn attempt(&self, delivery: &DueDelivery) -> Result<(), String> {
        let (Some(url), Some(sealed)) = (&delivery.webhook_url, &delivery.signing_secret) else {
            return Err("no webhook URL".into());
        };
        if delivery.enabled == Some(false) {
            return Err("alerts turned off".into());
        }
        let secret = self
            .sealer
            .open(sealed, &alert_secret_place(delivery.customer_id))
            .map_err(|e| format!("signing secret: {e}"))?;
        let body = payload(delivery).to_string();
        let signature =
            stripe_signature::sign(&[secret.as_str()], body.as_bytes(), Utc::now().timestamp());
        // The receiver may continue this delivery's trace.
        let mut trace = reqwest::header::HeaderMap::new();
        crate::telemetry::inject_trace(&mut trace);
        let answer = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("Connected-Apps-Signature", signature)
            .headers(trace)
            .body(body)
            .send()
            .await
            .map_err(|e| crate::telemetry::chain(&e))?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", answer.status()))
        }
    }

    /// Runs until `shutdown`, a pass a second (at once again after a full
    /// batch).
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let wait = match self.step().await {
                Ok(n) if n as i64 >= BATCH => Duration::ZERO,
                Ok(_) => POLL_EVERY,
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::chain(&*e), "usage alert deliveries failed; trying again");
                    POLL_EVERY * 5
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The body of a delivery (API.md "Usage alerts").
fn payload(d: &DueDelivery) -> serde_json::Value {
    json!({
        "id": d.id,
        "type": "usage.threshold_crossed",
        "created": d.crossed_at.timestamp(),
        "data": {
            "customer_id": d.customer_id,
            "threshold": d.threshold,
            "tokens_used": d.tokens_used,
            "tokens_total": d.tokens_total,
            "period_start": d.period_start,
            "period_end": d.period_end,
        }
    })
}
