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
//!   hour, for 24 hours from the crossing, then `failed`;
//! - every attempt is kept (`usage_alert_attempts`); an endpoint that
//!   failed every attempt for `ALERT_ENDPOINT_DISABLE_AFTER_HOURS` is
//!   disabled: its deliveries are held (`disabled`) until the merchant
//!   saves the URL again, and crossings are still recorded;
//! - the request goes through [`Egress`]: the URL's name is resolved and
//!   vetted again now, so a name that pointed outside when it was saved
//!   and points inside now is refused (a failed attempt, with why).
//!
//! Consumes never wait for any of it: a crossing is found by the consume
//! script and travels with the usage event; only the flusher writes it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    domain::alerts::{attempt_record, open_secrets, payload},
    egress::{Egress, Sent},
    ledger::{
        alerts::{self, Attempt, DueDelivery},
        sealed::Sealer,
    },
};

/// Deliveries taken per pass.
const BATCH: i64 = 50;
/// The longest wait between attempts.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// How long after the crossing attempts go on.
const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How often the worker looks for due deliveries.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often the disabled endpoints are counted for the gauge.
const COUNT_DISABLED_EVERY: Duration = Duration::from_secs(15);

pub struct AlertDeliveries {
    db: PgPool,
    egress: Arc<Egress>,
    sealer: Arc<Sealer>,
    retry_base: Duration,
    disable_after: Duration,
}

/// What the worker did with a delivery.
enum Try {
    /// Not sent: no URL, alerts off, or the secret unreadable.
    NotSent(String),
    /// The endpoint is disabled: held, not sent.
    Held,
    Sent {
        url: String,
        sent: Sent,
    },
}

impl AlertDeliveries {
    pub fn new(
        db: PgPool,
        egress: Arc<Egress>,
        sealer: Arc<Sealer>,
        retry_base: Duration,
        disable_after: Duration,
    ) -> Self {
        Self {
            db,
            egress,
            sealer,
            retry_base,
            disable_after,
        }
    }

    /// One pass: every delivery due now, attempted side by side. Returns
    /// how many were taken.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let mut tx = self.db.begin().await?;
        let now = Utc::now();
        let due = alerts::due_deliveries(&mut tx, now, BATCH).await?;
        let tries = futures::future::join_all(due.iter().map(|d| self.attempt(d, now))).await;
        let disable_after = chrono::Duration::from_std(self.disable_after).unwrap_or_default();
        for (delivery, tried) in due.iter().zip(tries) {
            let (attempt, sent) = match &tried {
                Try::Held => {
                    alerts::hold_for_disabled(&mut tx, delivery.id).await?;
                    continue;
                }
                Try::NotSent(why) => (self.outcome(delivery, now, Some(why)), None),
                Try::Sent { url, sent } => (
                    self.outcome(delivery, now, sent.error.as_deref()),
                    Some((url, sent)),
                ),
            };
            let label = match attempt {
                Attempt::Delivered => "delivered",
                Attempt::Retry { .. } => "retried",
                Attempt::Failed { .. } | Attempt::Unchanged { .. } => "failed",
            };
            metrics::counter!("usage_alert_deliveries_total", "outcome" => label).increment(1);
            let Some((url, sent)) = sent else {
                alerts::record_attempt_outcome(&mut tx, delivery.id, attempt).await?;
                continue;
            };
            let next = match attempt {
                Attempt::Retry { next, .. } => Some(next),
                _ => None,
            };
            let record = attempt_record(now, "scheduled", url, sent, next);
            alerts::record_attempt(&mut tx, delivery.id, &record, attempt).await?;
            match &sent.error {
                None => alerts::endpoint_delivered(&mut tx, delivery.customer_id).await?,
                Some(error) => {
                    if alerts::endpoint_failed(
                        &mut tx,
                        delivery.customer_id,
                        now,
                        disable_after,
                        error,
                    )
                    .await?
                    {
                        tracing::warn!(customer = %delivery.customer_id, %error, "usage alert endpoint disabled: every attempt failed");
                    }
                }
            }
        }
        tx.commit().await?;
        Ok(due.len())
    }

    /// What one attempt's result means for the delivery.
    fn outcome<'a>(
        &self,
        delivery: &DueDelivery,
        now: DateTime<Utc>,
        error: Option<&'a str>,
    ) -> Attempt<'a> {
        let Some(error) = error else {
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

    /// Posts one delivery, signed with the secrets that sign now.
    #[tracing::instrument(name = "usage alert delivery", level = "debug", skip_all, fields(alert = %delivery.id))]
    async fn attempt(&self, delivery: &DueDelivery, now: DateTime<Utc>) -> Try {
        let Some(url) = &delivery.webhook_url else {
            return Try::NotSent("no webhook URL".into());
        };
        if delivery.enabled == Some(false) {
            return Try::NotSent("alerts turned off".into());
        }
        if delivery.disabled_at.is_some() {
            return Try::Held;
        }
        let sealed = delivery.signing_secrets(now);
        let secrets = match open_secrets(&self.sealer, delivery.customer_id, &sealed) {
            Ok(secrets) if !secrets.is_empty() => secrets,
            Ok(_) => return Try::NotSent("no signing secret".into()),
            Err(e) => return Try::NotSent(format!("signing secret: {e}")),
        };
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let sent = self
            .egress
            .post_signed(url, &secrets, payload(delivery).to_string())
            .await;
        Try::Sent {
            url: url.clone(),
            sent,
        }
    }

    /// Counts the disabled endpoints into `usage_alert_endpoints_disabled`.
    pub async fn count_disabled(&self) -> anyhow::Result<()> {
        let disabled = alerts::disabled_endpoints(&mut *self.db.acquire().await?).await?;
        metrics::gauge!("usage_alert_endpoints_disabled").set(disabled as f64);
        Ok(())
    }

    /// Runs until `shutdown`, a pass a second (at once again after a full
    /// batch).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut counted: Option<Instant> = None;
        loop {
            if counted.is_none_or(|at| at.elapsed() >= COUNT_DISABLED_EVERY) {
                if let Err(e) = self.count_disabled().await {
                    tracing::warn!(error = %crate::telemetry::chain(&*e), "counting disabled usage alert endpoints failed");
                }
                counted = Some(Instant::now());
            }
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
