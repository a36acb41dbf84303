//! Merchants' usage alerts: `GET`/`PUT /api/v1/customer/alerts`,
//! `GET /api/v1/customer/alerts/events` (API.md "Usage alerts"), and the
//! webhook's upkeep: the signing secret's rotation, each event's attempts,
//! resends and test events.

use axum::{extract::State, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::{
    auth::CustomerAuth,
    extract::{Json as Body, PathParam},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::alerts::{SettingsChange, SettingsView},
    egress::Sent,
    error::ApiError,
    ledger::alerts::AttemptRecord,
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(settings, update))
        .routes(routes!(events))
        .routes(routes!(rotate_secret))
        .routes(routes!(attempts))
        .routes(routes!(resend))
        .routes(routes!(send_test))
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
    /// Only in the answer that set the first URL or rotated the secret:
    /// the secret deliveries are signed with (`Connected-Apps-Signature`),
    /// shown this once.
    #[serde(skip_serializing_if = "Option::is_none")]
    signing_secret: Option<String>,
    /// After a rotation: until when deliveries also carry a signature
    /// with the previous secret; `null` otherwise.
    previous_secret_expires_at: Option<DateTime<Utc>>,
    /// `enabled`, or `disabled` when every attempt failed for 24 h
    /// (deliveries are held until the URL is saved again).
    endpoint_status: &'static str,
    /// Why and when the endpoint was disabled; `null` while enabled.
    disabled_reason: Option<String>,
    disabled_at: Option<DateTime<Utc>>,
}

