//! Operator bootstrap: customers and grants, so a fresh install is usable
//! without Stripe.

use axum::{
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    auth::AdminAuth,
    extract::{idempotency_key, Json, PathParam},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    error::{ApiError, FieldError},
    hot::account::{AccountChange, Once},
    ledger::{catalog, customers},
    state::Shared,
};

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(create_customer))
        .routes(routes!(grant_tokens))
        .routes(routes!(reconcile_billing))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCustomer {
    /// 1 to 200 characters (trimmed).
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    /// Stored in lower case; unique.
    #[schema(format = Email, max_length = 320)]
    email: String,
    /// Subscribe without Stripe (invoiced by hand) to this plan.
    plan_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CustomerCreated {
    id: Uuid,
    name: String,
    email: String,
    plan_id: Option<String>,
    /// The first billing period, when subscribed.
    period_start: Option<DateTime<Utc>>,
    period_end: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/api/v1/admin/customers", tag = "admin", request_body = NewCustomer,
    responses((status = 201, body = CustomerCreated),
              (status = 404, description = "unknown plan", body = crate::error::ErrorBody),
              (status = 409, description = "email already registered", body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_customer(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Json(body): Json<NewCustomer>,
) -> Result<(StatusCode, axum::Json<CustomerCreated>), ApiError> {
    let mut problems = Vec::new();
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        problems.push(FieldError::new("name", "must be 1 to 200 characters"));
    }
    let email = body.email.trim().to_ascii_lowercase();
    if email.len() > 320
        || !email
            .split_once('@')
            .is_some_and(|(a, d)| !a.is_empty() && d.contains('.'))
    {
        problems.push(FieldError::new("email", "must be an email address"));
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }

    let mut tx = state.db.begin().await?;
    if let Some(plan) = &body.plan_id {
        catalog::plan(&mut tx, plan)
            .await?
            .ok_or(ApiError::NotFound("plan"))?;
    }
    let customer = customers::insert(&mut tx, name, &email)
        .await?
        .ok_or_else(|| ApiError::Conflict("a customer with this email exists".into()))?;
    let period = match &body.plan_id {
        Some(plan) => {
            let start = Utc::now();
            let end = state.settings.consume.billing_period.after(start, start);
            customers::subscribe_manually(&mut tx, customer.id, plan, start, end).await?;
            Some((start, end))
        }
        None => None,
    };
    tx.commit().await?;
    tracing::info!(customer = %customer.id, plan = ?body.plan_id, "customer created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CustomerCreated {
            id: customer.id,
            name: customer.name,
            email: customer.email,
            plan_id: body.plan_id,
            period_start: period.map(|p| p.0),
            period_end: period.map(|p| p.1),
            created_at: customer.created_at,
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    /// 1 to 100,000,000 tokens, added to the purchased balance (they do not expire).
    #[schema(minimum = 1, maximum = 100_000_000)]
    tokens: i64,
    /// 1 to 500 characters (trimmed).
    #[schema(min_length = 1, max_length = 500)]
    reason: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct GrantCreated {
    id: Uuid,
    customer_id: Uuid,
    tokens: i64,
    reason: String,
}

#[utoipa::path(post, path = "/api/v1/admin/customers/{id}/grants", tag = "admin", request_body = NewGrant,
    params(("id" = Uuid, Path),
           ("Idempotency-Key" = Option<String>, Header,
            description = "At most 255 characters. A retry with the same key and body returns the first grant (with `Idempotent-Replayed: true`) and credits nothing; the same key with another body is a 409. Kept as long as the grant.")),
    responses((status = 201, body = GrantCreated), (status = 404, body = crate::error::ErrorBody),
              (status = 409, description = "`conflict`: the Idempotency-Key was used for another grant", body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn grant_tokens(
    State(state): State<Shared>,
    admin: AdminAuth,
    PathParam(customer): PathParam<Uuid>,
    headers: HeaderMap,
    Json(body): Json<NewGrant>,
) -> Result<Response, ApiError> {
    let mut problems = Vec::new();
    if !(1..=100_000_000).contains(&body.tokens) {
        problems.push(FieldError::new(
            "tokens",
            "must be an integer from 1 to 100000000",
        ));
    }
    let reason = body.reason.trim().to_owned();
    if reason.is_empty() || reason.chars().count() > 500 {
        problems.push(FieldError::new("reason", "must be 1 to 500 characters"));
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    // A keyed grant's id is derived from the key, so a retry names the
    // same grant: the ledger records it once and the credit's marker
    // (`Once::grant`) gates Redis.
    let id = match idempotency_key(&headers)? {
        Some(key) => Uuid::new_v5(&customer, format!("grant:{key}").as_bytes()),
        None => Uuid::now_v7(),
    };
    let tokens = body.tokens as i32;
    let operator = admin.operator.to_string();
    let reason_for_tx = reason.clone();
    let granted = state
        .accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                let granted =
                    customers::grant(tx, id, customer, tokens, &reason_for_tx, &operator).await?;
                let changes = match &granted {
                    customers::Granted::New(_) => vec![AccountChange::CreditPurchased {
                        tokens: i64::from(tokens),
                        once: Once::grant(id),
                    }],
                    customers::Granted::Before(_) => Vec::new(),
                };
                Ok((granted, changes))
            })
        })
        .await?;
    let (row, replayed) = match granted {
        customers::Granted::New(row) => {
            tracing::info!(%customer, tokens, "tokens granted");
            (row, false)
        }
        customers::Granted::Before(row) if row.tokens == tokens && row.reason == reason => {
            (row, true)
        }
        customers::Granted::Before(_) => {
            return Err(ApiError::Conflict(
                "this Idempotency-Key was used for another grant".into(),
            ))
        }
    };
    let mut response = (
        StatusCode::CREATED,
        axum::Json(GrantCreated {
            id: row.id,
            customer_id: customer,
            tokens: i64::from(row.tokens),
            reason: row.reason,
        }),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[utoipa::path(post, path = "/api/v1/admin/billing/reconcile", tag = "admin",
    responses((status = 200, description = "Every Stripe-billed customer compared with Stripe; what differed set right (as the daily job does). `ran: false` when another replica was reconciling", body = crate::domain::reconcile::Report),
              (status = 503, description = "Stripe or Postgres unavailable", body = crate::error::ErrorBody)),
    security(("bearer" = [])))]
pub async fn reconcile_billing(
    State(state): State<Shared>,
    _admin: AdminAuth,
) -> Result<axum::Json<crate::domain::reconcile::Report>, ApiError> {
    Ok(axum::Json(state.subscriptions.reconcile().await?))
}
