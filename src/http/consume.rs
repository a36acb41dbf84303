//! `POST /api/v1/customer/tokens/consume`: the hot path.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use uuid::Uuid;

use super::{
    auth::ConsumeAuth,
    extract::{idempotency_key, Body},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{domain::consume::ConsumeRequest, error::ApiError, state::Shared};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new().routes(routes!(consume))
}

/// The request body (documentation only: the handler parses it borrowed).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ConsumeBody {
    /// The app's public id, e.g. `vto-001`.
    app_id: String,
    /// Integer >= 1. Defaults to the app's `token_cost`; with an embed key
    /// it must be omitted or equal `token_cost`.
    tokens_consumed: Option<i64>,
    /// At most 100 characters.
    session_id: Option<String>,
    /// An object of at most 4 KiB; `ip_address`, `user_agent`,
    /// `product_id`, `processing_time_ms` and `visitor_id` are read.
    metadata: Option<serde_json::Value>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ConsumeResponse<'a> {
    success: bool,
    event_id: Uuid,
    app_id: &'a str,
    tokens_consumed: i64,
    /// -1 on an unlimited plan.
    tokens_remaining: i64,
}

#[utoipa::path(
    post,
    path = "/api/v1/customer/tokens/consume",
    tag = "tokens",
    request_body = ConsumeBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "At most 255 characters. A retry with the same key and body within 24 h returns the first response with `Idempotent-Replayed: true` and charges nothing. Only charged requests are recorded: a refused one may be retried with the same key.")),
    responses(
        (status = 200, description = "Charged", body = ConsumeResponse),
        (status = 400, description = "`invalid_json`, `invalid_request`", body = crate::error::ErrorBody),
        (status = 401, description = "`unauthenticated`, `invalid_token`, `invalid_api_key`", body = crate::error::ErrorBody),
        (status = 402, description = "`insufficient_tokens` (with `tokens_remaining`), `subscription_inactive`", body = crate::error::ErrorBody),
        (status = 403, description = "`insufficient_scope`, `app_not_active`, `app_not_permitted`, `origin_not_allowed`", body = crate::error::ErrorBody),
        (status = 404, description = "`not_found`: unknown app or customer", body = crate::error::ErrorBody),
        (status = 409, description = "`conflict`: Idempotency-Key reused with another body", body = crate::error::ErrorBody),
        (status = 413, description = "`payload_too_large`", body = crate::error::ErrorBody),
        (status = 422, description = "`validation_failed` with `details`", body = crate::error::ErrorBody),
        (status = 429, description = "`rate_limited`: over the customer's consume limit (`RATE_LIMIT_CONSUME_PER_HOUR`, burst `RATE_LIMIT_CONSUME_BURST`) or the embed key's `rate_limit` (burst: 36 s of it); nothing charged. `retry_after` in the body repeats `Retry-After`", body = crate::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until a request is allowed again"),
                  ("RateLimit-Limit" = u32, description = "The burst: requests allowed at once"),
                  ("RateLimit-Remaining" = u32, description = "Requests allowed at once now: 0"),
                  ("RateLimit-Reset" = u64, description = "Seconds until the whole burst is allowed again"))),
        (status = 503, description = "`unavailable`: Redis down or slower than `REDIS_TIMEOUT_MS`; nothing charged", body = crate::error::ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn consume(
    State(state): State<Shared>,
    ConsumeAuth(caller): ConsumeAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let idempotency_key = idempotency_key(&headers)?;
    let request = ConsumeRequest::parse(&body)?;
    let receipt = state
        .metering
        .consume(&caller, &request, idempotency_key, &body)
        .await?;
    let mut response = axum::Json(ConsumeResponse {
        success: true,
        event_id: receipt.event_id,
        app_id: &request.app_id,
        tokens_consumed: receipt.tokens_consumed,
        tokens_remaining: receipt.tokens_remaining,
    })
    .into_response();
    if receipt.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}
