//! Billing periods in the ledger: which have ended, and moving one on.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{ledger::customers::credit_purchased, period::Cadence};

/// Customers billed without Stripe whose period has ended by `now`,
/// oldest first. (Stripe's customers move on with `invoice.paid`.)
#[tracing::instrument(name = "postgres billing.periods_ended", level = "debug", skip_all)]
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
    /// The day periods are counted from.
    pub anchor: DateTime<Utc>,
    /// The new period's allowance (its plan's; a scheduled downgrade's).
    pub allowance: i64,
}

#[derive(sqlx::FromRow)]
struct PeriodRow {
    end: Option<DateTime<Utc>>,
    anchor: Option<DateTime<Utc>>,
}

/// Moves the customer's period on until it contains `now` (see
/// [`move_period`]). The caller holds the customer's row lock. `None` when
/// the period has not ended (another replica moved it already).
#[tracing::instrument(name = "postgres billing.roll_period", level = "debug", skip_all)]
pub async fn roll_period(
    conn: &mut PgConnection,
    customer: Uuid,
    now: DateTime<Utc>,
    cadence: Cadence,
) -> sqlx::Result<Option<NewPeriod>> {
    let row: Option<PeriodRow> = sqlx::query_as(
        "SELECT billing_cycle_end AS end, COALESCE(billing_anchor, billing_cycle_start) AS anchor \
         FROM customer_billing WHERE customer_id = $1 FOR UPDATE",
    )
    .bind(customer)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(PeriodRow {
        end: Some(end),
        anchor: Some(anchor),
    }) = row
    else {
        return Ok(None);
    };
    if end > now {
        return Ok(None);
    }
    let (start, new_end) = cadence.containing(anchor, end, now);
    let allowance = move_period(conn, customer, start, new_end).await?;
    Ok(Some(NewPeriod {
        start,
        end: new_end,
        anchor,
        allowance,
    }))
}

/// Makes `[start, end)` the customer's period: a scheduled downgrade
/// applies, `tokens_used` is recounted from the usage rows persisted in it
/// (the flusher adds the rest as it writes them: it counts only rows
/// inside the period it finds). Returns the period's allowance.
async fn move_period(
    conn: &mut PgConnection,
    customer: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> sqlx::Result<i64> {
    let allowance: i32 = sqlx::query_scalar(
        "UPDATE customer_billing b SET billing_cycle_start = $2, billing_cycle_end = $3, \
             plan_id = COALESCE(b.pending_plan_id, b.plan_id), pending_plan_id = NULL, updated_at = NOW() \
         FROM billing_plans p WHERE b.customer_id = $1 AND p.id = COALESCE(b.pending_plan_id, b.plan_id) \
         RETURNING p.tokens_per_month",
    )
    .bind(customer)
    .bind(start)
    .bind(end)
    .fetch_one(&mut *conn)
    .await?;
    recount_period_usage(conn, customer).await?;
    Ok(i64::from(allowance))
}

/// Records a Stripe event as applied. False when it was applied before:
/// the caller then changes nothing. A second delivery racing the first
/// waits on the primary key until the first commits.
#[tracing::instrument(name = "postgres billing.record_event", level = "debug", skip_all)]
pub async fn record_event(
    conn: &mut PgConnection,
    id: &str,
    kind: &str,
    created: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO stripe_webhook_events (id, event_type, stripe_created_at) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(kind)
    .bind(created)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The customer a Stripe subscription belongs to.
#[tracing::instrument(
    name = "postgres billing.customer_of_subscription",
    level = "debug",
    skip_all
)]
pub async fn customer_of_subscription(
    conn: &mut PgConnection,
    subscription: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar("SELECT customer_id FROM customer_billing WHERE stripe_subscription_id = $1")
        .bind(subscription)
        .fetch_optional(conn)
        .await
}

/// The customer a payment intent's purchase belongs to.
#[tracing::instrument(
    name = "postgres billing.customer_of_payment",
    level = "debug",
    skip_all
)]
pub async fn customer_of_payment(
    conn: &mut PgConnection,
    payment_intent: &str,
) -> sqlx::Result<Option<Uuid>> {
    sqlx::query_scalar(
        "SELECT customer_id FROM token_purchases WHERE stripe_payment_intent_id = $1",
    )
    .bind(payment_intent)
    .fetch_optional(conn)
    .await
}

