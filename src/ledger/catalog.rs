//! The apps catalog and the billing plans.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppRow {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub description: Option<String>,
    pub category: String,
    pub token_cost: i32,
    pub status: String,
    pub configuration_schema: serde_json::Value,
    pub features: serde_json::Value,
    pub documentation_url: Option<String>,
    pub icon_url: Option<String>,
    pub embed_script_url: Option<String>,
    pub pricing_tier: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const APP_COLUMNS: &str = "id, name, slug, description, category, token_cost, status, \
    configuration_schema, features, documentation_url, icon_url, embed_script_url, pricing_tier, \
    created_at, updated_at";

pub async fn all_apps(pool: &PgPool) -> sqlx::Result<Vec<AppRow>> {
    sqlx::query_as(&format!("SELECT {APP_COLUMNS} FROM apps ORDER BY name"))
        .fetch_all(pool)
        .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PlanRow {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub tokens_per_month: i32,
    pub price_cents: i32,
    pub billing_cycle: String,
    pub stripe_price_id: Option<String>,
    pub features: serde_json::Value,
    pub tier: String,
}

pub async fn plan(conn: &mut PgConnection, id: &str) -> sqlx::Result<Option<PlanRow>> {
    sqlx::query_as(
        "SELECT id, name, description, tokens_per_month, price_cents, billing_cycle, \
         stripe_price_id, features, tier FROM billing_plans WHERE id = $1 AND is_active",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// The tier of the customer's current plan; `None` without a subscription.
pub async fn customer_plan_tier(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT p.tier FROM customer_billing b JOIN billing_plans p ON p.id = b.plan_id WHERE b.customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}
