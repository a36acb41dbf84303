//! `customer.subscription.*`, and the replies to our own calls: a
//! subscription's state written over ours.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{ignored, int_at, missing, str_at, time, Applied, Outcome};
use crate::{
    domain::billing::{hot_period, rollover},
    error::ApiError,
    hot::{
        account::{ending_at, AccountChange, RolloverOutcome, SubscriptionStatus},
        HotStore,
    },
    ledger::billing::{self, SubscriptionState},
    period::Cadence,
};

/// A subscription as Stripe reports it: from an event's object, or from
/// the reply to our own call.
#[derive(Debug, Clone)]
pub struct SubscriptionFacts {
    pub id: String,
    pub price: String,
    /// Stripe's status (`active`, `past_due`, `canceled`, …).
    pub status: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    /// A change waiting for its invoice to be paid (`pending_update`):
    /// the items still show the old price.
    pub pending_update: bool,
}

impl SubscriptionFacts {
    pub(super) fn from_event(object: &Value, kind: &str) -> Result<Self, ApiError> {
        let item = object["items"]["data"].get(0).unwrap_or(&Value::Null);
        // Newer API versions keep the period on the item.
        let period = |field: &str| {
            int_at(object, &[field])
                .or_else(|| int_at(item, &[field]))
                .ok_or_else(|| missing(field))
                .and_then(time)
        };
        let (start, end) = (
            period("current_period_start")?,
            period("current_period_end")?,
        );
        if end <= start {
            // Applied, it would be a period no consume could be in (and
            // the rollover script refuses it). The payload is at fault, not
            // us: a 400, never a 500.
            return Err(ApiError::InvalidRequest(
                "the subscription's period does not end after it starts".into(),
            ));
        }
        Ok(Self {
            id: str_at(object, &["id"])
                .ok_or_else(|| missing("id"))?
                .to_owned(),
            price: str_at(item, &["price", "id"])
                .ok_or_else(|| missing("items.data[0].price.id"))?
                .to_owned(),
            status: if kind == "customer.subscription.deleted" {
                "canceled".to_owned()
            } else {
                str_at(object, &["status"])
                    .ok_or_else(|| missing("status"))?
                    .to_owned()
            },
            start,
            end,
            cancel_at_period_end: object["cancel_at_period_end"].as_bool().unwrap_or(false),
            pending_update: !object["pending_update"].is_null(),
        })
    }
}

/// Stripe's subscription statuses, as ours.
pub(super) fn status_of(stripe: &str) -> SubscriptionStatus {
    match stripe {
        "active" | "trialing" => SubscriptionStatus::Active,
        "past_due" => SubscriptionStatus::PastDue,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        // `incomplete` (first payment pending), `unpaid`, `paused`.
        _ => SubscriptionStatus::Unpaid,
    }
}

/// What goes with Stripe's word.
pub struct Facts {
    /// The event's `created` (Stripe's clock, whole seconds); `None` for
    /// the reply to our own call or the reconciliation's read, which are
    /// Stripe's state as of now.
    pub event_at: Option<DateTime<Utc>>,
    pub grace: chrono::Duration,
    /// How long a billing period lasts.
    pub cadence: Cadence,
    /// Stripe's customer id, sealed.
    pub stripe_customer: Option<String>,
}

