//! Customers, their subscriptions without Stripe, and operator grants.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CustomerRow {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

/// Inserts a customer. `None` when the email is taken.
#[tracing::instrument(name = "postgres customers.insert", level = "debug", skip_all)]
pub async fn insert(
    conn: &mut PgConnection,
    name: &str,
    email: &str,
) -> sqlx::Result<Option<CustomerRow>> {
    sqlx::query_as(
        "INSERT INTO customers (id, name, email) VALUES ($1, $2, $3) \
         ON CONFLICT (email) DO NOTHING RETURNING id, name, email, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(email)
    .fetch_optional(conn)
    .await
}

/// Subscribes a customer to a plan without Stripe (invoiced by hand), for
/// the period `[start, end)`.
#[tracing::instrument(
    name = "postgres customers.subscribe_manually",
    level = "debug",
    skip_all
)]
pub async fn subscribe_manually(
    conn: &mut PgConnection,
    customer: Uuid,
    plan_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO customer_billing (customer_id, plan_id, billing_cycle_start, billing_cycle_end, status) \
         VALUES ($1, $2, $3, $4, 'active')",
    )
    .bind(customer)
    .bind(plan_id)
    .bind(start)
    .bind(end)
    .execute(conn)
    .await?;
    Ok(())
}

/// A grant as recorded.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct GrantRow {
    pub id: Uuid,
    pub tokens: i32,
    pub reason: String,
}

/// What [`grant`] did.
pub enum Granted {
    /// Recorded and credited now.
    New(GrantRow),
    /// A grant with this id was recorded before (a retry under the same
    /// `Idempotency-Key`): nothing credited.
    Before(GrantRow),
}

/// Records grant `id` and credits it to the customer's purchased balance,
/// unless a grant with that id exists: then it returns that one and
/// credits nothing.
#[tracing::instrument(name = "postgres customers.grant", level = "debug", skip_all)]
pub async fn grant(
    conn: &mut PgConnection,
    id: Uuid,
    customer: Uuid,
    tokens: i32,
    reason: &str,
    granted_by: &str,
) -> sqlx::Result<Granted> {
    let inserted: Option<GrantRow> = sqlx::query_as(
        "INSERT INTO token_grants (id, customer_id, tokens, reason, granted_by) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (id) DO NOTHING RETURNING id, tokens, reason",
    )
    .bind(id)
    .bind(customer)
    .bind(tokens)
    .bind(reason)
    .bind(granted_by)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(row) => {
            credit_purchased(conn, customer, i64::from(tokens)).await?;
            Ok(Granted::New(row))
        }
        None => {
            let row = sqlx::query_as(
                "SELECT id, tokens, reason FROM token_grants WHERE id = $1 AND customer_id = $2",
            )
            .bind(id)
            .bind(customer)
            .fetch_one(conn)
            .await?;
            Ok(Granted::Before(row))
        }
    }
}

/// Adds to (or, negative, takes from) the customer's purchased tokens in
/// the ledger: grants, purchases and refunds.
#[tracing::instrument(
    name = "postgres customers.credit_purchased",
    level = "debug",
    skip_all
)]
pub async fn credit_purchased(
    conn: &mut PgConnection,
    customer: Uuid,
    tokens: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE customers SET purchased_tokens_credited = purchased_tokens_credited + $2, updated_at = NOW() \
         WHERE id = $1",
    )
    .bind(customer)
    .bind(tokens)
    .execute(conn)
    .await?;
    Ok(())
}

/// Purchased tokens not yet spent, as far as the ledger knows: the live
/// balance when the hot state is not loaded (nothing is being spent).
#[tracing::instrument(
    name = "postgres customers.purchased_balance",
    level = "debug",
    skip_all
)]
pub async fn purchased_balance(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT purchased_tokens_credited - purchased_tokens_used FROM customers WHERE id = $1",
    )
    .bind(customer)
    .fetch_one(conn)
    .await
}

#[tracing::instrument(name = "postgres customers.find", level = "debug", skip_all)]
pub async fn find(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<Option<CustomerRow>> {
    sqlx::query_as("SELECT id, name, email, created_at FROM customers WHERE id = $1")
        .bind(customer)
        .fetch_optional(conn)
        .await
}

/// The customer's Stripe customer id, sealed, if Stripe made one.
#[tracing::instrument(name = "postgres customers.stripe_customer", level = "debug", skip_all)]
pub async fn stripe_customer(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar::<_, Option<String>>(
        "SELECT stripe_customer_id FROM customers WHERE id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
    .map(Option::flatten)
}

/// Stores the customer's Stripe customer id, sealed.
#[tracing::instrument(
    name = "postgres customers.set_stripe_customer",
    level = "debug",
    skip_all
)]
pub async fn set_stripe_customer(
    conn: &mut PgConnection,
    customer: Uuid,
    sealed: &str,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE customers SET stripe_customer_id = $2, updated_at = NOW() WHERE id = $1")
        .bind(customer)
        .bind(sealed)
        .execute(conn)
        .await?;
    Ok(())
}
