//! Leases: one billing change of a customer at a time, across processes,
//! without holding a connection while the change talks to Stripe.
//!
//! A session advisory lock would keep a pooled connection for the whole
//! change, and the change needs connections of its own from the same
//! pool: enough concurrent changes would hold every connection and starve
//! every other route. A lease is one short statement to take and one to
//! give back; a second taker is refused at once, and a lease its holder
//! never gave back (the process died) is free again once it expires.

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

/// Takes the customer's billing lease for `holder` until `ttl` from now,
/// unless someone else holds one that has not expired. True when taken.
#[tracing::instrument(name = "postgres leases.take", level = "debug", skip_all)]
pub async fn take(
    conn: &mut PgConnection,
    customer: Uuid,
    holder: Uuid,
    ttl: Duration,
) -> sqlx::Result<bool> {
    let taken: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO billing_leases (customer_id, holder, expires_at) \
         VALUES ($1, $2, NOW() + make_interval(secs => $3)) \
         ON CONFLICT (customer_id) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at \
             WHERE billing_leases.expires_at < NOW() \
         RETURNING holder",
    )
    .bind(customer)
    .bind(holder)
    .bind(ttl.as_secs_f64())
    .fetch_optional(conn)
    .await?;
    Ok(taken.is_some())
}

/// Gives the lease back, if `holder` still holds it.
#[tracing::instrument(name = "postgres leases.give_back", level = "debug", skip_all)]
pub async fn give_back(conn: &mut PgConnection, customer: Uuid, holder: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM billing_leases WHERE customer_id = $1 AND holder = $2")
        .bind(customer)
        .bind(holder)
        .execute(conn)
        .await?;
    Ok(())
}
