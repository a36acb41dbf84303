//! The ledger: Postgres, the durable record of customers, the catalog,
//! activations, keys, billing and every usage row.
//!
//! Queries are plain functions that take a connection (or a transaction);
//! the caller owns the transaction, so a multi-statement change commits or
//! rolls back as one.

pub mod accounts;
pub mod activations;
pub mod alerts;
pub mod billing;
pub mod catalog;
pub mod customers;
pub mod embed_keys;
pub mod leases;
pub mod partitions;
pub mod reports;
pub mod sealed;
pub mod usage;

use std::{str::FromStr, time::Duration};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    ConnectOptions, Connection, PgPool,
};

use crate::config::DatabaseSettings;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connect options from `DATABASE_URL`; its `sslmode` (`require`,
/// `verify-full`, …) decides TLS.
pub fn connect_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("connected-apps")
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500)))
}

/// A lazily connecting pool: the service starts even while Postgres is
/// restarting, and `/health/ready` reports it.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(connect_options(settings.url.expose())?))
}

/// Applies the migrations (which seed the catalog and plans) and makes
/// sure the usage partitions exist.
#[tracing::instrument(name = "postgres ledger.migrate", level = "debug", skip_all)]
pub async fn migrate(pool: &PgPool, months_ahead: u32) -> anyhow::Result<()> {
    // A database in another encoding (SQL_ASCII, the default of a cluster
    // made without a locale) refuses every character beyond ASCII in a
    // jsonb: metadata a consume accepted would not be storable.
    let encoding: String = sqlx::query_scalar("SHOW server_encoding")
        .fetch_one(pool)
        .await?;
    if encoding != "UTF8" {
        anyhow::bail!(
            "the database's encoding is {encoding}; the ledger needs UTF8 \
             (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)"
        );
    }
    MIGRATOR.run(pool).await?;
    partitions::ensure_months_ahead(pool, chrono::Utc::now(), months_ahead).await?;
    Ok(())
}

/// Creates the database named in `url` when it does not exist, connecting
/// to the server's `postgres` database to do it. In UTF8 whatever the
/// cluster's default (see [`migrate`]), from `template0`, which any
/// encoding may be made from.
#[tracing::instrument(
    name = "postgres ledger.create_database_if_missing",
    level = "debug",
    skip_all
)]
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let options = connect_options(url)?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = name.replace('"', "\"\"");
        sqlx::query(&format!(
            "CREATE DATABASE \"{quoted}\" ENCODING 'UTF8' TEMPLATE template0"
        ))
        .execute(&mut admin)
        .await?;
        tracing::info!(database = %name, "created database");
    }
    Ok(())
}
