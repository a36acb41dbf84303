//! `invoice.paid` and `invoice.payment_failed`, applied to the
//! subscription they belong to, in the order of the periods they pay for.
//!
//! Stripe sends an invoice's events when it likes: a redelivered payment of
//! an old period can come after the failure of the next one, a late
//! failure after the retry that paid it, a payment of an old open invoice
//! after dunning ended the subscription. So an invoice event changes
//! nothing for a subscription that is not the customer's current one; a
//! failure of a period already paid (`paid_through`) changes nothing; a
//! payment clears `past_due` only when it pays the period that failed or a
//! later one (`past_due_until_paid`); and whether the subscription is
//! active is the subscription's own state: a payment never reopens one
//! that has ended, nor starts a period for it. Nor does either kind of
//! event keep open past its period's end a subscription cancelled at that
//! end: the failure of a renewal, or its late payment, comes after the
//! merchant's cancellation as often as before it.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{ignored, int_at, missing, str_at, time, Applied, Outcome};
use crate::{
    domain::billing::rollover,
    hot::{
        account::{ending_at, AccountChange, SubscriptionStatus},
        HotStore,
    },
    ledger::billing::{self, BillingRow},
    period::Cadence,
};

/// The subscription an invoice bills: where API versions since 2025 put
/// it, or where older ones did.
pub(super) fn subscription_of(invoice: &Value) -> Option<&str> {
    str_at(invoice, &["parent", "subscription_details", "subscription"])
        .or_else(|| str_at(invoice, &["subscription"]))
}

/// The period an invoice pays for: its first line's.
fn period_of(invoice: &Value) -> Result<(DateTime<Utc>, DateTime<Utc>), crate::error::ApiError> {
    let line = invoice["lines"]["data"].get(0).unwrap_or(&Value::Null);
    match (
        int_at(line, &["period", "start"]),
        int_at(line, &["period", "end"]),
    ) {
        (Some(start), Some(end)) => Ok((time(start)?, time(end)?)),
        _ => Err(missing("lines.data[0].period")),
    }
}

/// The customer's billing, when the invoice belongs to its current
/// subscription.
async fn billing_of(
    tx: &mut sqlx::PgConnection,
    customer: Uuid,
    invoice: &Value,
) -> Result<Option<BillingRow>, crate::error::ApiError> {
    let Some(current) = billing::lock_billing(tx, customer).await? else {
        return Ok(None);
    };
    let ours =
        subscription_of(invoice).is_some_and(|s| current.subscription_id.as_deref() == Some(s));
    Ok(ours.then_some(current))
}

fn has_ended(row: &BillingRow) -> bool {
    matches!(row.status.as_str(), "canceled" | "unpaid")
}

/// Until when the account may consume in `status`, whose own limit is
/// `open_until` (0: none): never past the period's end when the
/// subscription ends with it.
fn open_until(row: &BillingRow, status: SubscriptionStatus, open_until: i64) -> i64 {
    let closes_at = match (row.cancel_at_period_end, row.end) {
        (true, Some(end)) => end.timestamp_millis(),
        _ => 0,
    };
    ending_at(status, open_until, closes_at)
}

/// `invoice.paid`: the period it pays for is paid; a new one starts
/// (once), and a `past_due` subscription is in good standing again if
/// this pays the period that failed or a later one.
pub(super) async fn paid(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    invoice: &Value,
    cadence: Cadence,
) -> Applied {
    let (start, end) = period_of(invoice)?;
    let Some(current) = billing_of(tx, customer, invoice).await? else {
        return ignored();
    };
    billing::record_paid_through(tx, customer, end).await?;
    if has_ended(&current) {
        return Ok((Outcome::Applied, Vec::new()));
    }
    let old_end = current.end.unwrap_or(start);
    if end > old_end {
        let allowance = billing::roll_to(tx, customer, start, end).await?;
        let anchor = current.anchor.unwrap_or(start);
        // The period begins at the invoice's start: past the old end when
        // the invoices of the periods between never came.
        let paid_for = rollover(cadence, start, allowance, anchor, end, allowance);
        hot.rollover(customer, &paid_for).await?;
    }
    let mut changes = Vec::new();
    let pays_the_failure = current
        .past_due_until_paid
        .is_none_or(|failed| end >= failed);
    if current.status == "past_due" && pays_the_failure {
        billing::clear_past_due(tx, customer).await?;
        let open = open_until(&current, SubscriptionStatus::Active, 0);
        changes.push(AccountChange::SetOpenUntil(open));
    }
    Ok((Outcome::Applied, changes))
}

/// `invoice.payment_failed`: `past_due` since the first failure, until the
/// failed period is paid; consumes go on for the grace period.
pub(super) async fn failed(
    tx: &mut sqlx::PgConnection,
    customer: Uuid,
    invoice: &Value,
    created: DateTime<Utc>,
    grace: chrono::Duration,
) -> Applied {
    let (_, end) = period_of(invoice)?;
    let Some(current) = billing_of(tx, customer, invoice).await? else {
        return ignored();
    };
    let paid_already = current.paid_through.is_some_and(|paid| paid >= end);
    if has_ended(&current) || paid_already {
        return ignored();
    }
    let since = billing::mark_past_due(tx, customer, created, end).await?;
    let status = SubscriptionStatus::PastDue;
    let open = open_until(
        &current,
        status,
        status.open_until((since + grace).timestamp_millis()),
    );
    Ok((Outcome::Applied, vec![AccountChange::SetOpenUntil(open)]))
}
