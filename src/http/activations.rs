//! Activating apps: activate, configure, pause and resume, deactivate, and
//! list one's own activations.

use axum::{extract::State, middleware};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    auth::CustomerAuth,
    extract::{Body, PathParam},
    rate_limit,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::{
        catalog::{CatalogApp, Tier},
        configuration,
        embed::embed_code,
    },
    error::{decode_json, ApiError},
    hot::account::AccountChange,
    ledger::{activations, catalog},
    state::Shared,
};

pub fn router(state: &Shared) -> OpenApiRouter<Shared> {
    let activate =
        OpenApiRouter::new()
            .routes(routes!(activate))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                rate_limit::activate,
            ));
    OpenApiRouter::new()
        .merge(activate)
        .routes(routes!(list_activations))
        .routes(routes!(update))
        .routes(routes!(deactivate))
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateBody {
    #[serde(default)]
    configuration: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ActivatedApp {
    id: String,
    name: String,
    status: String,
    activated_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Activation {
    success: bool,
    activation_id: Uuid,
    app: ActivatedApp,
    configuration: serde_json::Value,
    embed_code: Option<String>,
}

impl From<activations::ActivationRow> for Activation {
    fn from(r: activations::ActivationRow) -> Self {
        Activation {
            success: true,
            activation_id: r.id,
            app: ActivatedApp {
                id: r.slug,
                name: r.app_name,
                status: r.status,
                activated_at: r.activated_at,
            },
            configuration: r.configuration,
            embed_code: r.embed_code,
        }
    }
}

#[utoipa::path(post, path = "/api/v1/customer/apps/{app_id}/activate", tag = "apps",
    params(("app_id" = String, Path, description = "e.g. `vto-001`")), request_body(content = Option<ActivateBody>, description = "Optional: without a body the app's default configuration is used"),
    responses((status = 200, body = Activation),
              (status = 403, description = "`plan_upgrade_required`", body = crate::error::ErrorBody),
              (status = 404, description = "Unknown app, or one not offered: disabled, or beta without `ENABLE_BETA_APPS`", body = crate::error::ErrorBody),
              (status = 422, description = "`configuration` does not fit the app's `configuration_schema`: one detail per field (unknown fields, wrong types, a `select` value not among its options); omitted fields take their defaults", body = crate::error::ErrorBody),
              (status = 429, description = "`rate_limited`: over `RATE_LIMIT_ACTIVATE_PER_HOUR` (10 an hour); nothing activated", body = crate::error::ErrorBody,
                  headers(("Retry-After" = u64, description = "Seconds until a request is allowed again"),
                  ("RateLimit-Limit" = u32, description = "The burst: requests allowed at once"),
                  ("RateLimit-Remaining" = u32, description = "Requests allowed at once now: 0"),
                  ("RateLimit-Reset" = u64, description = "Seconds until the whole burst is allowed again")))),
    security(("bearer" = ["apps:activate"])))]
pub async fn activate(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(app_id): PathParam<String>,
    Body(body): Body,
) -> Result<axum::Json<Activation>, ApiError> {
    let activated = activate_app(state, auth, app_id, body).await;
    // The activation success rate (`activations_total{outcome}`).
    let outcome = match &activated {
        Ok(_) => "activated",
        Err(e) if e.status().is_server_error() => "error",
        Err(
            ApiError::PlanUpgradeRequired(_)
            | ApiError::RateLimited(_)
            | ApiError::InsufficientScope(_),
        ) => "refused",
        Err(_) => "invalid",
    };
    metrics::counter!("activations_total", "outcome" => outcome).increment(1);
    activated
}

async fn activate_app(
    state: Shared,
    auth: CustomerAuth,
    app_id: String,
    body: axum::body::Bytes,
) -> Result<axum::Json<Activation>, ApiError> {
    auth.require(Scope::AppsActivate)?;
    let app = state
        .catalog
        .get(&app_id)
        .filter(|a| a.is_offered(state.settings.enable_beta_apps))
        .ok_or(ApiError::NotFound("app"))?;
    // No body (or JSON's `null`, as the document allows) activates with
    // the defaults.
    let body: ActivateBody = if body.trim_ascii().is_empty() || body.trim_ascii() == b"null" {
        ActivateBody::default()
    } else {
        decode_json(&body)?
    };
    let configuration = configuration::validate(
        &app.row.configuration_schema,
        &body.configuration.unwrap_or_default(),
    )
    .map_err(ApiError::Validation)?;
    let customer = auth.customer;
    let row = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                ensure_plan_opens(tx, customer, &app).await?;
                let code = app_embed_code(&app, customer, &configuration);
                let row =
                    activations::activate(tx, customer, app.row.id, &configuration, &code).await?;
                Ok((row, vec![AccountChange::ActivateApp(app.slug().to_owned())]))
            })
        })
        .await?;
    Ok(axum::Json(row.into()))
}