/// A plan, as billing needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PlanRow {
    pub id: String,
    pub tokens_per_month: i32,
}

#[tracing::instrument(name = "postgres billing.plan_by_price", level = "debug", skip_all)]
pub async fn plan_by_price(conn: &mut PgConnection, price: &str) -> sqlx::Result<Option<PlanRow>> {
    sqlx::query_as("SELECT id, tokens_per_month FROM billing_plans WHERE stripe_price_id = $1")
        .bind(price)
        .fetch_optional(conn)
        .await
}

/// The billing row's state, locked for the change.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BillingRow {
    pub plan_id: String,
    pub allowance: i32,
    pub status: String,
    /// Stripe's subscription; `None` for an operator's.
    pub subscription_id: Option<String>,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub anchor: Option<DateTime<Utc>>,
    pub past_due_since: Option<DateTime<Utc>>,
    /// `created` of the newest event of this subscription applied.
    pub synced_at: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    /// The end of the latest period an invoice paid for.
    pub paid_through: Option<DateTime<Utc>>,
    /// While `past_due`: the end of the period whose invoice failed.
    pub past_due_until_paid: Option<DateTime<Utc>>,
}

#[tracing::instrument(name = "postgres billing.lock_billing", level = "debug", skip_all)]
pub async fn lock_billing(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<BillingRow>> {
    sqlx::query_as(
        "SELECT b.plan_id, p.tokens_per_month AS allowance, b.status, \
                b.stripe_subscription_id AS subscription_id, \
                b.billing_cycle_start AS start, b.billing_cycle_end AS end, \
                COALESCE(b.billing_anchor, b.billing_cycle_start) AS anchor, b.past_due_since, \
                b.stripe_synced_at AS synced_at, b.cancel_at_period_end, b.paid_through, \
                b.past_due_until_paid \
         FROM customer_billing b JOIN billing_plans p ON p.id = b.plan_id \
         WHERE b.customer_id = $1 FOR UPDATE OF b",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// A subscription's state as Stripe reports it, written over ours.
#[derive(Debug, Clone)]
pub struct SubscriptionState<'a> {
    pub subscription: &'a str,
    pub plan_id: &'a str,
    /// A downgrade waiting for the period's end.
    pub pending_plan_id: Option<&'a str>,
    pub status: &'a str,
    pub past_due_since: Option<DateTime<Utc>>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    /// The event's `created`, for events; `None` for Stripe's state read
    /// by our own call, which leaves the events' order as it was.
    pub event_at: Option<DateTime<Utc>>,
    /// Stripe's customer id, sealed (`ledger::sealed`).
    pub stripe_customer: Option<String>,
    /// Periods count from here from now on (Stripe's start, when Stripe's
    /// period is neither ours nor the one after it: a switch from an
    /// operator's subscription, a subscription begun again after a gap);
    /// `None` keeps the anchor.
    pub anchor: Option<DateTime<Utc>>,
}

/// Writes a subscription's state over ours. Another subscription than the
/// one recorded starts its own order of events (`stripe_synced_at`) and
/// its own invoice history.
#[tracing::instrument(
    name = "postgres billing.write_subscription",
    level = "debug",
    skip_all
)]
pub async fn write_subscription(
    conn: &mut PgConnection,
    customer: Uuid,
    s: &SubscriptionState<'_>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO customer_billing (customer_id, plan_id, pending_plan_id, stripe_subscription_id, status, \
             past_due_since, billing_cycle_start, billing_cycle_end, billing_anchor, cancel_at_period_end, stripe_synced_at, \
             stripe_customer_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($12, $7), $9, $10, $11) \
         ON CONFLICT (customer_id) DO UPDATE SET plan_id = $2, pending_plan_id = $3, stripe_subscription_id = $4, \
             status = $5, past_due_since = $6, billing_cycle_start = $7, billing_cycle_end = $8, \
             billing_anchor = COALESCE($12, customer_billing.billing_anchor, $7), \
             cancel_at_period_end = $9, \
             stripe_synced_at = CASE WHEN customer_billing.stripe_subscription_id IS DISTINCT FROM $4 THEN $10 \
                                     ELSE GREATEST(customer_billing.stripe_synced_at, $10) END, \
             paid_through = CASE WHEN customer_billing.stripe_subscription_id IS DISTINCT FROM $4 THEN NULL \
                                 ELSE customer_billing.paid_through END, \
             past_due_until_paid = CASE WHEN $5 = 'past_due' AND customer_billing.stripe_subscription_id = $4 \
                                        THEN customer_billing.past_due_until_paid END, \
             stripe_read_at = CASE WHEN $10 IS NULL THEN NOW() \
                                   WHEN customer_billing.stripe_subscription_id IS DISTINCT FROM $4 THEN NULL \
                                   ELSE customer_billing.stripe_read_at END, \
             updated_at = NOW(), \
             stripe_customer_id = COALESCE($11, customer_billing.stripe_customer_id)",
    )
    .bind(customer)
    .bind(s.plan_id)
    .bind(s.pending_plan_id)
    .bind(s.subscription)
    .bind(s.status)
    .bind(s.past_due_since)
    .bind(s.start)
    .bind(s.end)
    .bind(s.cancel_at_period_end)
    .bind(s.event_at)
    .bind(&s.stripe_customer)
    .bind(s.anchor)
    .execute(&mut *conn)
    .await?;
    recount_period_usage(conn, customer).await
}

