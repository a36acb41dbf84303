//! `GET /openapi.json`: the contract as the service implements it.

use axum::{routing::get, Json, Router};
use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

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
    paths(
        super::consume::consume,
        super::catalog::list_apps,
        super::activations::activate,
        super::activations::deactivate,
        super::activations::update,
        super::activations::list_activations,
        super::api_keys::create_key,
        super::api_keys::list_keys,
        super::api_keys::revoke_key,
        super::admin::create_customer,
        super::admin::grant_tokens,
        super::admin::reconcile_billing,
        super::admin_apps::create_app,
        super::admin_apps::change_app,
        super::usage::usage,
        super::alerts::settings,
        super::alerts::update,
        super::alerts::events,
        super::webhooks::stripe,
        super::billing::plans,
        super::billing::setup_intent,
        super::billing::subscribe,
        super::billing::subscription,
        super::billing::change_plan,
        super::billing::cancel,
        super::billing::purchase,
    ),
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

pub fn router() -> Router<Shared> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
