//! Customers' app activations (`customer_apps`).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ActivationRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub app_id: Uuid,
    pub slug: String,
    pub app_name: String,
    pub status: String,
    pub configuration: serde_json::Value,
    pub embed_code: Option<String>,
    pub activated_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

const SELECT: &str =
    "SELECT ca.id, ca.customer_id, ca.app_id, a.slug, a.name AS app_name, ca.status, \
    ca.configuration, ca.embed_code, ca.activated_at, ca.last_used_at \
    FROM customer_apps ca JOIN apps a ON a.id = ca.app_id";

/// Activates (or re-activates) an app with its configuration. An existing
/// activation keeps its id; `activated_at` moves only when it was not active.
#[tracing::instrument(name = "postgres activations.activate", level = "debug", skip_all)]
pub async fn activate(
    conn: &mut PgConnection,
    customer: Uuid,
    app: Uuid,
    configuration: &serde_json::Value,
    embed_code: &str,
) -> sqlx::Result<ActivationRow> {
    sqlx::query(
        "INSERT INTO customer_apps (id, customer_id, app_id, status, configuration, embed_code, activated_at) \
         VALUES ($1, $2, $3, 'active', $4, $5, NOW()) \
         ON CONFLICT (customer_id, app_id) DO UPDATE SET status = 'active', \
           configuration = EXCLUDED.configuration, embed_code = EXCLUDED.embed_code, \
           activated_at = CASE WHEN customer_apps.status = 'active' THEN customer_apps.activated_at ELSE NOW() END",
    )
    .bind(Uuid::now_v7())
    .bind(customer)
    .bind(app)
    .bind(configuration)
    .bind(embed_code)
    .execute(&mut *conn)
    .await?;
    find(conn, customer, app)
        .await
        .map(|row| row.expect("row just written"))
}

#[tracing::instrument(name = "postgres activations.find", level = "debug", skip_all)]
pub async fn find(
    conn: &mut PgConnection,
    customer: Uuid,
    app: Uuid,
) -> sqlx::Result<Option<ActivationRow>> {
    sqlx::query_as(&format!(
        "{SELECT} WHERE ca.customer_id = $1 AND ca.app_id = $2"
    ))
    .bind(customer)
    .bind(app)
    .fetch_optional(conn)
    .await
}

#[tracing::instrument(name = "postgres activations.list", level = "debug", skip_all)]
pub async fn list(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<Vec<ActivationRow>> {
    sqlx::query_as(&format!(
        "{SELECT} WHERE ca.customer_id = $1 ORDER BY ca.activated_at DESC"
    ))
    .bind(customer)
    .fetch_all(conn)
    .await
}

/// Sets the activation's status (`active`, `paused`, `disabled`); `None`
/// when the customer never activated the app.
#[tracing::instrument(name = "postgres activations.set_status", level = "debug", skip_all)]
pub async fn set_status(
    conn: &mut PgConnection,
    customer: Uuid,
    app: Uuid,
    status: &str,
) -> sqlx::Result<Option<ActivationRow>> {
    let updated =
        sqlx::query("UPDATE customer_apps SET status = $3 WHERE customer_id = $1 AND app_id = $2")
            .bind(customer)
            .bind(app)
            .bind(status)
            .execute(&mut *conn)
            .await?;
    if updated.rows_affected() == 0 {
        return Ok(None);
    }
    find(conn, customer, app).await
}

/// Changes an active or paused activation: its status, its configuration
/// and embed code, or both. `None` when there is no such activation (or it
/// was deactivated).
#[tracing::instrument(name = "postgres activations.update", level = "debug", skip_all)]
pub async fn update(
    conn: &mut PgConnection,
    customer: Uuid,
    app: Uuid,
    status: Option<&str>,
    configuration: Option<(&serde_json::Value, &str)>,
) -> sqlx::Result<Option<ActivationRow>> {
    let updated = sqlx::query(
        "UPDATE customer_apps SET status = COALESCE($3, status), \
           configuration = COALESCE($4, configuration), embed_code = COALESCE($5, embed_code) \
         WHERE customer_id = $1 AND app_id = $2 AND status IN ('active', 'paused')",
    )
    .bind(customer)
    .bind(app)
    .bind(status)
    .bind(configuration.map(|(c, _)| c))
    .bind(configuration.map(|(_, code)| code))
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(None);
    }
    find(conn, customer, app).await
}