/// Moves the current period's start to `at` (a new subscription's
/// takeover) and counts its usage again.
#[tracing::instrument(name = "postgres billing.start_period_at", level = "debug", skip_all)]
pub async fn start_period_at(
    conn: &mut PgConnection,
    customer: Uuid,
    at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE customer_billing SET billing_cycle_start = $2 WHERE customer_id = $1")
        .bind(customer)
        .bind(at)
        .execute(&mut *conn)
        .await?;
    recount_period_usage(conn, customer).await
}

/// `tokens_used` of the current period, from the rows persisted in it.
#[tracing::instrument(
    name = "postgres billing.recount_period_usage",
    level = "debug",
    skip_all
)]
pub async fn recount_period_usage(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "WITH u AS ( \
             SELECT COALESCE(SUM(t.tokens_consumed - t.purchased_tokens_consumed), 0)::int8 AS used \
             FROM customer_billing cb JOIN token_usage t ON t.customer_id = cb.customer_id \
              AND t.created_at >= cb.billing_cycle_start AND t.created_at < cb.billing_cycle_end \
             WHERE cb.customer_id = $1) \
         UPDATE customer_billing b SET tokens_used = u.used, \
                tokens_remaining = CASE WHEN p.tokens_per_month < 0 THEN NULL \
                                        ELSE GREATEST(p.tokens_per_month - u.used, 0) END \
         FROM billing_plans p, u WHERE b.customer_id = $1 AND p.id = b.plan_id",
    )
    .bind(customer)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks a payment failed: `past_due` since the first failure, until the
/// period ending at `failed_end` (or a later one) is paid.
#[tracing::instrument(name = "postgres billing.mark_past_due", level = "debug", skip_all)]
pub async fn mark_past_due(
    conn: &mut PgConnection,
    customer: Uuid,
    since: DateTime<Utc>,
    failed_end: DateTime<Utc>,
) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar(
        "UPDATE customer_billing SET status = 'past_due', \
             past_due_since = COALESCE(past_due_since, $2), \
             past_due_until_paid = GREATEST(past_due_until_paid, $3), updated_at = NOW() \
         WHERE customer_id = $1 RETURNING past_due_since",
    )
    .bind(customer)
    .bind(since)
    .bind(failed_end)
    .fetch_one(conn)
    .await
}

/// An invoice paid for the period ending at `end`.
#[tracing::instrument(
    name = "postgres billing.record_paid_through",
    level = "debug",
    skip_all
)]
pub async fn record_paid_through(
    conn: &mut PgConnection,
    customer: Uuid,
    end: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE customer_billing SET paid_through = GREATEST(paid_through, $2), updated_at = NOW() \
         WHERE customer_id = $1",
    )
    .bind(customer)
    .bind(end)
    .execute(conn)
    .await?;
    Ok(())
}

/// The failed period is paid: the subscription is in good standing again.
#[tracing::instrument(name = "postgres billing.clear_past_due", level = "debug", skip_all)]
pub async fn clear_past_due(conn: &mut PgConnection, customer: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE customer_billing SET status = 'active', past_due_since = NULL, \
             past_due_until_paid = NULL, updated_at = NOW() \
         WHERE customer_id = $1 AND status = 'past_due'",
    )
    .bind(customer)
    .execute(conn)
    .await?;
    Ok(())
}

