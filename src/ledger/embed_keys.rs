//! Embed API keys, stored as a SHA-256 of the key.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EmbedKeyRow {
    pub id: Uuid,
    pub customer_id: Uuid,
    pub name: Option<String>,
    pub key_prefix: String,
    pub app_permissions: Vec<String>,
    pub rate_limit: i32,
    pub allowed_origins: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, customer_id, name, key_prefix, app_permissions, rate_limit, allowed_origins, expires_at, revoked_at, created_at";

pub struct NewEmbedKey<'a> {
    pub customer_id: Uuid,
    pub name: Option<&'a str>,
    pub key_hash: &'a [u8; 32],
    pub key_prefix: &'a str,
    pub app_permissions: &'a [String],
    pub rate_limit: i32,
    pub allowed_origins: &'a [String],
    pub expires_at: Option<DateTime<Utc>>,
}

#[tracing::instrument(name = "postgres embed_keys.insert", level = "debug", skip_all)]
pub async fn insert(conn: &mut PgConnection, key: &NewEmbedKey<'_>) -> sqlx::Result<EmbedKeyRow> {
    sqlx::query_as(&format!(
        "INSERT INTO embed_api_keys (id, customer_id, name, key_hash, key_prefix, app_permissions, \
         rate_limit, allowed_origins, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(key.customer_id)
    .bind(key.name)
    .bind(&key.key_hash[..])
    .bind(key.key_prefix)
    .bind(key.app_permissions)
    .bind(key.rate_limit)
    .bind(key.allowed_origins)
    .bind(key.expires_at)
    .fetch_one(conn)
    .await
}

#[tracing::instrument(name = "postgres embed_keys.by_hash", level = "debug", skip_all)]
pub async fn by_hash(
    conn: &mut PgConnection,
    hash: &[u8; 32],
) -> sqlx::Result<Option<EmbedKeyRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM embed_api_keys WHERE key_hash = $1"
    ))
    .bind(&hash[..])
    .fetch_optional(conn)
    .await
}

#[tracing::instrument(name = "postgres embed_keys.list", level = "debug", skip_all)]
pub async fn list(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<Vec<EmbedKeyRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM embed_api_keys WHERE customer_id = $1 ORDER BY created_at DESC"
    ))
    .bind(customer)
    .fetch_all(conn)
    .await
}

/// Marks the key revoked. `None` when the customer has no such key;
/// revoking twice is not an error and keeps the first time.
#[tracing::instrument(name = "postgres embed_keys.revoke", level = "debug", skip_all)]
pub async fn revoke(
    conn: &mut PgConnection,
    customer: Uuid,
    key: Uuid,
) -> sqlx::Result<Option<EmbedKeyRow>> {
    sqlx::query_as(&format!(
        "UPDATE embed_api_keys SET revoked_at = COALESCE(revoked_at, NOW()) \
         WHERE id = $1 AND customer_id = $2 RETURNING {COLUMNS}"
    ))
    .bind(key)
    .bind(customer)
    .fetch_optional(conn)
    .await
}
