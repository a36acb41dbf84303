//! The business figures operators watch (API.md "Operators"), each one
//! query: refreshed into gauges every half minute by one replica.

use sqlx::PgConnection;

/// Monthly recurring revenue of active subscriptions, in cents (a yearly
/// plan counts a twelfth of its price).
#[tracing::instrument(name = "postgres reports.mrr_cents", level = "debug", skip_all)]
pub async fn mrr_cents(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(CASE WHEN p.billing_cycle = 'yearly' THEN p.price_cents / 12 \
                                  ELSE p.price_cents END), 0)::int8 \
         FROM customer_billing b JOIN billing_plans p ON p.id = b.plan_id WHERE b.status = 'active'",
    )
    .fetch_one(conn)
    .await
}

/// Customers with an active subscription, per plan (every plan, zero
/// included, so a series never vanishes).
#[tracing::instrument(
    name = "postgres reports.active_customers_by_plan",
    level = "debug",
    skip_all
)]
pub async fn active_customers_by_plan(conn: &mut PgConnection) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT p.id, COUNT(b.customer_id) FROM billing_plans p \
         LEFT JOIN customer_billing b ON b.plan_id = p.id AND b.status = 'active' \
         GROUP BY p.id ORDER BY p.id",
    )
    .fetch_all(conn)
    .await
}

/// Activations per app and status (every app and status, zero included).
/// Counted in one pass over `customer_apps` and then joined to the app
/// list: a third of the time of joining first (benches/RESULTS.md).
#[tracing::instrument(
    name = "postgres reports.activations_by_app",
    level = "debug",
    skip_all
)]
pub async fn activations_by_app(
    conn: &mut PgConnection,
) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "SELECT a.slug, s.status, COALESCE(c.n, 0)::int8 \
         FROM apps a CROSS JOIN (VALUES ('active'), ('paused'), ('disabled')) AS s(status) \
         LEFT JOIN (SELECT app_id, status, COUNT(*) AS n FROM customer_apps \
                    GROUP BY app_id, status) c ON c.app_id = a.id AND c.status = s.status \
         WHERE a.status <> 'disabled' ORDER BY a.slug, s.status",
    )
    .fetch_all(conn)
    .await
}

/// How many active customers with an allowance have used what share of it
/// this period: `(bucket, customers)`, where bucket is the smallest of
/// `buckets` (ascending) at or above the share (2.0 past the last one).
#[tracing::instrument(
    name = "postgres reports.period_usage_ratios",
    level = "debug",
    skip_all
)]
pub async fn period_usage_ratios(
    conn: &mut PgConnection,
    buckets: &[f64],
) -> sqlx::Result<Vec<(f64, i64)>> {
    sqlx::query_as(
        "SELECT COALESCE((SELECT MIN(ub) FROM unnest($1::float8[]) AS ub WHERE ub >= r.ratio), 2.0), \
                COUNT(*) \
         FROM (SELECT b.tokens_used::float8 / p.tokens_per_month AS ratio \
               FROM customer_billing b JOIN billing_plans p ON p.id = b.plan_id \
               WHERE b.status = 'active' AND p.tokens_per_month > 0) AS r \
         GROUP BY 1",
    )
    .bind(buckets)
    .fetch_all(conn)
    .await
}