/// Credits a purchase once, keyed by its payment intent, less what a
/// refund or an open dispute recorded before its success: the pending row
/// (or one whose first attempt failed: Stripe lets the customer retry the
/// same intent; or, when Stripe's event came before our row, a new one)
/// becomes `completed`. Returns the tokens credited, `None` when it was already.
/// A new row takes our purchase id (from the intent's metadata) when it
/// is free, so a retried request finds its purchase whichever came first.
#[tracing::instrument(name = "postgres billing.complete_purchase", level = "debug", skip_all)]
pub async fn complete_purchase(
    conn: &mut PgConnection,
    customer: Uuid,
    purchase: Option<Uuid>,
    payment_intent: &str,
    tokens: i32,
    price_cents: i32,
) -> sqlx::Result<Option<i32>> {
    let credited: Option<i32> = sqlx::query_scalar(
        "INSERT INTO token_purchases (id, customer_id, tokens_purchased, price_cents, stripe_payment_intent_id, status, completed_at) \
         VALUES (COALESCE((SELECT $5::uuid WHERE NOT EXISTS (SELECT 1 FROM token_purchases WHERE id = $5)), gen_random_uuid()), \
                 $1, $2, $3, $4, 'completed', NOW()) \
         ON CONFLICT (stripe_payment_intent_id) DO UPDATE SET status = 'completed', completed_at = NOW() \
             WHERE token_purchases.status IN ('pending', 'failed') \
         RETURNING tokens_purchased - tokens_refunded - tokens_disputed",
    )
    .bind(customer)
    .bind(tokens)
    .bind(price_cents)
    .bind(payment_intent)
    .bind(purchase)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(tokens) = credited {
        credit_purchased(conn, customer, i64::from(tokens)).await?;
    }
    Ok(credited)
}

/// A completed purchase, locked for a refund or a dispute.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PurchaseRow {
    pub customer_id: Uuid,
    pub tokens_purchased: i32,
    pub price_cents: i32,
    pub tokens_refunded: i32,
    /// What an open dispute took back (or holds back from a purchase not
    /// credited yet).
    pub tokens_disputed: i32,
    pub status: String,
    /// When its success was applied (its tokens credited).
    pub completed_at: Option<DateTime<Utc>>,
}

impl PurchaseRow {
    /// Whether its tokens were credited: a refund or dispute then takes
    /// back from the balance; before, it reduces what the success credits.
    pub fn is_credited(&self) -> bool {
        self.completed_at.is_some()
    }
}

#[tracing::instrument(name = "postgres billing.lock_purchase", level = "debug", skip_all)]
pub async fn lock_purchase(
    conn: &mut PgConnection,
    payment_intent: &str,
) -> sqlx::Result<Option<PurchaseRow>> {
    sqlx::query_as(
        "SELECT customer_id, tokens_purchased, price_cents, tokens_refunded, tokens_disputed, status, \
                completed_at \
         FROM token_purchases WHERE stripe_payment_intent_id = $1 FOR UPDATE",
    )
    .bind(payment_intent)
    .fetch_optional(conn)
    .await
}

/// Records a refund: the purchase's refunded share, and the tokens taken
/// back from the customer's balance.
#[tracing::instrument(name = "postgres billing.record_refund", level = "debug", skip_all)]
pub async fn record_refund(
    conn: &mut PgConnection,
    payment_intent: &str,
    tokens_refunded: i32,
    fully: bool,
    customer: Uuid,
    taken: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE token_purchases SET tokens_refunded = $2, \
             status = CASE WHEN $3 THEN 'refunded' ELSE status END \
         WHERE stripe_payment_intent_id = $1",
    )
    .bind(payment_intent)
    .bind(tokens_refunded)
    .bind(fully)
    .execute(&mut *conn)
    .await?;
    credit_purchased(conn, customer, -taken).await
}

