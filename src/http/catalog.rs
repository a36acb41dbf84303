//! The apps catalog: `GET /api/v1/apps`.

use axum::{extract::State, middleware};
use serde::{Deserialize, Serialize};

use super::{auth::CustomerAuth, extract::Query, rate_limit};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::catalog::{CatalogApp, Filter},
    error::{ApiError, FieldError},
    state::Shared,
};

pub fn router(state: &Shared) -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(list_apps))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::apps,
        ))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CatalogQuery {
    /// e.g. `ai_vision`.
    category: Option<String>,
    /// `available`, `beta` (listed only with `ENABLE_BETA_APPS=true`) or
    /// `deprecated`; disabled apps are never listed.
    status: Option<String>,
    /// `starter`, `professional` or `enterprise`.
    pricing_tier: Option<String>,
    /// Name or description contains it (case-insensitive).
    q: Option<String>,
    /// From 1; default 1.
    page: Option<String>,
    /// 1 to 100; default 20.
    per_page: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AppListing {
    /// The app's public id, its slug (`vto-001`).
    id: String,
    name: String,
    description: Option<String>,
    category: String,
    token_cost: i32,
    status: String,
    features: serde_json::Value,
    configuration_schema: serde_json::Value,
    pricing_tier: String,
    documentation_url: Option<String>,
}

impl From<&CatalogApp> for AppListing {
    fn from(app: &CatalogApp) -> Self {
        let row = &app.row;
        AppListing {
            id: row.slug.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            category: row.category.clone(),
            token_cost: row.token_cost,
            status: row.status.clone(),
            features: row.features.clone(),
            configuration_schema: row.configuration_schema.clone(),
            pricing_tier: row.pricing_tier.clone(),
            documentation_url: row.documentation_url.clone(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Pagination {
    page: usize,
    per_page: usize,
    total: usize,
    total_pages: usize,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AppList {
    apps: Vec<AppListing>,
    pagination: Pagination,
}

#[utoipa::path(get, path = "/api/v1/apps", tag = "apps", params(CatalogQuery),
    responses((status = 200, description = "Apps by name; a page past the last is empty. With `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`", body = AppList),
              (status = 422, description = "`page` or `per_page` out of range", body = crate::error::ErrorBody),
              (status = 429, description = "`rate_limited`: over `RATE_LIMIT_APPS_PER_HOUR` (100 an hour, all of it at once if need be)", body = crate::error::ErrorBody,
                  headers(("Retry-After" = u64, description = "Seconds until a request is allowed again"),
                  ("RateLimit-Limit" = u32, description = "The burst: requests allowed at once"),
                  ("RateLimit-Remaining" = u32, description = "Requests allowed at once now: 0"),
                  ("RateLimit-Reset" = u64, description = "Seconds until the whole burst is allowed again")))),
    security(("bearer" = ["apps:read"])))]
pub async fn list_apps(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Query(query): Query<CatalogQuery>,
) -> Result<axum::Json<AppList>, ApiError> {
    auth.require(Scope::AppsRead)?;
    let mut problems = Vec::new();
    let page = bounded(
        "page",
        query.page.as_deref(),
        1,
        1,
        usize::MAX,
        &mut problems,
    );
    let per_page = bounded(
        "per_page",
        query.per_page.as_deref(),
        20,
        1,
        100,
        &mut problems,
    );
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let filter = Filter {
        category: query.category.as_deref(),
        status: query.status.as_deref(),
        pricing_tier: query.pricing_tier.as_deref(),
        q: query.q.as_deref().filter(|q| !q.is_empty()),
        include_beta: state.settings.enable_beta_apps,
    };
    let (apps, total) = state.catalog.list(&filter, page, per_page);
    Ok(axum::Json(AppList {
        apps: apps
            .iter()
            .map(|app| AppListing::from(app.as_ref()))
            .collect(),
        pagination: Pagination {
            page,
            per_page,
            total,
            total_pages: total.div_ceil(per_page),
        },
    }))
}

/// An integer query parameter within `min..=max`, or `default` when absent.
fn bounded(
    field: &str,
    value: Option<&str>,
    default: usize,
    min: usize,
    max: usize,
    problems: &mut Vec<FieldError>,
) -> usize {
    let Some(value) = value else {
        return default;
    };
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => n,
        _ => {
            let range = if max == usize::MAX {
                format!("an integer of at least {min}")
            } else {
                format!("an integer from {min} to {max}")
            };
            problems.push(FieldError::new(field, format!("must be {range}")));
            default
        }
    }
}
