//! Operators manage the catalog: `POST /api/v1/admin/apps` and
//! `PATCH /api/v1/admin/apps/{app_id}` (status).

use axum::{extract::State, http::StatusCode};
use serde::Deserialize;

use super::{
    auth::AdminAuth,
    catalog::AppListing,
    extract::{Json, PathParam},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    domain::{catalog::Tier, configuration},
    error::{ApiError, FieldError},
    ledger::catalog::{self, NewApp},
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(create_app))
        .routes(routes!(change_app))
}

const STATUSES: [&str; 4] = ["available", "beta", "deprecated", "disabled"];

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAppBody {
    /// The public id: lowercase letters, digits and dashes, e.g. `vto-002`.
    id: String,
    name: String,
    description: Option<String>,
    category: String,
    token_cost: i32,
    /// Default `available`.
    status: Option<String>,
    /// In the specification's format (README); default `{}`.
    configuration_schema: Option<serde_json::Map<String, serde_json::Value>>,
    features: Option<Vec<String>>,
    documentation_url: Option<String>,
    icon_url: Option<String>,
    embed_script_url: Option<String>,
    /// Default `starter`.
    pricing_tier: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/admin/apps", tag = "admin", request_body = NewAppBody,
    responses((status = 201, body = AppListing),
              (status = 409, description = "the id is taken", body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_app(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Json(body): Json<NewAppBody>,
) -> Result<(StatusCode, axum::Json<AppListing>), ApiError> {
    let mut problems = Vec::new();
    let slug_ok = (1..=50).contains(&body.id.len())
        && body
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !slug_ok {
        problems.push(FieldError::new(
            "id",
            "must be 1 to 50 lowercase letters, digits or dashes",
        ));
    }
    if body.name.trim().is_empty() || body.name.chars().count() > 100 {
        problems.push(FieldError::new("name", "must be 1 to 100 characters"));
    }
    if body.category.trim().is_empty() || body.category.chars().count() > 50 {
        problems.push(FieldError::new("category", "must be 1 to 50 characters"));
    }
    if body.token_cost < 1 {
        problems.push(FieldError::new("token_cost", "must be at least 1"));
    }
    let status = body.status.as_deref().unwrap_or("available");
    if !STATUSES.contains(&status) {
        problems.push(FieldError::new(
            "status",
            format!("must be one of: {}", STATUSES.join(", ")),
        ));
    }
    let tier = body.pricing_tier.as_deref().unwrap_or("starter");
    if Tier::parse(tier).is_none() {
        problems.push(FieldError::new(
            "pricing_tier",
            "must be one of: starter, professional, enterprise",
        ));
    }
    let schema = serde_json::Value::Object(body.configuration_schema.unwrap_or_default());
    configuration::check_schema(&schema, "configuration_schema", &mut problems);
    for (field, url) in [
        ("documentation_url", &body.documentation_url),
        ("icon_url", &body.icon_url),
        ("embed_script_url", &body.embed_script_url),
    ] {
        if url.as_ref().is_some_and(|u| u.len() > 255) {
            problems.push(FieldError::new(field, "must be at most 255 characters"));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let features = serde_json::json!(body.features.unwrap_or_default());
    let mut conn = state.db.acquire().await?;
    let row = catalog::insert_app(
        &mut conn,
        &NewApp {
            slug: &body.id,
            name: body.name.trim(),
            description: body.description.as_deref(),
            category: body.category.trim(),
            token_cost: body.token_cost,
            status,
            configuration_schema: &schema,
            features: &features,
            documentation_url: body.documentation_url.as_deref(),
            icon_url: body.icon_url.as_deref(),
            embed_script_url: body.embed_script_url.as_deref(),
            pricing_tier: tier,
        },
    )
    .await?
    .ok_or_else(|| ApiError::Conflict(format!("an app with id `{}` exists", body.id)))?;
    if status == "disabled" {
        state.hot.set_app_disabled(&row.slug, true).await?;
    }
    state.catalog.refresh(&state.db).await?;
    let app = state
        .catalog
        .get(&row.slug)
        .ok_or(ApiError::NotFound("app"))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(AppListing::from(app.as_ref())),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AppChange {
    /// `available`, `beta`, `deprecated` or `disabled`. A disabled app
    /// refuses consumes at once, on every replica, and leaves the listing.
    status: String,
}

#[utoipa::path(patch, path = "/api/v1/admin/apps/{app_id}", tag = "admin",
    params(("app_id" = String, Path)), request_body = AppChange,
    responses((status = 200, body = AppListing),
              (status = 404, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn change_app(
    State(state): State<Shared>,
    _admin: AdminAuth,
    PathParam(app_id): PathParam<String>,
    Json(body): Json<AppChange>,
) -> Result<axum::Json<AppListing>, ApiError> {
    if !STATUSES.contains(&body.status.as_str()) {
        return Err(ApiError::Validation(vec![FieldError::new(
            "status",
            format!("must be one of: {}", STATUSES.join(", ")),
        )]));
    }
    let mut conn = state.db.acquire().await?;
    let row = catalog::set_app_status(&mut conn, &app_id, &body.status)
        .await?
        .ok_or(ApiError::NotFound("app"))?;
    // After the commit: a replica that rebuilds its catalog in between
    // reads the new status from Postgres; the script's set follows here.
    state
        .hot
        .set_app_disabled(&row.slug, row.status == "disabled")
        .await?;
    state.catalog.refresh(&state.db).await?;
    let app = state
        .catalog
        .get(&row.slug)
        .ok_or(ApiError::NotFound("app"))?;
    Ok(axum::Json(AppListing::from(app.as_ref())))
}