impl AlertSettings {
    fn from(view: SettingsView, signing_secret: Option<String>) -> Self {
        let (disabled_at, disabled_reason) = view.disabled.unzip();
        Self {
            webhook_url: view.webhook_url,
            thresholds: view.thresholds,
            enabled: view.enabled,
            signing_secret_hint: view.signing_secret_hint,
            signing_secret,
            previous_secret_expires_at: view.previous_secret_expires_at,
            endpoint_status: if disabled_at.is_some() {
                "disabled"
            } else {
                "enabled"
            },
            disabled_reason,
            disabled_at,
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
    /// `pending`, `delivered`, `failed` (24 h of retries), `none` (no
    /// URL at the crossing) or `disabled` (the endpoint was disabled:
    /// held, to be resent).
    delivery: String,
    /// Requests made so far (the worker's and resends).
    attempts: i32,
    /// Why the latest attempt did not land; `null` after one that did.
    last_error: Option<String>,
    /// When the worker tries again, while `pending`.
    next_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AlertEvents {
    /// Newest first (the latest 200).
    events: Vec<AlertEvent>,
    /// `enabled` or `disabled` (see `GET /api/v1/customer/alerts`).
    endpoint_status: &'static str,
    disabled_reason: Option<String>,
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
    let (events, endpoint) = state.alerts.events(auth.customer).await?;
    let endpoint = AlertSettings::from(endpoint, None);
    Ok(Json(AlertEvents {
        endpoint_status: endpoint.endpoint_status,
        disabled_reason: endpoint.disabled_reason,
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
                attempts: e.attempts,
                last_error: e.last_error,
                next_attempt_at: e.next_attempt_at,
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/customer/alerts/rotate-secret", tag = "alerts",
    description = "Makes a new signing secret, shown once in `signing_secret`. For \
        `ALERT_SECRET_OVERLAP_HOURS` (24) deliveries carry two `v1=` signatures, the new \
        secret's and the previous one's, so a receiver can switch without missing one.",
    responses((status = 200, description = "The settings with the new `signing_secret`", body = AlertSettings),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 409, description = "`conflict`: no secret yet (no URL was ever set)", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn rotate_secret(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<AlertSettings>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let (view, secret) = state.alerts.rotate_secret(auth.customer).await?;
    Ok(Json(AlertSettings::from(view, Some(secret))))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveryAttempt {
    attempted_at: DateTime<Utc>,
    /// `scheduled` (the delivery worker) or `resend`.
    trigger: String,
    /// Where it was sent.
    url: String,
    /// The receiver's status; `null` when none answered (a network error,
    /// a refused address, a timeout).
    http_status: Option<i16>,
    /// Why it did not land; `null` for a 2xx.
    error: Option<String>,
    latency_ms: i32,
    /// The first 1 KiB of the receiver's answer.
    response_excerpt: Option<String>,
    /// When the worker tried (or tries) again after this attempt.
    next_attempt_at: Option<DateTime<Utc>>,
}

impl From<AttemptRecord> for DeliveryAttempt {
    fn from(a: AttemptRecord) -> Self {
        Self {
            attempted_at: a.attempted_at,
            trigger: a.trigger,
            url: a.url,
            http_status: a.http_status,
            error: a.error,
            latency_ms: a.latency_ms,
            response_excerpt: a.response_excerpt,
            next_attempt_at: a.next_attempt_at,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeliveryAttempts {
    /// Oldest first.
    attempts: Vec<DeliveryAttempt>,
}

#[utoipa::path(get, path = "/api/v1/customer/alerts/events/{id}/attempts", tag = "alerts",
    params(("id" = Uuid, Path, description = "The event's id")),
    responses((status = 200, body = DeliveryAttempts),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, description = "`not_found`: no such event of this customer", body = crate::error::ErrorBody)),
    security(("bearer" = ["tokens:read"])))]
pub async fn attempts(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(id): PathParam<Uuid>,
) -> Result<Json<DeliveryAttempts>, ApiError> {
    auth.require(Scope::TokensRead)?;
    let attempts = state.alerts.attempts(auth.customer, id).await?;
    Ok(Json(DeliveryAttempts {
        attempts: attempts.into_iter().map(Into::into).collect(),
    }))
}

/// What became of one request to the webhook URL.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SendOutcome {
    /// The event's id (the body's `id`).
    id: Uuid,
    /// Whether the receiver answered 2xx.
    delivered: bool,
    http_status: Option<u16>,
    error: Option<String>,
    latency_ms: u64,
    /// The first 1 KiB of the receiver's answer.
    response_excerpt: Option<String>,
}

impl SendOutcome {
    fn from(id: Uuid, sent: Sent) -> Self {
        Self {
            id,
            delivered: sent.delivered(),
            http_status: sent.status,
            error: sent.error,
            latency_ms: sent.latency.as_millis() as u64,
            response_excerpt: sent.excerpt,
        }
    }
}

#[utoipa::path(post, path = "/api/v1/customer/alerts/events/{id}/resend", tag = "alerts",
    description = "Sends a delivered, failed, held or unsent event again now, with the same `id`, \
        to the URL set now, signed with the secrets that sign now. Recorded in its attempts; \
        when it lands the event is `delivered`, otherwise it stays as it was.",
    params(("id" = Uuid, Path, description = "The event's id")),
    responses((status = 200, description = "The attempt's outcome (a receiver's refusal is `delivered: false`, not an error)", body = SendOutcome),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 404, description = "`not_found`: no such event of this customer", body = crate::error::ErrorBody),
              (status = 409, description = "`conflict`: the event is still pending, or no URL is set", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn resend(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(id): PathParam<Uuid>,
) -> Result<Json<SendOutcome>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let sent = state.alerts.resend(auth.customer, id).await?;
    Ok(Json(SendOutcome::from(id, sent)))
}

#[utoipa::path(post, path = "/api/v1/customer/alerts/test", tag = "alerts",
    description = "Sends a signed `usage.test` event (`{\"id\", \"type\": \"usage.test\", \
        \"created\", \"data\": {\"customer_id\", \"message\"}}`) to the URL set now and \
        answers with what became of it. Nothing is recorded.",
    responses((status = 200, description = "The attempt's outcome", body = SendOutcome),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
              (status = 409, description = "`conflict`: no URL is set", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn send_test(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<SendOutcome>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let (id, sent) = state.alerts.send_test(auth.customer).await?;
    Ok(Json(SendOutcome::from(id, sent)))
}
