//! Billing: plans, card collection, subscribing, the subscription, and
//! buying pay-as-you-go tokens. Every route counts against the customer's
//! billing rate limit (`RATE_LIMIT_BILLING_PER_HOUR`).

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode},
    middleware, Json,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    auth::CustomerAuth,
    extract::{idempotency_key, Body, Query},
    rate_limit,
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    auth::Scope,
    domain::subscriptions::PURCHASE_TOKENS,
    error::{decode_json, ApiError, FieldError},
    ledger::{billing::SubscriptionRow, catalog},
    state::Shared,
};

pub fn router(state: &Shared) -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(plans))
        .routes(routes!(setup_intent))
        .routes(routes!(subscribe))
        .routes(routes!(subscription, change_plan, cancel))
        .routes(routes!(purchase))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::billing,
        ))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Plan {
    id: String,
    name: String,
    description: Option<String>,
    /// -1 = unlimited.
    tokens_per_month: i32,
    price_cents: i32,
    billing_cycle: String,
    #[schema(value_type = Vec<String>)]
    features: serde_json::Value,
    stripe_price_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PlanList {
    plans: Vec<Plan>,
}

#[utoipa::path(get, path = "/api/v1/customer/billing/plans", tag = "billing",
    responses((status = 200, body = PlanList)), security(("bearer" = [])))]
