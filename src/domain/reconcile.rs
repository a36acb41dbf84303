//! The billing reconciliation: the net under every missed or mangled
//! webhook.
//!
//! Once a day (and on an operator's demand, `POST
//! /api/v1/admin/billing/reconcile`), every customer billed through Stripe
//! whose subscription has not long ended, and every customer with a Stripe
//! customer and no subscription in our books, is compared with the Stripe
//! customer's live subscriptions as they are now: ours (plan, status,
//! period and cancellation) while it is live; the newest live one, adopted,
//! when ours has ended or there is none. Where ours differs, Stripe's
//! state is applied as its webhook would be ([`apply_subscription`], with
//! its rules: an unpaid upgrade still waits), under the customer's row
//! lock, and counted in `billing_reconciliation_fixes_total{field}`. More
//! than one live subscription is a duplicate, reported for a person
//! (`billing_duplicate_subscriptions`): the service never cancels or
//! refunds one by itself. One replica at a time
//! (a Postgres advisory lock); customers one after the other, so Stripe
//! sees a trickle, not a burst.

use serde::Serialize;
use uuid::Uuid;

use super::{
    stripe_events::{apply_subscription, Facts},
    subscriptions::Subscriptions,
};
use crate::{
    error::ApiError,
    ledger::billing::{self, SubscriptionRow},
};

/// The advisory lock that lets one replica at a time reconcile.
const RECONCILE_LOCK: i64 = 0x0ca0_0003;

/// What a reconciliation can find differing and set right
/// (`billing_reconciliation_fixes_total{field}`).
pub const FIELDS: [&str; 5] = [
    "subscription",
    "plan",
    "status",
    "period",
    "cancel_at_period_end",
];

