//! `POST /api/v1/webhooks/stripe`: Stripe's events, verified against the
//! raw body before anything is read from it (`auth::stripe_signature`),
//! then applied at most once each (`domain::stripe_events`).
//!
//! Answers: 200 for an event applied, a duplicate, or one we do not act
//! on (Stripe stops retrying); 401 `invalid_signature`; 400 for a body
//! that is not an event; 503 when Postgres or Redis is down, so Stripe
//! delivers it again later.

use axum::{
    extract::{DefaultBodyLimit, State},
    http::HeaderMap,
    Json,
};
use serde::Serialize;

use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::stripe_signature::{self, SignatureError},
    domain::stripe_events::Event,
    error::{decode_json_with_nul, ApiError},
    http::extract::Body,
    state::Shared,
};

/// Stripe's events can outgrow the API's 64 KiB (an invoice with many lines).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(stripe))
        .layer(DefaultBodyLimit::max(MAX_EVENT_BYTES))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Received {
    received: bool,
    /// `applied`, `duplicate` (applied before), `ignored` (older than
    /// what is applied, or not acted on) or `conflicting` (about a
    /// subscription another customer holds: recorded and logged, nothing
    /// changed).
    outcome: &'static str,
}

#[utoipa::path(post, path = "/api/v1/webhooks/stripe", tag = "billing",
    request_body(content = String, description = "A Stripe event, verified as sent: the raw bytes are signed", content_type = "application/json"),
    params(("Stripe-Signature" = String, Header, description = "`t=<unix seconds>,v1=<hex HMAC-SHA256 of t.body>`; any v1 under any configured secret; 300 s tolerance")),
    responses((status = 200, body = Received),
              (status = 400, description = "Not a Stripe event", body = crate::error::ErrorBody),
              (status = 401, description = "`invalid_signature`: missing, tampered, stale or under another secret", body = crate::error::ErrorBody),
              (status = 413, description = "`payload_too_large`: an event over 1 MiB", body = crate::error::ErrorBody),
              (status = 503, description = "A dependency is down; Stripe retries", body = crate::error::ErrorBody)))]
pub async fn stripe(
    State(state): State<Shared>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Received>, ApiError> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    let secrets: Vec<&[u8]> = state
        .settings
        .stripe
        .webhook_secrets
        .iter()
        .map(|s| s.expose().as_bytes())
        .collect();
    let verified = header
        .ok_or(SignatureError::Malformed)
        .and_then(|h| stripe_signature::verify(&secrets, h, &body, chrono::Utc::now().timestamp()));
    if let Err(e) = verified {
        // Nothing of an unverified body is trusted, its type neither.
        count("unverified", "invalid");
        return Err(ApiError::InvalidSignature(e));
    }
    let event: Event =
        decode_json_with_nul(&body).inspect_err(|_| count("unreadable", "invalid"))?;
    let kind = known_type(&event.kind);
    let outcome = state
        .stripe_events
        .apply(event)
        .await
        .inspect_err(|_| count(kind, "error"))?;
    count(kind, outcome.name());
    Ok(Json(Received {
        received: true,
        outcome: outcome.name(),
    }))
}

/// `stripe_webhook_events_total{type,outcome}`.
fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!("stripe_webhook_events_total", "type" => kind, "outcome" => outcome)
        .increment(1);
}

/// The event types acted on keep their name as a label; every other is
/// `other`, so the label stays bounded whatever Stripe adds.
/// The event types counted by name (`stripe_webhook_events_total{type}`);
/// the rest count as `other`.
pub const KNOWN_TYPES: [&str; 11] = [
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.closed",
    "other",
];

fn known_type(kind: &str) -> &'static str {
    KNOWN_TYPES
        .into_iter()
        .find(|k| *k == kind)
        .unwrap_or("other")
}