pub async fn plans(
    State(state): State<Shared>,
    _auth: CustomerAuth,
) -> Result<Json<PlanList>, ApiError> {
    let rows = catalog::plans(&mut *state.db.acquire().await?).await?;
    Ok(Json(PlanList {
        plans: rows
            .into_iter()
            .map(|p| Plan {
                id: p.id,
                name: p.name,
                description: p.description,
                tokens_per_month: p.tokens_per_month,
                price_cents: p.price_cents,
                billing_cycle: p.billing_cycle,
                features: p.features,
                stripe_price_id: p.stripe_price_id,
            })
            .collect(),
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SetupIntent {
    /// For `stripe.confirmCardSetup` in Stripe.js.
    client_secret: String,
    publishable_key: String,
}

#[utoipa::path(post, path = "/api/v1/customer/billing/setup-intent", tag = "billing",
    responses((status = 200, body = SetupIntent),
              (status = 503, description = "Stripe unreachable", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn setup_intent(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<SetupIntent>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let client_secret = state.subscriptions.setup_intent(auth.customer).await?;
    Ok(Json(SetupIntent {
        client_secret,
        publishable_key: state.settings.stripe.publishable_key.clone(),
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscribeBody {
    plan_id: String,
    /// From Stripe.js, after the SetupIntent (`pm_…`).
    payment_method_id: String,
}

/// The subscription, as the ledger holds it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Subscription {
    plan_id: String,
    /// A downgrade that takes effect at `current_period_end`.
    pending_plan_id: Option<String>,
    /// `active`, `past_due`, `canceled` or `unpaid`.
    status: String,
    current_period_start: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    cancel_at_period_end: bool,
    stripe_subscription_id: Option<String>,
}

impl From<SubscriptionRow> for Subscription {
    fn from(r: SubscriptionRow) -> Self {
        Self {
            plan_id: r.plan_id,
            pending_plan_id: r.pending_plan_id,
            status: r.status,
            current_period_start: r.start,
            current_period_end: r.end,
            cancel_at_period_end: r.cancel_at_period_end,
            stripe_subscription_id: r.stripe_subscription_id,
        }
    }
}

fn payment_method_problem(id: &str) -> Option<FieldError> {
    let valid = id.starts_with("pm_")
        && id.len() <= 255
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (!valid).then(|| {
        FieldError::new(
            "payment_method_id",
            "must be a Stripe payment method id (pm_…)",
        )
    })
}

fn payment_method(id: &str) -> Result<(), ApiError> {
    match payment_method_problem(id) {
        Some(problem) => Err(ApiError::Validation(vec![problem])),
        None => Ok(()),
    }
}

#[utoipa::path(post, path = "/api/v1/customer/billing/subscribe", tag = "billing",
    request_body = SubscribeBody,
    responses((status = 201, description = "Subscribed; the plan's allowance is open at once. Also the answer when Stripe already holds a live subscription to this plan that our books did not show (an earlier attempt whose reply was lost): it is adopted, never doubled", body = Subscription),
              (status = 404, description = "Unknown plan", body = crate::error::ErrorBody),
              (status = 409, description = "Already subscribed; a subscription to another plan was found live at Stripe (adopted: change the plan instead); or another billing change of this customer is under way", body = crate::error::ErrorBody),
              (status = 422, description = "Bad `plan_id` or `payment_method_id`, or the card was refused", body = crate::error::ErrorBody),
              (status = 503, description = "Stripe unreachable, and what it did could not be read back; retry (a subscription Stripe made is adopted then)", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn subscribe(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Body(body): Body,
) -> Result<(StatusCode, Json<Subscription>), ApiError> {
    auth.require(Scope::BillingManage)?;
    let body: SubscribeBody = decode_json(&body)?;
    payment_method(&body.payment_method_id)?;
    let row = state
        .subscriptions
        .subscribe(auth.customer, &body.plan_id, &body.payment_method_id)
        .await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

#[utoipa::path(get, path = "/api/v1/customer/billing/subscription", tag = "billing",
    responses((status = 200, body = Subscription),
              (status = 404, description = "No subscription", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn subscription(
    State(state): State<Shared>,
    auth: CustomerAuth,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let row = crate::ledger::billing::subscription(&mut *state.db.acquire().await?, auth.customer)
        .await?
        .ok_or(ApiError::NotFound("subscription"))?;
    Ok(Json(row.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlan {
    plan_id: String,
}

#[utoipa::path(patch, path = "/api/v1/customer/billing/subscription", tag = "billing",
    request_body = ChangePlan,
    responses((status = 200, description = "An upgrade is invoiced at once, prorated, and takes effect when that invoice is paid (at once with a card that pays: the new allowance less this period's usage); a downgrade at the period's end (`pending_plan_id`)", body = Subscription),
              (status = 402, description = "`payment_failed`: the upgrade's invoice was not paid (the card's decline in `message`, or `client_secret` when the customer must confirm with 3-D Secure); the plan is unchanged, and Stripe applies the upgrade if the invoice is paid later", body = crate::error::ErrorBody),
              (status = 404, description = "No Stripe subscription, or no such plan", body = crate::error::ErrorBody),
              (status = 409, description = "Another billing change of this customer is under way", body = crate::error::ErrorBody),
              (status = 503, description = "Stripe unreachable, and what it did could not be read back; nothing changed here", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn change_plan(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Body(body): Body,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let body: ChangePlan = decode_json(&body)?;
    let row = state
        .subscriptions
        .change_plan(auth.customer, &body.plan_id)
        .await?;
    Ok(Json(row.into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct CancelQuery {
    /// `true`: end the subscription now; otherwise at the period's end.
    #[serde(default)]
    immediately: bool,
}

#[utoipa::path(delete, path = "/api/v1/customer/billing/subscription", tag = "billing",
    params(CancelQuery),
    responses((status = 200, description = "`cancel_at_period_end: true`, or `status: canceled` when immediately", body = Subscription),
              (status = 404, description = "No Stripe subscription", body = crate::error::ErrorBody),
              (status = 409, description = "Another billing change of this customer is under way", body = crate::error::ErrorBody),
              (status = 503, description = "Stripe unreachable, and what it did could not be read back; retry", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn cancel(
    State(state): State<Shared>,
    auth: CustomerAuth,
    Query(query): Query<CancelQuery>,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let row = state
        .subscriptions
        .cancel(auth.customer, query.immediately)
        .await?;
    Ok(Json(row.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    /// 100 to 1,000,000.
    tokens: i32,
    payment_method_id: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PurchaseAnswer {
    purchase_id: Uuid,
    payment_intent_id: String,
    /// Stripe's: `succeeded` (credited), `requires_action` (confirm with
    /// `client_secret` in Stripe.js; credited when Stripe confirms), …
    status: String,
    tokens: i32,
    price_cents: i32,
    credited: bool,
    client_secret: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/customer/billing/tokens/purchase", tag = "billing",
    request_body = PurchaseBody,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retry with the same key is the same purchase, charged once, however late")),
    responses((status = 200, body = PurchaseAnswer),
              (status = 409, description = "The Idempotency-Key was used for a purchase of other `tokens`", body = crate::error::ErrorBody),
              (status = 422, description = "Bad `tokens` or `payment_method_id`, or the card was refused", body = crate::error::ErrorBody),
              (status = 503, description = "Stripe unreachable", body = crate::error::ErrorBody)),
    security(("bearer" = ["billing:manage"])))]
pub async fn purchase(
    State(state): State<Shared>,
    auth: CustomerAuth,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<PurchaseAnswer>, ApiError> {
    auth.require(Scope::BillingManage)?;
    let body: PurchaseBody = decode_json(&body)?;
    let mut problems: Vec<FieldError> = payment_method_problem(&body.payment_method_id)
        .into_iter()
        .collect();
    if !PURCHASE_TOKENS.contains(&body.tokens) {
        problems.push(FieldError::new("tokens", "must be 100 to 1000000"));
    }
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    let purchase_id = match idempotency_key(&headers)? {
        Some(key) => Uuid::new_v5(&auth.customer, key.as_bytes()),
        None => Uuid::now_v7(),
    };
    let done = state
        .subscriptions
        .purchase(
            auth.customer,
            purchase_id,
            body.tokens,
            &body.payment_method_id,
        )
        .await?;
    Ok(Json(PurchaseAnswer {
        purchase_id: done.id,
        payment_intent_id: done.payment.id,
        status: done.payment.status,
        tokens: done.tokens,
        price_cents: done.price_cents,
        credited: done.credited,
        client_secret: done.payment.client_secret,
    }))
}