#[utoipa::path(post, path = "/api/v1/customer/apps/{app_id}/deactivate", tag = "apps",
    params(("app_id" = String, Path)),
    responses((status = 200, description = "Deactivated; consumes are refused at once", body = Activation),
              (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = ["apps:activate"])))]
pub async fn deactivate(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(app_id): PathParam<String>,
) -> Result<axum::Json<Activation>, ApiError> {
    auth.require(Scope::AppsActivate)?;
    let app = state
        .catalog
        .get(&app_id)
        .ok_or(ApiError::NotFound("app"))?;
    let customer = auth.customer;
    let row = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                let row = activations::set_status(tx, customer, app.row.id, "disabled")
                    .await?
                    .ok_or(ApiError::NotFound("activation"))?;
                Ok((
                    row,
                    vec![AccountChange::DeactivateApp(app.slug().to_owned())],
                ))
            })
        })
        .await?;
    Ok(axum::Json(row.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    /// The whole new configuration, checked against the app's schema;
    /// omitted settings take their defaults.
    #[serde(default)]
    configuration: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    status: Option<UpdateStatus>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStatus {
    /// Consumes are accepted again (the plan's tier is checked again).
    Active,
    /// Consumes are refused with 403 `app_not_active` from this response on.
    Paused,
}

#[utoipa::path(patch, path = "/api/v1/customer/apps/{app_id}", tag = "apps",
    params(("app_id" = String, Path)), request_body = UpdateBody,
    responses((status = 200, body = Activation),
              (status = 403, description = "`plan_upgrade_required` when resuming an app above the plan's tier", body = crate::error::ErrorBody),
              (status = 404, description = "No active or paused activation of this app", body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = ["apps:activate"])))]
pub async fn update(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(app_id): PathParam<String>,
    Body(body): Body,
) -> Result<axum::Json<Activation>, ApiError> {
    auth.require(Scope::AppsActivate)?;
    let app = state
        .catalog
        .get(&app_id)
        .ok_or(ApiError::NotFound("app"))?;
    let body: UpdateBody = decode_json(&body)?;
    if body.status == Some(UpdateStatus::Active) && !app.is_offered(state.settings.enable_beta_apps)
    {
        return Err(ApiError::NotFound("app"));
    }
    let configuration = body
        .configuration
        .map(|c| configuration::validate(&app.row.configuration_schema, &c))
        .transpose()
        .map_err(ApiError::Validation)?;
    let customer = auth.customer;
    let row = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                if body.status == Some(UpdateStatus::Active) {
                    ensure_plan_opens(tx, customer, &app).await?;
                }
                let code = configuration
                    .as_ref()
                    .map(|c| app_embed_code(&app, customer, c));
                let status = body.status.map(|s| match s {
                    UpdateStatus::Active => "active",
                    UpdateStatus::Paused => "paused",
                });
                let row = activations::update(
                    tx,
                    customer,
                    app.row.id,
                    status,
                    configuration.as_ref().zip(code.as_deref()),
                )
                .await?
                .ok_or(ApiError::NotFound("activation"))?;
                // The hot state follows the status the row now has, in the
                // same request: a pause refuses the very next consume.
                let change = if row.status == "active" {
                    AccountChange::ActivateApp(app.slug().to_owned())
                } else {
                    AccountChange::DeactivateApp(app.slug().to_owned())
                };
                Ok((row, vec![change]))
            })
        })
        .await?;
    Ok(axum::Json(row.into()))
}

/// 403 `plan_upgrade_required` unless the customer's plan (starter
/// without one) opens the app's tier.
async fn ensure_plan_opens(
    tx: &mut sqlx::PgConnection,
    customer: uuid::Uuid,
    app: &CatalogApp,
) -> Result<(), ApiError> {
    let tier = catalog::customer_plan_tier(tx, customer)
        .await?
        .as_deref()
        .and_then(Tier::parse)
        .unwrap_or(Tier::Starter);
    if app.tier > tier {
        return Err(ApiError::PlanUpgradeRequired(app.slug().to_owned()));
    }
    Ok(())
}

fn app_embed_code(
    app: &CatalogApp,
    customer: uuid::Uuid,
    configuration: &serde_json::Value,
) -> String {
    embed_code(
        app.row.embed_script_url.as_deref().unwrap_or(""),
        customer,
        app.slug(),
        configuration,
    )
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ActivationList {
    apps: Vec<Activation>,
}

#[utoipa::path(get, path = "/api/v1/customer/apps", tag = "apps",
    responses((status = 200, body = ActivationList)), security(("bearer" = ["apps:read"])))]
pub async fn list_activations(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<axum::Json<ActivationList>, ApiError> {
    auth.require(Scope::AppsRead)?;
    let mut conn = state.db.acquire().await?;
    let rows = activations::list(&mut conn, auth.customer).await?;
    Ok(axum::Json(ActivationList {
        apps: rows.into_iter().map(Activation::from).collect(),
    }))
}
