//! Embed API keys: create (the plaintext shown once), list, revoke.

use axum::{extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    auth::CustomerAuth,
    extract::{Json, PathParam},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::{embed_key, Scope},
    error::{ApiError, FieldError},
    hot::account::AccountChange,
    ledger::embed_keys::{self, EmbedKeyRow, NewEmbedKey},
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
}

/// A billion an hour (277,000 a second): more than any shop's widget
/// sends, so a key's limit never stands in the way of a real integration
/// or a load test, and still a limit.
const MAX_RATE_LIMIT: i32 = 1_000_000_000;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    name: Option<String>,
    /// App ids (e.g. `vto-001`) the key may charge; at least one.
    app_permissions: Vec<String>,
    /// Requests per hour, 1 to 1,000,000,000 (default 1000); the key may
    /// send 36 seconds of this rate at once (at least 1).
    rate_limit: Option<i32>,
    /// Must be in the future; omitted = never.
    expires_at: Option<DateTime<Utc>>,
    /// Browser origins (`https://shop.example`) allowed to use the key;
    /// empty = any.
    #[serde(default)]
    allowed_origins: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyView {
    id: Uuid,
    name: Option<String>,
    /// The key's first characters, to tell keys apart.
    key_prefix: String,
    app_permissions: Vec<String>,
    rate_limit: i32,
    allowed_origins: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

impl From<EmbedKeyRow> for KeyView {
    fn from(r: EmbedKeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            key_prefix: r.key_prefix,
            app_permissions: r.app_permissions,
            rate_limit: r.rate_limit,
            allowed_origins: r.allowed_origins,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            created_at: r.created_at,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyCreated {
    /// The key itself. Shown this once; only its hash is stored.
    key: String,
    #[serde(flatten)]
    view: KeyView,
}

#[utoipa::path(post, path = "/api/v1/customer/api-keys", tag = "api-keys", request_body = NewKey,
    responses((status = 201, body = KeyCreated), (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = ["apps:activate"])))]
pub async fn create_key(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Json(body): Json<NewKey>,
) -> Result<(StatusCode, axum::Json<KeyCreated>), ApiError> {
    auth.require(Scope::AppsActivate)?;
    let now = Utc::now();
    let mut problems = Vec::new();
    if body.app_permissions.is_empty() || body.app_permissions.len() > 100 {
        problems.push(FieldError::new(
            "app_permissions",
            "must list 1 to 100 app ids",
        ));
    }
    for (i, app) in body.app_permissions.iter().enumerate() {
        if state.catalog.get(app).is_none() {
            problems.push(FieldError::new(
                format!("app_permissions[{i}]"),
                format!("unknown app `{app}`"),
            ));
        }
    }
    let rate_limit = body.rate_limit.unwrap_or(1000);
    if !(1..=MAX_RATE_LIMIT).contains(&rate_limit) {
        problems.push(FieldError::new(
            "rate_limit",
            "must be 1 to 1000000000 requests per hour",
        ));
    }
    if body.expires_at.is_some_and(|e| e <= now) {
        problems.push(FieldError::new("expires_at", "must be in the future"));
    }
    if body.name.as_ref().is_some_and(|n| n.chars().count() > 100) {
        problems.push(FieldError::new("name", "must be at most 100 characters"));
    }
    for (i, origin) in body.allowed_origins.iter().enumerate() {
        if !is_origin(origin) {
            problems.push(FieldError::new(
                format!("allowed_origins[{i}]"),
                "must be an origin such as https://shop.example",
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }

    let mut permissions = body.app_permissions.clone();
    permissions.sort();
    permissions.dedup();
    let generated = embed_key::generate(state.settings.production);
    let customer = auth.customer;
    let row = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                let row = embed_keys::insert(
                    tx,
                    &NewEmbedKey {
                        customer_id: customer,
                        name: body.name.as_deref(),
                        key_hash: &generated.hash,
                        key_prefix: &generated.display_prefix,
                        app_permissions: &permissions,
                        rate_limit,
                        allowed_origins: &body.allowed_origins,
                        expires_at: body.expires_at,
                    },
                )
                .await?;
                let change = AccountChange::AddEmbedKey {
                    id: row.id,
                    expires_at_ms: row.expires_at.map_or(0, |t| t.timestamp_millis()),
                };
                Ok(((row, generated.plaintext), vec![change]))
            })
        })
        .await?;
    let (row, plaintext) = row;
    Ok((
        StatusCode::CREATED,
        axum::Json(KeyCreated {
            key: plaintext,
            view: row.into(),
        }),
    ))
}

fn is_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "https" | "http")
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' ', '@'])
        && origin.len() <= 255
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyList {
    api_keys: Vec<KeyView>,
}

#[utoipa::path(get, path = "/api/v1/customer/api-keys", tag = "api-keys",
    responses((status = 200, body = KeyList)), security(("bearer" = ["apps:activate"])))]
pub async fn list_keys(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<axum::Json<KeyList>, ApiError> {
    auth.require(Scope::AppsActivate)?;
    let mut conn = state.db.acquire().await?;
    let rows = embed_keys::list(&mut conn, auth.customer).await?;
    Ok(axum::Json(KeyList {
        api_keys: rows.into_iter().map(KeyView::from).collect(),
    }))
}

#[utoipa::path(delete, path = "/api/v1/customer/api-keys/{key_id}", tag = "api-keys",
    params(("key_id" = Uuid, Path)),
    responses((status = 200, description = "Revoked; consumes with it are refused at once", body = KeyView),
              (status = 404, body = crate::error::ErrorBody)),
    security(("bearer" = ["apps:activate"])))]
pub async fn revoke_key(
    State(state): State<Shared>,
    auth: CustomerAuth,
    PathParam(key_id): PathParam<Uuid>,
) -> Result<axum::Json<KeyView>, ApiError> {
    auth.require(Scope::AppsActivate)?;
    let customer = auth.customer;
    let row = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                let row = embed_keys::revoke(tx, customer, key_id)
                    .await?
                    .ok_or(ApiError::NotFound("key"))?;
                Ok((row, vec![AccountChange::RemoveEmbedKey(key_id)]))
            })
        })
        .await?;
    Ok(axum::Json(row.into()))
}
