//! Billing periods in the ledger: which have ended, and moving one on.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::billing::period_after;

/// Customers billed without Stripe whose period has ended by `now`,
/// oldest first. (Stripe's customers move on with `invoice.paid`.)
pub async fn periods_ended(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar(
        "SELECT customer_id FROM customer_billing \
         WHERE stripe_subscription_id IS NULL AND billing_cycle_end <= $1 \
         ORDER BY billing_cycle_end LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// A period the ledger moved on to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewPeriod {
    /// The old period's end, the new one's start.
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// The end of the period after.
    pub next_end: DateTime<Utc>,
    /// The new period's allowance (its plan's; a scheduled downgrade's).
    pub allowance: i64,
}

#[derive(sqlx::FromRow)]
struct PeriodRow {
    end: Option<DateTime<Utc>>,
    anchor: Option<DateTime<Utc>>,
    plan_id: String,
    pending_plan_id: Option<String>,
}

/// Moves the customer's period on until it contains `now`, applying a
/// scheduled downgrade. The caller holds the customer's row lock. `None`
/// when the period has not ended (another replica moved it already).
///
/// `tokens_used` is recounted from the usage rows already persisted in the
/// new period; the flusher adds the rest as it writes them (it counts only
/// rows inside the period it finds).
pub async fn roll_period(
    conn: &mut PgConnection,
    customer: Uuid,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<NewPeriod>> {
    let row: Option<PeriodRow> = sqlx::query_as(
        "SELECT billing_cycle_end AS end, COALESCE(billing_anchor, billing_cycle_start) AS anchor, \
                plan_id, pending_plan_id \
         FROM customer_billing WHERE customer_id = $1 FOR UPDATE",
    )
    .bind(customer)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(PeriodRow {
        end: Some(end),
        anchor: Some(anchor),
        plan_id,
        pending_plan_id,
    }) = row
    else {
        return Ok(None);
    };
    if end > now {
        return Ok(None);
    }
    let (mut start, mut new_end) = (end, period_after(anchor, end));
    while new_end <= now {
        (start, new_end) = (new_end, period_after(anchor, new_end));
    }
    let plan = pending_plan_id.unwrap_or(plan_id);
    let allowance: i32 = sqlx::query_scalar(
        "UPDATE customer_billing b SET billing_cycle_start = $2, billing_cycle_end = $3, \
                plan_id = $4, pending_plan_id = NULL, updated_at = NOW(), \
                tokens_used = u.used, \
                tokens_remaining = CASE WHEN p.tokens_per_month < 0 THEN NULL \
                                        ELSE GREATEST(p.tokens_per_month - u.used, 0) END \
         FROM billing_plans p, \
              (SELECT COALESCE(SUM(tokens_consumed - purchased_tokens_consumed), 0)::int4 AS used \
               FROM token_usage WHERE customer_id = $1 AND created_at >= $2 AND created_at < $3) u \
         WHERE b.customer_id = $1 AND p.id = $4 \
         RETURNING p.tokens_per_month",
    )
    .bind(customer)
    .bind(start)
    .bind(new_end)
    .bind(&plan)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some(NewPeriod {
        start,
        end: new_end,
        next_end: period_after(anchor, new_end),
        allowance: i64::from(allowance),
    }))
}
