//! Merchants' usage alerts: `GET`/`PUT /api/v1/customer/alerts` and
//! `GET /api/v1/customer/alerts/events` (API.md "Usage alerts").

use axum::{extract::State, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::{auth::CustomerAuth, extract::Json as Body};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::alerts::{SettingsChange, SettingsView},
    error::ApiError,
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(settings, update))
        .routes(routes!(events))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AlertSettings {
    /// Where crossings are posted; `null` for none (they are still
    /// recorded, with `delivery: none`).
    webhook_url: Option<String>,
    /// Percent of the plan's allowance, ascending.
    thresholds: Vec<i16>,
    enabled: bool,
    /// `…` and the signing secret's last four characters; `null` before a
    /// URL was first set.
    signing_secret_hint: Option<String>,
    /// Only in the answer that set the first URL: the secret deliveries
    /// are signed with (`Connected-Apps-Signature`), shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
}

impl AlertSettings {
    fn from(view: SettingsView, signing_secret: Option<String>) -> Self {
        Self {
            webhook_url: view.webhook_url,
            thresholds: view.thresholds,
            enabled: view.enabled,
            signing_secret_hint: view.signing_secret_hint,
            signing_secret,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/customer/alerts", tag = "alerts",
    responses((status = 200, description = "The settings; the defaults (80 and 100, enabled, no URL) until changed", body = AlertSettings),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("bearer" = ["tokens:read"])))]
pub async fn settings(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<AlertSettings>, ApiError> {
    auth.require(Scope::TokensRead)?;
    let view = state.alerts.settings(auth.customer).await?;
    Ok(Json(AlertSettings::from(view, None)))
}

/// Any of the fields; what is left out stays as it is.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertChange {
    /// https (plain http to loopback outside production); `null` removes
    /// it. The signing secret is made with the first URL and kept.
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable)]
    webhook_url: Option<Option<String>>,
    /// 1 to 5 distinct integers from 1 to 100.
    #[serde(default)]
    thresholds: Option<Vec<i64>>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// `null` as `Some(None)`, absent (the default) as `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[utoipa::path(put, path = "/api/v1/customer/alerts", tag = "alerts", request_body = AlertChange,
    responses((status = 200, description = "The settings; with `signing_secret` when this set the first URL", body = AlertSettings),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 422, description = "`validation_failed`, naming `webhook_url` or `thresholds`", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn update(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Body(body): Body<AlertChange>,
) -> Result<Json<AlertSettings>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let change = SettingsChange {
        webhook_url: body.webhook_url,
        thresholds: body.thresholds,
        enabled: body.enabled,
    };
    let (view, secret) = state.alerts.update(auth.customer, change).await?;
    Ok(Json(AlertSettings::from(view, secret)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AlertEvent {
    /// Also the delivery's `id`, the same on every attempt.
    id: Uuid,
    threshold: i16,
    period_start: DateTime<Utc>,
    /// The period's usage after the crossing consume.
    tokens_used: i64,
    /// The period's plan allowance.
    tokens_total: i64,
    crossed_at: DateTime<Utc>,
    /// `pending`, `delivered`, `failed` (24 h of retries) or `none` (no
    /// URL at the crossing).
    delivery: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AlertEvents {
    /// Newest first (the latest 200).
    events: Vec<AlertEvent>,
}

#[utoipa::path(get, path = "/api/v1/customer/alerts/events", tag = "alerts",
    responses((status = 200, body = AlertEvents),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("bearer" = ["tokens:read"])))]
pub async fn events(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<AlertEvents>, ApiError> {
    auth.require(Scope::TokensRead)?;
    let events = state.alerts.events(auth.customer).await?;
    Ok(Json(AlertEvents {
        events: events
            .into_iter()
            .map(|e| AlertEvent {
                id: e.id,
                threshold: e.threshold,
                period_start: e.period_start,
                tokens_used: e.tokens_used,
                tokens_total: e.tokens_total,
                crossed_at: e.crossed_at,
                delivery: e.delivery,
            })
            .collect(),
    }))
}