/// Records an open dispute: the tokens it holds (`disputed`: given back if
/// the merchant wins), of which `taken` from the customer's balance.
#[tracing::instrument(name = "postgres billing.record_dispute", level = "debug", skip_all)]
pub async fn record_dispute(
    conn: &mut PgConnection,
    payment_intent: &str,
    customer: Uuid,
    disputed: i64,
    taken: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE token_purchases SET tokens_disputed = $2 WHERE stripe_payment_intent_id = $1",
    )
    .bind(payment_intent)
    .bind(disputed as i32)
    .execute(&mut *conn)
    .await?;
    credit_purchased(conn, customer, -taken).await
}

/// A dispute won: what it took is given back, when the purchase was
/// `credited` (before, it is only no longer held back). Returns the
/// tokens given back.
#[tracing::instrument(
    name = "postgres billing.settle_dispute_won",
    level = "debug",
    skip_all
)]
pub async fn settle_dispute_won(
    conn: &mut PgConnection,
    payment_intent: &str,
    customer: Uuid,
    credited: bool,
) -> sqlx::Result<i64> {
    let given_back: i32 = sqlx::query_scalar(
        "UPDATE token_purchases p SET tokens_disputed = 0 \
         FROM (SELECT tokens_disputed FROM token_purchases WHERE stripe_payment_intent_id = $1) old \
         WHERE p.stripe_payment_intent_id = $1 RETURNING old.tokens_disputed",
    )
    .bind(payment_intent)
    .fetch_one(&mut *conn)
    .await?;
    if !credited {
        return Ok(0);
    }
    credit_purchased(conn, customer, i64::from(given_back)).await?;
    Ok(i64::from(given_back))
}

/// `invoice.paid` for a new period `[start, end)`: the period moves on and
/// a scheduled downgrade applies. Returns the new period's allowance.
#[tracing::instrument(name = "postgres billing.roll_to", level = "debug", skip_all)]
pub async fn roll_to(
    conn: &mut PgConnection,
    customer: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> sqlx::Result<i64> {
    move_period(conn, customer, start, end).await
}

/// Re-seals every Stripe customer id not sealed under the ring's first
/// key (on customers and on their billing); returns how many. Each row
/// under its own lock, so it runs beside the service.
#[tracing::instrument(
    name = "postgres billing.reseal_stripe_customers",
    level = "debug",
    skip_all
)]
pub async fn reseal_stripe_customers(
    pool: &sqlx::PgPool,
    sealer: &crate::ledger::sealed::Sealer,
) -> anyhow::Result<usize> {
    let mut resealed = 0;
    for (table, id) in [("customers", "id"), ("customer_billing", "customer_id")] {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(&format!(
            "SELECT {id}, stripe_customer_id FROM {table} WHERE stripe_customer_id IS NOT NULL"
        ))
        .fetch_all(pool)
        .await?;
        for (customer, sealed) in rows {
            if sealer.is_current(&sealed) {
                continue;
            }
            let place = crate::ledger::sealed::stripe_customer_place(customer);
            let plain = sealer.open(&sealed, &place)?;
            let done = sqlx::query(&format!(
                "UPDATE {table} SET stripe_customer_id = $3 WHERE {id} = $1 AND stripe_customer_id = $2"
            ))
            .bind(customer)
            .bind(&sealed)
            .bind(sealer.seal(&plain, &place))
            .execute(pool)
            .await?;
            resealed += done.rows_affected() as usize;
        }
    }
    Ok(resealed)
}

/// The customer's Stripe subscription and when its state was last read
/// from Stripe itself (see `stripe_read_at`'s migration).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StripeRead {
    pub subscription_id: Option<String>,
    pub status: String,
    pub read_at: Option<DateTime<Utc>>,
}