/// What a reconciliation found.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Report {
    /// Customers compared with Stripe.
    pub checked: usize,
    /// Those whose billing differed, and what was set right.
    pub fixed: Vec<Fix>,
    /// Customers Stripe could not tell us about this time (left as they
    /// are; the next run tries again).
    pub failed: usize,
    /// False when another replica was reconciling: nothing was done.
    pub ran: bool,
    /// Customers with more than one live subscription at Stripe
    /// (`billing_duplicate_subscriptions`): all but ours are billed
    /// without being metered, for a person to cancel and refund.
    pub duplicates: Vec<Duplicate>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Duplicate {
    pub customer_id: Uuid,
    /// The live subscriptions, newest first.
    pub subscriptions: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Fix {
    pub customer_id: Uuid,
    /// `subscription` (another live one adopted), `plan`, `status`,
    /// `period` and/or `cancel_at_period_end`.
    pub fields: Vec<&'static str>,
}

impl Subscriptions {
    /// Compares every Stripe-billed customer with Stripe and applies what
    /// differs (see the module docs).
    pub async fn reconcile(&self) -> Result<Report, ApiError> {
        let mut lock = self.db.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RECONCILE_LOCK)
            .fetch_one(&mut *lock)
            .await?;
        if !locked {
            return Ok(Report::default());
        }
        let result = self.reconcile_all().await;
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(RECONCILE_LOCK)
            .execute(&mut *lock)
            .await;
        let report = result?;
        metrics::counter!("billing_reconciliation_runs_total").increment(1);
        Ok(report)
    }

    async fn reconcile_all(&self) -> Result<Report, ApiError> {
        let billed = billing::stripe_billed(&mut *self.db.acquire().await?).await?;
        let mut report = Report {
            ran: true,
            ..Report::default()
        };
        for customer in billed {
            report.checked += 1;
            let id = customer.customer_id;
            let states = match self.stripe_state(&customer, &mut report).await {
                Ok(states) => states,
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(customer = %id, error = %crate::telemetry::chain(&e), "reconciliation could not read the subscription");
                    continue;
                }
            };
            let mut fields = Vec::new();
            for facts in states {
                for field in self.set_right(id, facts).await? {
                    if !fields.contains(&field) {
                        fields.push(field);
                    }
                }
            }
            if !fields.is_empty() {
                for field in &fields {
                    metrics::counter!("billing_reconciliation_fixes_total", "field" => *field)
                        .increment(1);
                }
                tracing::warn!(customer = %id, ?fields, "billing differed from Stripe; set right");
                report.fixed.push(Fix {
                    customer_id: id,
                    fields,
                });
            }
        }
        metrics::gauge!("billing_duplicate_subscriptions").set(report.duplicates.len() as f64);
        Ok(report)
    }

    /// What to write over our books, in order, as Stripe holds it: ours
    /// while it is live; once it has ended, ours as it ended and then the
    /// newest other live one of the same Stripe customer (adopted, as
    /// after its `deleted` event). More than one live subscription is
    /// reported as a duplicate for a person to settle (see the README's
    /// billing section): ours goes on being the one we meter.
    async fn stripe_state(
        &self,
        customer: &billing::StripeBilled,
        report: &mut Report,
    ) -> Result<Vec<super::stripe_events::SubscriptionFacts>, ApiError> {
        let stripe_customer = customer
            .stripe_customer_id
            .as_deref()
            .map(|sealed| self.open_stripe_customer(customer.customer_id, sealed))
            .transpose()?;
        let live = match &stripe_customer {
            Some(stripe_customer) => self.stripe.live_subscriptions(stripe_customer).await?,
            None => Vec::new(),
        };
        if live.len() > 1 {
            let subscriptions: Vec<String> = live.iter().map(|s| s.id.clone()).collect();
            tracing::error!(customer = %customer.customer_id, ?subscriptions, "more than one live subscription at Stripe");
            report.duplicates.push(Duplicate {
                customer_id: customer.customer_id,
                subscriptions,
            });
        }
        let Some(ours) = customer.subscription_id.as_deref() else {
            // None in our books: a live one is the merchant's, unseen.
            return Ok(live.into_iter().take(1).collect());
        };
        if let Some(ours) = live.iter().find(|s| s.id == ours) {
            return Ok(vec![ours.clone()]);
        }
        let ours = self.stripe.subscription(ours).await?;
        Ok([ours].into_iter().chain(live.into_iter().next()).collect())
    }

    /// Applies Stripe's state of the customer's subscription; returns what
    /// it changed.
    async fn set_right(
        &self,
        customer: Uuid,
        facts: super::stripe_events::SubscriptionFacts,
    ) -> Result<Vec<&'static str>, ApiError> {
        let (hot, grace, cadence) = (self.hot.clone(), self.grace, self.accounts.cadence());
        self.accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let before = billing::subscription(tx, customer).await?;
                    let facts_of = Facts {
                        event_at: None,
                        grace,
                        cadence,
                        stripe_customer: None,
                    };
                    let (_, changes) =
                        apply_subscription(tx, &hot, customer, &facts, facts_of).await?;
                    let after = billing::subscription(tx, customer).await?;
                    let mut fields = Vec::new();
                    let subscription_of = |row: &Option<SubscriptionRow>| {
                        row.as_ref().and_then(|r| r.stripe_subscription_id.clone())
                    };
                    if subscription_of(&before) != subscription_of(&after) {
                        fields.push("subscription");
                    }
                    if let (Some(before), Some(after)) = (&before, &after) {
                        if before.plan_id != after.plan_id
                            || before.pending_plan_id != after.pending_plan_id
                        {
                            fields.push("plan");
                        }
                        if before.status != after.status {
                            fields.push("status");
                        }
                        if before.start != after.start || before.end != after.end {
                            fields.push("period");
                        }
                        if before.cancel_at_period_end != after.cancel_at_period_end {
                            fields.push("cancel_at_period_end");
                        }
                    }
                    // Nothing differed: leave the hot state as it is too.
                    let changes = if fields.is_empty() {
                        Vec::new()
                    } else {
                        changes
                    };
                    Ok((fields, changes))
                })
            })
            .await
    }
}
