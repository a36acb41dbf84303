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
//! first URL, shown once, stored sealed, kept when the URL changes.

use std::{net::IpAddr, sync::Arc};

use base64::Engine;
use rand::RngCore;
use uuid::Uuid;

use super::accounts::{alert_at, Accounts};
use crate::{
    error::{ApiError, FieldError},
    hot::account::AccountChange,
    ledger::{
        alerts::{self, AlertEvent, AlertSettings},
        sealed::{alert_secret_place, Sealer},
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
}

pub struct UsageAlerts {
    accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    db: sqlx::PgPool,
    /// Outside production a webhook may be plain HTTP to loopback.
    production: bool,
}

impl UsageAlerts {
    pub fn new(
        accounts: Arc<Accounts>,
        sealer: Arc<Sealer>,
        db: sqlx::PgPool,
        production: bool,
    ) -> Self {
        Self {
            accounts,
            sealer,
            db,
            production,
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
        let checked = self.check(&change)?;
        let (sealer, hot_alerts) = (self.sealer.clone(), self.accounts.alerts_enabled());
        let place = alert_secret_place(customer);
        let (stored, secret) = self
            .accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let mut settings = alerts::settings(tx, customer).await?;
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
                    alerts::save_settings(tx, customer, &settings).await?;
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

    /// The customer's crossings, newest first.
    pub async fn events(&self, customer: Uuid) -> Result<Vec<AlertEvent>, ApiError> {
        Ok(alerts::events(&mut *self.db.acquire().await?, customer, 200).await?)
    }

    fn view(&self, customer: Uuid, stored: &AlertSettings) -> Result<SettingsView, ApiError> {
        let hint = stored
            .signing_secret
            .as_deref()
            .map(|sealed| self.sealer.open(sealed, &alert_secret_place(customer)))
            .transpose()
            .map_err(|e| ApiError::Internal(e.into()))?
            .map(|plain| format!("…{}", &plain[plain.len().saturating_sub(4)..]));
        Ok(SettingsView {
            webhook_url: stored.webhook_url.clone(),
            thresholds: stored.thresholds.clone(),
            enabled: stored.enabled,
            signing_secret_hint: hint,
        })
    }

    /// 422 naming each field that is wrong.
    fn check(&self, change: &SettingsChange) -> Result<CheckedChange, ApiError> {
        let mut problems = Vec::new();
        let webhook_url = match &change.webhook_url {
            Some(Some(url)) => match self.check_url(url) {
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

    /// An https URL; outside production also plain http to loopback (a
    /// merchant's local receiver).
    fn check_url(&self, raw: &str) -> Result<String, &'static str> {
        let url = url::Url::parse(raw).map_err(|_| "must be an absolute URL")?;
        if raw.len() > 2048 {
            return Err("must be at most 2048 characters");
        }
        let loopback = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => return Err("must name a host"),
        };
        match url.scheme() {
            "https" => Ok(url.into()),
            "http" if loopback && !self.production => Ok(url.into()),
            "http" if loopback => {
                Err("must be https (plain http to loopback only outside production)")
            }
            _ => Err("must be https"),
        }
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
