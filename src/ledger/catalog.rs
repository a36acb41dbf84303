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

#[tracing::instrument(name = "postgres catalog.all_apps", level = "debug", skip_all)]
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

#[tracing::instrument(name = "postgres catalog.plan", level = "debug", skip_all)]
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
#[tracing::instrument(
    name = "postgres catalog.customer_plan_tier",
    level = "debug",
    skip_all
)]
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

/// A new app for the catalog; `None` when the slug is taken.
pub struct NewApp<'a> {
    pub slug: &'a str,
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub category: &'a str,
    pub token_cost: i32,
    pub status: &'a str,
    pub configuration_schema: &'a serde_json::Value,
    pub features: &'a serde_json::Value,
    pub documentation_url: Option<&'a str>,
    pub icon_url: Option<&'a str>,
    pub embed_script_url: Option<&'a str>,
    pub pricing_tier: &'a str,
}

#[tracing::instrument(name = "postgres catalog.insert_app", level = "debug", skip_all)]
pub async fn insert_app(conn: &mut PgConnection, app: &NewApp<'_>) -> sqlx::Result<Option<AppRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO apps (id, slug, name, description, category, token_cost, status, configuration_schema, \
           features, documentation_url, icon_url, embed_script_url, pricing_tier) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (slug) DO NOTHING RETURNING {APP_COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(app.slug)
    .bind(app.name)
    .bind(app.description)
    .bind(app.category)
    .bind(app.token_cost)
    .bind(app.status)
    .bind(app.configuration_schema)
    .bind(app.features)
    .bind(app.documentation_url)
    .bind(app.icon_url)
    .bind(app.embed_script_url)
    .bind(app.pricing_tier)
    .fetch_optional(conn)
    .await
}

/// Sets an app's status; `None` for an unknown slug.
#[tracing::instrument(name = "postgres catalog.set_app_status", level = "debug", skip_all)]
pub async fn set_app_status(
    conn: &mut PgConnection,
    slug: &str,
    status: &str,
) -> sqlx::Result<Option<AppRow>> {
    sqlx::query_as(&format!(
        "UPDATE apps SET status = $2, updated_at = NOW() WHERE slug = $1 RETURNING {APP_COLUMNS}"
    ))
    .bind(slug)
    .bind(status)
    .fetch_optional(conn)
    .await
}

/// Every plan on offer, cheapest first.
#[tracing::instrument(name = "postgres catalog.plans", level = "debug", skip_all)]
pub async fn plans(conn: &mut PgConnection) -> sqlx::Result<Vec<PlanRow>> {
    sqlx::query_as(
        "SELECT id, name, description, tokens_per_month, price_cents, billing_cycle, \
         stripe_price_id, features, tier FROM billing_plans WHERE is_active ORDER BY price_cents, id",
    )
    .fetch_all(conn)
    .await
}
