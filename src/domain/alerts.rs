//! Merchants' usage alerts (API.md "Usage alerts"): their settings, and
//! the hot state that lets the consume script detect a crossing.
//!
//! A merchant picks 1 to 5 thresholds (percent of the plan's allowance,
//! default 80 and 100) and optionally a webhook URL. The thresholds live
//! in the customer's hot state (`alert_at`), changed in the same request,
//! so the very next consume that carries the period's usage across one
//! reports it; the flusher records each crossing once
//! (`ledger::alerts::record_crossings`) and the delivery worker posts it
//! (`workers::alerts`). Deliveries are signed with a secret made with the
//! first URL, shown once, stored sealed, kept when the URL changes, and
//! rotated on request with an overlap during which both sign.
//!
//! Merchants can also see every attempt at a crossing, resend one, and
//! send a signed `usage.test` event to check their receiver. Every request
//! to a merchant's URL goes through [`Egress`], which keeps it off the
//! service's own network.

use std::{sync::Arc, time::Duration};

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde_json::json;
use uuid::Uuid;

use super::accounts::{alert_at, Accounts};
use crate::{
    egress::{Egress, Sent},
    error::{ApiError, FieldError},
    hot::account::AccountChange,
    ledger::{
        alerts::{self, AlertEvent, AlertSettings, Attempt, AttemptRecord, DueDelivery},
        sealed::{alert_secret_place, SealError, Sealer},
    },
};

/// A change to the settings: what is `None` stays as it is.
#[derive(Debug, Default)]
pub struct SettingsChange {
    /// `Some(None)` removes the URL.
    pub webhook_url: Option<Option<String>>,
    pub thresholds: Option<Vec<i64>>,
    pub enabled: Option<bool>,
}

/// The settings as the API shows them.
#[derive(Debug, Clone)]
pub struct SettingsView {
    pub webhook_url: Option<String>,
    pub thresholds: Vec<i16>,
    pub enabled: bool,
    /// `…` and the secret's last four characters.
    pub signing_secret_hint: Option<String>,
    /// Until when the secret before the last rotation signs too.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
    /// Set when every attempt failed for the configured time; saving the
    /// URL again clears it.
    pub disabled: Option<(DateTime<Utc>, String)>,
}

pub struct UsageAlerts {
    accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    db: sqlx::PgPool,
    egress: Arc<Egress>,
    /// How long the previous secret signs after a rotation.
    secret_overlap: Duration,
}

impl UsageAlerts {
    pub fn new(
        accounts: Arc<Accounts>,
        sealer: Arc<Sealer>,
        db: sqlx::PgPool,
        egress: Arc<Egress>,
        secret_overlap: Duration,
    ) -> Self {
        Self {
            accounts,
            sealer,
            db,
            egress,
            secret_overlap,
        }
    }

    pub async fn settings(&self, customer: Uuid) -> Result<SettingsView, ApiError> {
        let stored = alerts::settings(&mut *self.db.acquire().await?, customer).await?;
        self.view(customer, &stored)
    }

