//! The HTTP surface: one router per resource, merged here, and the layers
//! every request passes through.
//!
//! Layers, outermost first: a request id (`x-request-id`, taken from the
//! caller or made up, and echoed on the response), panic catching (a panic
//! is a 500 in the contract's shape, never a dropped connection), request
//! metrics by matched route, CORS (`CORS_ORIGINS`), and the 64 KiB body
//! limit. Handlers are thin: extract and authorise, call the domain, map
//! the result.

pub mod activations;
pub mod admin;
pub mod api_keys;
pub mod auth;
pub mod consume;
pub mod extract;
pub mod health;
pub mod openapi;

use std::time::Instant;

use axum::{
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{HeaderName, HeaderValue, Method},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Router,
};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
};

use crate::{error::ApiError, state::Shared};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: Shared) -> Router {
    let cors = cors(&state.settings.cors_origins);
    Router::new()
        .merge(consume::router())
        .merge(activations::router())
        .merge(api_keys::router())
        .merge(admin::router())
        .merge(health::router())
        .merge(openapi::router())
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(cors)
        .layer(middleware::from_fn(track_metrics))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal(anyhow::anyhow!("handler panicked")).into_response()
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([REQUEST_ID, HeaderName::from_static("idempotent-replayed")])
}

/// `http_requests_total` and `http_request_duration_seconds`, labelled by
/// the matched route (not the raw path, which would explode the series).
async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    response
}