/// [`StripeRead`] of the customer, unlocked.
#[tracing::instrument(name = "postgres billing.stripe_read_at", level = "debug", skip_all)]
pub async fn stripe_read_at(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<StripeRead>> {
    sqlx::query_as(
        "SELECT stripe_subscription_id AS subscription_id, status, stripe_read_at AS read_at \
         FROM customer_billing WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// The customer's subscription as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub plan_id: String,
    pub pending_plan_id: Option<String>,
    pub status: String,
    pub start: Option<DateTime<Utc>>,
    pub end: Option<DateTime<Utc>>,
    pub cancel_at_period_end: bool,
    pub stripe_subscription_id: Option<String>,
    /// Sealed (`ledger::sealed`).
    pub stripe_customer_id: Option<String>,
}

#[tracing::instrument(name = "postgres billing.subscription", level = "debug", skip_all)]
pub async fn subscription(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<SubscriptionRow>> {
    sqlx::query_as(
        "SELECT plan_id, pending_plan_id, status, billing_cycle_start AS start, billing_cycle_end AS end, \
                cancel_at_period_end, stripe_subscription_id, stripe_customer_id \
         FROM customer_billing WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// A customer billed through Stripe, as the reconciliation compares it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StripeBilled {
    pub customer_id: Uuid,
    /// `None` for a Stripe customer with no subscription in our books
    /// (a subscribe whose reply was lost, say).
    pub subscription_id: Option<String>,
    /// Stripe's customer id, sealed (`ledger::sealed`), when we have it.
    pub stripe_customer_id: Option<String>,
}

/// Customers billed through Stripe whose subscription is live or ended
/// less than a period ago, and every customer with a Stripe customer and
/// no Stripe subscription in our books: what the reconciliation compares.
#[tracing::instrument(name = "postgres billing.stripe_billed", level = "debug", skip_all)]
pub async fn stripe_billed(conn: &mut PgConnection) -> sqlx::Result<Vec<StripeBilled>> {
    sqlx::query_as(
        "SELECT c.id AS customer_id, b.stripe_subscription_id AS subscription_id, \
                COALESCE(b.stripe_customer_id, c.stripe_customer_id) AS stripe_customer_id \
         FROM customers c LEFT JOIN customer_billing b ON b.customer_id = c.id \
         WHERE (b.stripe_subscription_id IS NOT NULL \
                AND (b.status <> 'canceled' OR b.billing_cycle_end > NOW() - INTERVAL '31 days')) \
            OR (c.stripe_customer_id IS NOT NULL AND b.stripe_subscription_id IS NULL) \
         ORDER BY c.id",
    )
    .fetch_all(conn)
    .await
}

/// The customer's live Stripe subscription id (if any) and its plan's
/// allowance, unlocked: an ended one can be neither changed nor cancelled.
#[tracing::instrument(name = "postgres billing.current_plan", level = "debug", skip_all)]
pub async fn current_plan(
    conn: &mut PgConnection,
    customer: Uuid,
) -> sqlx::Result<Option<(Option<String>, i32)>> {
    sqlx::query_as(
        "SELECT b.stripe_subscription_id, p.tokens_per_month FROM customer_billing b \
         JOIN billing_plans p ON p.id = b.plan_id WHERE b.customer_id = $1 AND b.status <> 'canceled'",
    )
    .bind(customer)
    .fetch_optional(conn)
    .await
}

/// A purchase we recorded: its tokens and its payment intent.
#[tracing::instrument(name = "postgres billing.purchase", level = "debug", skip_all)]
pub async fn purchase(
    conn: &mut PgConnection,
    purchase: Uuid,
) -> sqlx::Result<Option<(i32, String)>> {
    sqlx::query_as(
        "SELECT tokens_purchased, stripe_payment_intent_id FROM token_purchases WHERE id = $1",
    )
    .bind(purchase)
    .fetch_optional(conn)
    .await
}

/// Records a purchase whose payment is under way. Keyed by the payment
/// intent: a webhook that came first has written it already.
#[tracing::instrument(
    name = "postgres billing.record_pending_purchase",
    level = "debug",
    skip_all
)]
pub async fn record_pending_purchase(
    conn: &mut PgConnection,
    purchase: Uuid,
    customer: Uuid,
    tokens: i32,
    price_cents: i32,
    payment_intent: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO token_purchases (id, customer_id, tokens_purchased, price_cents, stripe_payment_intent_id, status) \
         VALUES ($1, $2, $3, $4, $5, 'pending') ON CONFLICT (stripe_payment_intent_id) DO NOTHING",
    )
    .bind(purchase)
    .bind(customer)
    .bind(tokens)
    .bind(price_cents)
    .bind(payment_intent)
    .execute(conn)
    .await?;
    Ok(())
}

/// A purchase's payment attempt failed: `failed` until an attempt succeeds.
#[tracing::instrument(name = "postgres billing.fail_purchase", level = "debug", skip_all)]
pub async fn fail_purchase(conn: &mut PgConnection, payment_intent: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE token_purchases SET status = 'failed' \
         WHERE stripe_payment_intent_id = $1 AND status = 'pending'",
    )
    .bind(payment_intent)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}