    /// Applies `change`; returns the settings and, when this change set the
    /// first URL, the new signing secret (shown this once).
    pub async fn update(
        &self,
        customer: Uuid,
        change: SettingsChange,
    ) -> Result<(SettingsView, Option<String>), ApiError> {
        let checked = self.check(&change).await?;
        let (sealer, hot_alerts) = (self.sealer.clone(), self.accounts.alerts_enabled());
        let place = alert_secret_place(customer);
        let (stored, secret) = self
            .accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let mut settings = alerts::settings(tx, customer).await?;
                    let reenable = checked.webhook_url.is_some();
                    if let Some(url) = checked.webhook_url {
                        settings.webhook_url = url;
                    }
                    if let Some(thresholds) = checked.thresholds {
                        settings.thresholds = thresholds;
                    }
                    if let Some(enabled) = checked.enabled {
                        settings.enabled = enabled;
                    }
                    let mut secret = None;
                    if settings.webhook_url.is_some() && settings.signing_secret.is_none() {
                        let plain = new_secret();
                        settings.signing_secret = Some(sealer.seal(&plain, &place));
                        secret = Some(plain);
                    }
                    alerts::save_settings(tx, customer, &settings, reenable).await?;
                    if reenable {
                        settings.disabled_at = None;
                        settings.disabled_reason = None;
                    }
                    let thresholds = settings.enabled.then_some(settings.thresholds.as_slice());
                    let changes = if hot_alerts {
                        vec![AccountChange::SetAlerts(alert_at(thresholds))]
                    } else {
                        Vec::new()
                    };
                    Ok(((settings, secret), changes))
                })
            })
            .await?;
        Ok((self.view(customer, &stored)?, secret))
    }

    /// Makes a new signing secret (returned, shown this once); the one it
    /// replaces signs deliveries too for the overlap, so receivers can
    /// switch without missing one. 409 before the first URL made one.
    pub async fn rotate_secret(&self, customer: Uuid) -> Result<(SettingsView, String), ApiError> {
        let (sealer, overlap) = (self.sealer.clone(), self.secret_overlap);
        let place = alert_secret_place(customer);
        let (stored, secret) = self
            .accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let mut settings = alerts::settings(tx, customer).await?;
                    let Some(current) = settings.signing_secret.take() else {
                        return Err(ApiError::Conflict(
                            "there is no signing secret to rotate: set a webhook_url first".into(),
                        ));
                    };
                    let plain = new_secret();
                    settings.signing_secret = Some(sealer.seal(&plain, &place));
                    (
                        settings.previous_signing_secret,
                        settings.previous_secret_expires_at,
                    ) = if overlap.is_zero() {
                        (None, None)
                    } else {
                        (Some(current), Some(Utc::now() + overlap))
                    };
                    alerts::save_settings(tx, customer, &settings, false).await?;
                    Ok(((settings, plain), Vec::new()))
                })
            })
            .await?;
        Ok((self.view(customer, &stored)?, secret))
    }

    /// The customer's crossings, newest first, and their endpoint's state.
    pub async fn events(
        &self,
        customer: Uuid,
    ) -> Result<(Vec<AlertEvent>, SettingsView), ApiError> {
        let mut conn = self.db.acquire().await?;
        let events = alerts::events(&mut conn, customer, 200).await?;
        let settings = alerts::settings(&mut conn, customer).await?;
        Ok((events, self.view(customer, &settings)?))
    }

    /// Every attempt at one of the customer's crossings, oldest first.
    pub async fn attempts(&self, customer: Uuid, id: Uuid) -> Result<Vec<AttemptRecord>, ApiError> {
        alerts::attempts(&mut *self.db.acquire().await?, customer, id)
            .await?
            .ok_or(ApiError::NotFound("alert event"))
    }

    /// Sends one of the customer's crossings again now, with its id, to
    /// the URL set now; recorded in its attempts. A delivery that lands
    /// marks it delivered; one that does not leaves it as it was. 409
    /// while the worker still has it (pending) or without a URL.
    pub async fn resend(&self, customer: Uuid, id: Uuid) -> Result<Sent, ApiError> {
        let delivery = alerts::delivery(&mut *self.db.acquire().await?, customer, id)
            .await?
            .ok_or(ApiError::NotFound("alert event"))?;
        if delivery.delivery == "pending" {
            return Err(ApiError::Conflict(
                "the event is still being delivered; its retries are listed in its attempts".into(),
            ));
        }
        let Some(url) = delivery.webhook_url.clone() else {
            return Err(ApiError::Conflict("no webhook_url is set".into()));
        };
        let now = Utc::now();
        let secrets = self.open_secrets(customer, &delivery.signing_secrets(now))?;
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let sent = self
            .egress
            .post_signed(&url, &secrets, payload(&delivery).to_string())
            .await;
        let record = attempt_record(now, "resend", &url, &sent, None);
        let attempt = match &sent.error {
            None => Attempt::Delivered,
            Some(error) => Attempt::Unchanged { error },
        };
        let mut conn = self.db.acquire().await?;
        alerts::record_attempt(&mut conn, id, &record, attempt).await?;
        if sent.delivered() {
            alerts::endpoint_delivered(&mut conn, customer).await?;
        }
        Ok(sent)
    }

    /// Sends a signed `usage.test` event to the URL set now and tells what
    /// became of it; nothing is recorded. 409 without a URL.
    pub async fn send_test(&self, customer: Uuid) -> Result<(Uuid, Sent), ApiError> {
        let settings = alerts::settings(&mut *self.db.acquire().await?, customer).await?;
        let Some(url) = settings.webhook_url.clone() else {
            return Err(ApiError::Conflict("no webhook_url is set".into()));
        };
        let now = Utc::now();
        let secrets = self.open_secrets(customer, &settings.signing_secrets(now))?;
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let id = Uuid::now_v7();
        let body = json!({
            "id": id,
            "type": "usage.test",
            "created": now.timestamp(),
            "data": {
                "customer_id": customer,
                "message": "A test event: your receiver is reachable and verifies the signature.",
            }
        });
        Ok((
            id,
            self.egress
                .post_signed(&url, &secrets, body.to_string())
                .await,
        ))
    }

    fn open_secrets(&self, customer: Uuid, sealed: &[&str]) -> Result<Vec<String>, ApiError> {
        open_secrets(&self.sealer, customer, sealed).map_err(|e| ApiError::Internal(e.into()))
    }

    fn view(&self, customer: Uuid, stored: &AlertSettings) -> Result<SettingsView, ApiError> {
        let hint = stored
            .signing_secret
            .as_deref()
            .map(|sealed| self.sealer.open(sealed, &alert_secret_place(customer)))
            .transpose()
            .map_err(|e| ApiError::Internal(e.into()))?
            .map(|plain| format!("…{}", &plain[plain.len().saturating_sub(4)..]));
        let now = Utc::now();
        Ok(SettingsView {
            webhook_url: stored.webhook_url.clone(),
            thresholds: stored.thresholds.clone(),
            enabled: stored.enabled,
            signing_secret_hint: hint,
            previous_secret_expires_at: stored.previous_secret_expires_at.filter(|end| *end > now),
            disabled: stored
                .disabled_at
                .map(|at| (at, stored.disabled_reason.clone().unwrap_or_default())),
        })
    }

    /// 422 naming each field that is wrong.
    async fn check(&self, change: &SettingsChange) -> Result<CheckedChange, ApiError> {
        let mut problems = Vec::new();
        let webhook_url = match &change.webhook_url {
            Some(Some(url)) => match self.egress.check_url(url).await {
                Ok(url) => Some(Some(url)),
                Err(message) => {
                    problems.push(FieldError::new("webhook_url", message));
                    None
                }
            },
            Some(None) => Some(None),
            None => None,
        };
        let thresholds = match &change.thresholds {
            Some(list) => {
                let mut sorted = list.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if list.is_empty()
                    || list.len() > 5
                    || sorted.len() != list.len()
                    || sorted.iter().any(|t| !(1..=100).contains(t))
                {
                    problems.push(FieldError::new(
                        "thresholds",
                        "must be 1 to 5 distinct integers from 1 to 100",
                    ));
                    None
                } else {
                    Some(sorted.into_iter().map(|t| t as i16).collect())
                }
            }
            None => None,
        };
        if !problems.is_empty() {
            return Err(ApiError::Validation(problems));
        }
        Ok(CheckedChange {
            webhook_url,
            thresholds,
            enabled: change.enabled,
        })
    }
}

