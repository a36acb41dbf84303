//! `GET /openapi.json`: the contract as the service implements it.
//!
//! Each route is registered with `utoipa_axum`'s `routes!`, which reads
//! its path and methods from the handler's `#[utoipa::path]`: a route
//! cannot be served without being documented, nor documented at a path it
//! is not served on. This document adds what is said of every route and
//! the security schemes; `/openapi.json` itself is the one route added by
//! hand (it serves the document the others make).

use axum::{body::Bytes, http::header::CONTENT_TYPE, routing::get, Router};
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use utoipa_axum::router::OpenApiRouter;

use crate::state::Shared;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Connected Apps",
        description = "Meters and bills the apps eyewear merchants embed in their shops. \
            Errors are `{\"error\": {\"code\", \"message\"}}` with the stable codes of each response; \
            every response carries `x-request-id`. On every route: bodies over 64 KiB get 413 `payload_too_large`; \
            a body declared as anything but JSON 415 `unsupported_media_type`; a request whose headers do not arrive \
            within `HTTP_HEADER_TIMEOUT_SECS` is cut off, and one whose body pauses longer than \
            `HTTP_BODY_TIMEOUT_SECS` or is not whole within `HTTP_REQUEST_TIMEOUT_SECS` gets 408 `request_timeout`; \
            unknown routes 404 `not_found`; a wrong method 405 `method_not_allowed`."
    ),
    paths(document),
    components(schemas(crate::error::FieldError)),
    modifiers(&Security)
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT (HS256) or embed key ak_live_…")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// The document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value)))]
#[allow(dead_code)] // Documentation only: `with_document` serves the route.
fn document() {}

/// `routes` with `GET /openapi.json` serving their document, serialised
/// once.
pub fn with_document(routes: OpenApiRouter<Shared>) -> Router<Shared> {
    let (router, document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes)
        .split_for_parts();
    let json = Bytes::from(document.to_json().expect("the document serialises"));
    router.route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(CONTENT_TYPE, "application/json")], json) }
        }),
    )
}