/// A subscription's state written over ours. The caller holds the
/// customer's row lock.
///
/// - Only the customer's current subscription changes anything, or a new
///   one replacing one that has ended: a late event of a replaced
///   subscription is recorded and ignored.
/// - An event older than the newest applied of the same subscription
///   (both `created`, Stripe's clock) changes nothing.
/// - A bigger allowance opens only when Stripe says the subscription is
///   paid up: status active and no pending update. An upgrade whose
///   invoice is unpaid (Stripe's `allow_incomplete` switches the price and
///   goes `past_due`) keeps the old plan until then.
/// - A smaller allowance waits for the period's end; a new period starts
///   once; a subscription that ends with its period is open until then
///   and no period follows it.
pub async fn apply_subscription(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    sub: &SubscriptionFacts,
    facts: Facts,
) -> Applied {
    let Facts {
        event_at,
        grace,
        cadence,
        stripe_customer,
    } = facts;
    let (price, start, end) = (sub.price.as_str(), sub.start, sub.end);
    let status = status_of(&sub.status);
    let current = billing::lock_billing(tx, customer).await?;
    let same_subscription = match current.as_ref().map(|c| c.subscription_id.as_deref()) {
        // An operator's subscription, or none yet: Stripe's takes over.
        None | Some(None) => false,
        Some(Some(ours)) if ours == sub.id => true,
        Some(Some(_)) => {
            let ours_ended = current.as_ref().is_some_and(|c| c.status == "canceled");
            if !ours_ended || status == SubscriptionStatus::Canceled {
                return ignored();
            }
            false
        }
    };
    // Canceled is final at Stripe: nothing about an ended subscription can
    // reopen it, however its events' whole seconds compare (a stale
    // `updated` from the second of the `deleted`).
    if same_subscription
        && current.as_ref().is_some_and(|c| c.status == "canceled")
        && status != SubscriptionStatus::Canceled
    {
        return ignored();
    }
    // Another customer's subscription in our books (metadata naming the
    // wrong customer): recorded as conflicting, never written over theirs.
    if !same_subscription {
        if let Some(holder) = billing::customer_of_subscription(tx, &sub.id).await? {
            if holder != customer {
                tracing::warn!(%customer, %holder, subscription = %sub.id,
                    "a subscription event names a customer other than the one holding it; not applied");
                return Ok((Outcome::Conflicting, Vec::new()));
            }
        }
    }
    if same_subscription
        && event_at.is_some_and(|at| {
            current
                .as_ref()
                .and_then(|c| c.synced_at)
                .is_some_and(|last| at < last)
        })
    {
        return ignored();
    }
    // Stripe's periods only move on: a state of the same subscription in a
    // period that ended before ours (an `updated` of a renewal delivered
    // after the `invoice.paid` of a later one) is history, whatever its
    // `created` says against the other subscription events.
    if same_subscription
        && current
            .as_ref()
            .and_then(|c| c.end)
            .is_some_and(|ours| end < ours)
    {
        return ignored();
    }
    let Some(plan) = billing::plan_by_price(tx, price).await? else {
        tracing::warn!(%price, "subscription on a price no plan has; not applied");
        return ignored();
    };
    let past_due_since = match status {
        SubscriptionStatus::PastDue => Some(
            current
                .as_ref()
                .and_then(|c| c.past_due_since)
                .or(event_at)
                .unwrap_or_else(Utc::now),
        ),
        _ => None,
    };
    // A new period begins at or after the end of ours; anything else is a
    // change within the period.
    let old_end = current.as_ref().and_then(|c| c.end);
    // Only the same subscription can go on in the same period: a new one
    // (after a cancellation, or replacing an operator's plan) is paid for
    // from its own start and begins a period with its own usage.
    let same_period = same_subscription && old_end.is_some_and(|old_end| start < old_end);
    // Neither our period (updated) nor the one after it (renewed): periods
    // count from Stripe's start from now on, in the ledger and in the hot
    // state, or the hot state would start a period at our old end, inside
    // Stripe's.
    let reanchor = old_end.is_none_or(|old_end| start != old_end && end != old_end);
    // Within our period, its start stays ours: the ledger counts the
    // period's usage over the same window as the hot state's `used`.
    let recorded_start = match (&current, same_period) {
        (Some(c), true) => c.start.unwrap_or(start),
        _ => start,
    };
    let changed_plan = current
        .as_ref()
        .filter(|c| same_subscription && c.plan_id != plan.id);
    // A smaller allowance mid-period waits for the period's end.
    let downgrade =
        changed_plan.is_some_and(|c| same_period && is_smaller(plan.tokens_per_month, c.allowance));
    // A bigger one waits for Stripe to say it is paid.
    let unpaid_upgrade = changed_plan.is_some_and(|c| {
        !is_smaller(plan.tokens_per_month, c.allowance)
            && (status != SubscriptionStatus::Active || sub.pending_update)
    });
    let (plan_now, pending) = match (&current, downgrade, unpaid_upgrade) {
        (Some(c), true, _) => (c.plan_id.as_str(), Some(plan.id.as_str())),
        (Some(c), _, true) => (c.plan_id.as_str(), None),
        _ => (plan.id.as_str(), None),
    };
    billing::write_subscription(
        tx,
        customer,
        &SubscriptionState {
            subscription: &sub.id,
            plan_id: plan_now,
            pending_plan_id: pending,
            status: status.name(),
            past_due_since,
            start: recorded_start,
            end,
            cancel_at_period_end: sub.cancel_at_period_end,
            event_at,
            stripe_customer,
            anchor: reanchor.then_some(start),
        },
    )
    .await?;

    let (allowance_now, next_allowance) = match (&current, downgrade, unpaid_upgrade) {
        (Some(c), true, _) => (i64::from(c.allowance), i64::from(plan.tokens_per_month)),
        (Some(c), _, true) => (i64::from(c.allowance), i64::from(c.allowance)),
        _ => (
            i64::from(plan.tokens_per_month),
            i64::from(plan.tokens_per_month),
        ),
    };
    // A subscription ending with its period may be used until its end,
    // and no period follows it.
    let open_until = ending_at(
        status,
        status.open_until(past_due_since.map_or(0, |t| (t + grace).timestamp_millis())),
        if sub.cancel_at_period_end {
            end.timestamp_millis()
        } else {
            0
        },
    );
    let with_successors = |mut period: crate::hot::account::Period| {
        if sub.cancel_at_period_end {
            period.next_ends_ms.clear();
        }
        period
    };
    let mut changes = vec![
        AccountChange::SetOpenUntil(open_until),
        AccountChange::SetNextAllowance(next_allowance),
    ];
    let anchor = match current.as_ref().and_then(|c| c.anchor) {
        Some(anchor) if !reanchor => anchor,
        _ => start,
    };
    if !same_period {
        // A new period (or the first): started once, beginning at Stripe's
        // start (past the old end when the periods between went unseen).
        let mut new_period = rollover(cadence, start, allowance_now, anchor, end, next_allowance);
        new_period.period = with_successors(new_period.period);
        // A subscription taking over from another (after a cancellation,
        // or from an operator's plan): its period begins at the takeover,
        // whatever Stripe's start says, in the hot state and the ledger
        // alike, so no charge of the old one counts against it.
        let takeover = !same_subscription && current.is_some();
        new_period.new_subscription = takeover;
        let started = hot.rollover(customer, &new_period).await?;
        if takeover {
            let at = match started {
                RolloverOutcome::StartedAt(ms) => {
                    DateTime::from_timestamp_millis(ms).unwrap_or_else(Utc::now)
                }
                // Not loaded: no consume can run until a rebuild, which
                // waits for this change's row lock.
                _ => Utc::now(),
            };
            billing::start_period_at(tx, customer, at.max(start)).await?;
        }
    } else {
        // Both belong to our current period: a consume that has started
        // the next one since keeps that period's allowance and end.
        let ours_ms = old_end.map_or(0, |e| e.timestamp_millis());
        changes.push(AccountChange::SetAllowance {
            allowance: allowance_now,
            period_end_ms: ours_ms,
        });
        if reanchor
            || sub.cancel_at_period_end != current.as_ref().is_some_and(|c| c.cancel_at_period_end)
        {
            changes.push(AccountChange::SetPeriod {
                period: with_successors(hot_period(cadence, anchor, end, next_allowance)),
                replacing_ms: ours_ms,
            });
        }
    }
    Ok((Outcome::Applied, changes))
}

/// Unlimited (-1) is the largest allowance.
pub fn is_smaller(new: i32, old: i32) -> bool {
    match (new, old) {
        (_, -1) => new != -1,
        (-1, _) => false,
        _ => new < old,
    }
}
