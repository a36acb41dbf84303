//! The HTTP surface: one router per resource, merged here, and the layers
//! every request passes through.
//!
//! Layers, outermost first: a request id (`x-request-id`, taken from the
//! caller or made up, and echoed on the response), the edge layer (request
//! metrics by matched route, and a panic turned into a 500 in the contract's
//! shape, never a dropped connection), CORS (`CORS_ORIGINS`, when set), and
//! the 64 KiB body limit. Handlers are thin: extract and authorise, call the domain, map
//! the result.

pub mod activations;
pub mod admin;
pub mod admin_apps;
pub mod alerts;
pub mod api_keys;
pub mod auth;
pub mod billing;
pub mod catalog;
pub mod consume;
pub mod dashboard;
pub mod edge;
pub mod extract;
pub mod health;
pub mod openapi;
pub mod rate_limit;
pub mod server;
pub mod usage;
pub mod webhooks;

use axum::{
    extract::DefaultBodyLimit,
    http::{HeaderName, HeaderValue, Method},
    Router,
};
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
};

use utoipa_axum::router::OpenApiRouter;

use crate::{error::ApiError, state::Shared};

pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: Shared) -> Router {
    let cors = cors(&state.settings.cors_origins);
    let reports_errors = state.settings.sentry_dsn.is_some();
    let routes = OpenApiRouter::new()
        .merge(consume::router())
        .merge(catalog::router(&state))
        .merge(activations::router(&state))
        .merge(api_keys::router())
        .merge(admin::router())
        .merge(admin_apps::router())
        .merge(usage::router())
        .merge(alerts::router())
        .merge(billing::router(&state))
        .merge(webhooks::router())
        .merge(health::router());
    openapi::with_document(routes)
        .merge(dashboard::router(&state.settings.stripe.publishable_key))
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(tower::util::option_layer(cors))
        .layer(edge::EdgeLayer::new(reports_errors))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, FastRequestUuid))
        .with_state(state)
}

/// What a process without the API role serves: the probes and `/metrics`.
pub fn ops_router(state: Shared) -> Router {
    let (routes, _) = health::router().split_for_parts();
    routes
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(edge::EdgeLayer::new(state.settings.sentry_dsn.is_some()))
        .with_state(state)
}

/// A UUIDv4 request id, written straight into the header value: the same
/// ids as tower-http's `MakeRequestUuid` without formatting to a `String`
/// and parsing it back on every request.
#[derive(Clone, Copy)]
struct FastRequestUuid;

impl MakeRequestId for FastRequestUuid {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

/// No layer at all without `CORS_ORIGINS`: browsers then get no CORS
/// headers, and the consume path pays nothing for the check. A widget may
/// read the rate-limit headers, to back off as told.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                REQUEST_ID,
                HeaderName::from_static("idempotent-replayed"),
                axum::http::header::RETRY_AFTER,
                rate_limit::LIMIT,
                rate_limit::REMAINING,
                rate_limit::RESET,
            ]),
    )
}
