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
    openapi::{
        security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
        ContentBuilder, Ref, RefOr, Response, ResponseBuilder,
    },
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

/// The answers the layers and extractors give on any route of a kind,
/// added to each operation that does not document its own: 401 and 403
/// where credentials are required, 400, 408, 413, 415 and 422 where a
/// body is read (422 also where a query is), 503 on every `/api/` route (Redis or Postgres down; nothing
/// charged), 429 where a route group's limiter stands.
struct CommonAnswers;

impl Modify for CommonAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let mut answers = Vec::new();
                if operation.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    answers.push(("401", "`unauthorized`: no credential, or one that is expired, malformed or revoked"));
                    answers.push(("403", "`forbidden`: the credential lacks the scope (or is an embed key where a token is required)"));
                }
                let has_query =
                    operation.parameters.iter().flatten().any(|p| {
                        matches!(p.parameter_in, utoipa::openapi::path::ParameterIn::Query)
                    });
                if operation.request_body.is_some() || has_query {
                    answers.push(("422", "`validation_failed`, with `details` naming each field (or query parameter) and what is wrong with it"));
                }
                if operation.request_body.is_some() {
                    answers.push(("400", "`invalid_json` (not JSON) or `invalid_request`"));
                    answers.push(("408", "`request_timeout`: the body did not arrive in time"));
                    answers.push(("413", "`payload_too_large`"));
                    answers.push((
                        "415",
                        "`unsupported_media_type`: a body declared as anything but JSON",
                    ));
                }
                if path.starts_with("/api/") {
                    answers.push(("503", "`unavailable`: a dependency is down; nothing was charged or changed, retry later"));
                }
                if path.starts_with("/api/v1/customer/billing/") || path == "/api/v1/apps" {
                    answers.push(("429", "`rate_limited`, with `Retry-After`"));
                }
                for (status, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error_answer(description));
                }
            }
        }
    }
}

fn error_answer(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// The document of every route.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = serde_json::Value)))]
#[allow(dead_code)] // Documentation only: `with_document` serves the route.
fn document() {}

/// `routes` with `GET /openapi.json` serving their document, serialised
/// once.
pub fn with_document(routes: OpenApiRouter<Shared>) -> Router<Shared> {
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes)
        .split_for_parts();
    // After the merge: the routes bring the operations.
    CommonAnswers.modify(&mut document);
    let json = Bytes::from(document.to_json().expect("the document serialises"));
    router.route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(CONTENT_TYPE, "application/json")], json) }
        }),
    )
}