struct CheckedChange {
    webhook_url: Option<Option<String>>,
    thresholds: Option<Vec<i16>>,
    enabled: Option<bool>,
}

/// `whsec_` and 32 random bytes, as Stripe's signing secrets look.
fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The customer's signing secrets, from their sealed form.
pub fn open_secrets(
    sealer: &Sealer,
    customer: Uuid,
    sealed: &[&str],
) -> Result<Vec<String>, SealError> {
    let place = alert_secret_place(customer);
    sealed.iter().map(|s| sealer.open(s, &place)).collect()
}

/// The body of a crossing's delivery (API.md "Usage alerts"), the same on
/// every attempt.
pub fn payload(d: &DueDelivery) -> serde_json::Value {
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

/// The history row of one request.
pub fn attempt_record(
    at: DateTime<Utc>,
    trigger: &str,
    url: &str,
    sent: &Sent,
    next_attempt_at: Option<DateTime<Utc>>,
) -> AttemptRecord {
    AttemptRecord {
        attempted_at: at,
        trigger: trigger.to_owned(),
        url: url.to_owned(),
        http_status: sent.status.map(|s| s as i16),
        error: sent.error.clone(),
        latency_ms: sent.latency.as_millis().min(i32::MAX as u128) as i32,
        response_excerpt: sent.excerpt.clone(),
        next_attempt_at,
    }
}
