//! Rate limits at the HTTP edge: the route groups' middleware, and the
//! `RateLimit-*` headers every limited route answers with.
//!
//! Headers (IETF draft `RateLimit` header fields, GCRA reading):
//! `RateLimit-Limit` is the burst, the most requests allowed at once;
//! `RateLimit-Remaining` how many of them are left now; `RateLimit-Reset`
//! the seconds until all are back. A 429 adds `Retry-After`, the seconds
//! until the next request is allowed, repeated as `retry_after` in the body.
//! The route groups send them on every answer; the consume endpoint only
//! on its 429s, so the hot path's replies stay small.
//!
//! A route group's limiter in Redis that cannot be reached lets requests
//! through (counted in `rate_limit_errors_total`): the limits protect the
//! service, and an outage of the limiter alone should not become one of
//! the API.

use std::time::Duration;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};

use super::auth::CustomerAuth;
use crate::{
    config::Limit,
    error::ApiError,
    hot::rate_limit::{Decision, Quota, RouteGroup, Throttle},
    state::Shared,
};

pub const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Whole seconds, rounded up: a client that waits this long is allowed.
pub fn seconds(d: Duration) -> u64 {
    d.as_micros().div_ceil(1_000_000) as u64
}

fn write(headers: &mut HeaderMap, limit: Limit, remaining: u32, rested_in: Duration) {
    headers.insert(LIMIT, HeaderValue::from(limit.burst));
    headers.insert(REMAINING, HeaderValue::from(remaining));
    headers.insert(RESET, HeaderValue::from(seconds(rested_in)));
}

/// The headers of a 429.
pub fn throttled_headers(headers: &mut HeaderMap, throttle: &Throttle) {
    write(headers, throttle.limit, 0, throttle.rested_in);
    headers.insert(
        axum::http::header::RETRY_AFTER,
        HeaderValue::from(seconds(throttle.retry_after).max(1)),
    );
}

fn quota_headers(headers: &mut HeaderMap, quota: &Quota) {
    write(headers, quota.limit, quota.remaining, quota.rested_in);
}

/// `GET /api/v1/apps…`: `RATE_LIMIT_APPS_PER_HOUR`.
pub async fn apps(
    State(state): State<Shared>,
    auth: CustomerAuth,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    enforce(&state, RouteGroup::Apps, auth, request, next).await
}

/// `POST /api/v1/customer/apps/{id}/activate`: `RATE_LIMIT_ACTIVATE_PER_HOUR`.
pub async fn activate(
    State(state): State<Shared>,
    auth: CustomerAuth,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    enforce(&state, RouteGroup::Activate, auth, request, next).await
}

/// `/api/v1/customer/billing/*`: `RATE_LIMIT_BILLING_PER_HOUR`.
pub async fn billing(
    State(state): State<Shared>,
    auth: CustomerAuth,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    enforce(&state, RouteGroup::Billing, auth, request, next).await
}

/// Counts the request against the customer's limiter for `group`, and
/// hands the verified caller on to the handler, which does not verify
/// the token again.
async fn enforce(
    state: &Shared,
    group: RouteGroup,
    auth: CustomerAuth,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let limits = &state.settings.rate_limits;
    let limit = match group {
        RouteGroup::Apps => limits.apps,
        RouteGroup::Activate => limits.activate,
        RouteGroup::Billing => limits.billing,
    };
    let quota = match state.limiter.check(group, auth.customer, limit).await {
        Ok(Decision::Allowed(quota)) => (!limit.is_none()).then_some(quota),
        Ok(Decision::Limited(throttle)) => {
            metrics::counter!("rate_limited_total", "group" => group.name()).increment(1);
            return Err(ApiError::RateLimited(throttle));
        }
        Err(e) => {
            metrics::counter!("rate_limit_errors_total", "group" => group.name()).increment(1);
            tracing::warn!(error = %crate::telemetry::chain(&e), group = group.name(), "rate limiter unavailable; request let through");
            None
        }
    };
    request.extensions_mut().insert(auth);
    let mut response = next.run(request).await;
    if let Some(quota) = quota {
        quota_headers(response.headers_mut(), &quota);
    }
    Ok(response)
}
