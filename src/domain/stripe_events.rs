//! Applying Stripe's webhook events to the ledger and the hot state.
//!
//! Each event is applied at most once: its id is recorded in
//! `stripe_webhook_events` in the same transaction as its effects. Stripe
//! may deliver out of order, so a handler acts on the object's state and
//! the event's `created`, never on arrival: a subscription event older than
//! the newest one applied (`stripe_synced_at`) changes nothing, a purchase
//! is credited once per payment intent whatever event says so, and a new
//! period starts once, keyed by the period (`lua/account_rollover.lua`).
//! Every change runs under the customer's row lock, with the hot state
//! changed before the commit, as [`Accounts::change`] does.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use crate::{
    domain::{
        accounts::Accounts,
        billing::{hot_period, rollover},
    },
    error::ApiError,
    hot::{
        account::{AccountChange, Once, SubscriptionStatus},
        HotStore,
    },
    ledger::{
        billing::{self, SubscriptionState},
        customers,
        sealed::{stripe_customer_place, Sealer},
    },
};

/// The parts of a Stripe event every handler reads.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds.
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: Value,
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied before: nothing changed.
    Duplicate,
    /// Older than what is applied already, of a type we do not act on, or
    /// about a customer we do not know: recorded, nothing changed.
    Ignored,
}

pub struct StripeEvents {
    accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    hot: HotStore,
    db: sqlx::PgPool,
    grace: chrono::Duration,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn int_at(v: &Value, path: &[&str]) -> Option<i64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_i64()
}

fn time(secs: i64) -> Result<DateTime<Utc>, ApiError> {
    DateTime::from_timestamp(secs, 0)
        .ok_or_else(|| ApiError::InvalidRequest("a timestamp is out of range".into()))
}

fn missing(what: &str) -> ApiError {
    ApiError::InvalidRequest(format!("the event's object has no {what}"))
}

/// Stripe's subscription statuses, as ours.
fn status_of(stripe: &str) -> SubscriptionStatus {
    match stripe {
        "active" | "trialing" => SubscriptionStatus::Active,
        "past_due" => SubscriptionStatus::PastDue,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        // `incomplete` (first payment pending), `unpaid`, `paused`.
        _ => SubscriptionStatus::Unpaid,
    }
}

impl StripeEvents {
    pub fn new(
        accounts: Arc<Accounts>,
        sealer: Arc<Sealer>,
        hot: HotStore,
        db: sqlx::PgPool,
        grace: std::time::Duration,
    ) -> Self {
        Self {
            accounts,
            sealer,
            hot,
            db,
            grace: chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::hours(72)),
        }
    }

    pub async fn apply(&self, event: Event) -> Result<Outcome, ApiError> {
        let Some(customer) = self.customer_of(&event).await? else {
            return self.acknowledge(&event).await;
        };
        let (id, kind, created) = (event.id.clone(), event.kind.clone(), event.created);
        match self.apply_to(customer, event).await {
            Err(ApiError::NotFound("customer")) => {
                tracing::warn!(%id, %kind, %customer, "stripe event for a customer we do not have");
                self.acknowledge(&Event {
                    id,
                    kind,
                    created,
                    data: EventData {
                        object: Value::Null,
                    },
                })
                .await
            }
            other => other,
        }
    }

    /// Records an event we do not act on (not ours, or of another type),
    /// so Stripe stops delivering it.
    async fn acknowledge(&self, event: &Event) -> Result<Outcome, ApiError> {
        let mut conn = self.db.acquire().await?;
        let created = time(event.created)?;
        let fresh = billing::record_event(&mut conn, &event.id, &event.kind, created).await?;
        Ok(if fresh {
            Outcome::Ignored
        } else {
            Outcome::Duplicate
        })
    }

    async fn apply_to(&self, customer: Uuid, event: Event) -> Result<Outcome, ApiError> {
        let hot = self.hot.clone();
        let grace = self.grace;
        // Sealed before the transaction: the key work needs no lock.
        let stripe_customer = str_at(&event.data.object, &["customer"])
            .filter(|c| c.starts_with("cus_"))
            .map(|c| self.sealer.seal(c, &stripe_customer_place(customer)));
        self.accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let created = time(event.created)?;
                    if !billing::record_event(tx, &event.id, &event.kind, created).await? {
                        return Ok((Outcome::Duplicate, Vec::new()));
                    }
                    let object = &event.data.object;
                    match event.kind.as_str() {
                        "customer.subscription.created"
                        | "customer.subscription.updated"
                        | "customer.subscription.deleted" => {
                            let sub = SubscriptionFacts::from_event(object, &event.kind)?;
                            let facts = Facts {
                                as_of: created,
                                grace,
                                stripe_customer,
                            };
                            apply_subscription(tx, &hot, customer, &sub, facts).await
                        }
                        "invoice.paid" => invoice_paid(tx, &hot, customer, object, created).await,
                        "invoice.payment_failed" => {
                            let since = billing::mark_past_due(tx, customer, created).await?;
                            let open_until = SubscriptionStatus::PastDue
                                .open_until((since + grace).timestamp_millis());
                            Ok((
                                Outcome::Applied,
                                vec![AccountChange::SetOpenUntil(open_until)],
                            ))
                        }
                        "payment_intent.succeeded" => {
                            purchase_succeeded(tx, customer, object).await
                        }
                        "payment_intent.payment_failed" => {
                            let pi = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
                            let failed = billing::fail_purchase(tx, pi).await?;
                            let outcome = if failed {
                                Outcome::Applied
                            } else {
                                Outcome::Ignored
                            };
                            Ok((outcome, Vec::new()))
                        }
                        "charge.refunded" => refunded(tx, &hot, customer, object).await,
                        _ => Ok((Outcome::Ignored, Vec::new())),
                    }
                })
            })
            .await
    }

    /// Our customer for the event, from the object's metadata (set when we
    /// created it at Stripe) or from the subscription or payment it names.
    async fn customer_of(&self, event: &Event) -> Result<Option<Uuid>, ApiError> {
        let object = &event.data.object;
        if let Some(id) = str_at(object, &["metadata", "customer_id"]) {
            return Ok(Uuid::parse_str(id).ok());
        }
        let mut conn = self.db.acquire().await?;
        Ok(match event.kind.as_str() {
            "customer.subscription.created"
            | "customer.subscription.updated"
            | "customer.subscription.deleted" => match str_at(object, &["id"]) {
                Some(sub) => billing::customer_of_subscription(&mut conn, sub).await?,
                None => None,
            },
            "invoice.paid" | "invoice.payment_failed" => match str_at(object, &["subscription"]) {
                Some(sub) => billing::customer_of_subscription(&mut conn, sub).await?,
                None => None,
            },
            "payment_intent.succeeded" | "payment_intent.payment_failed" => {
                match str_at(object, &["id"]) {
                    Some(pi) => billing::customer_of_payment(&mut conn, pi).await?,
                    None => None,
                }
            }
            "charge.refunded" => match str_at(object, &["payment_intent"]) {
                Some(pi) => billing::customer_of_payment(&mut conn, pi).await?,
                None => None,
            },
            _ => None,
        })
    }
}

type Applied = Result<(Outcome, Vec<AccountChange>), ApiError>;

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
}

impl SubscriptionFacts {
    fn from_event(object: &Value, kind: &str) -> Result<Self, ApiError> {
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
        })
    }
}

/// When Stripe said it, and what goes with it.
pub struct Facts {
    /// The event's `created`, or the time of our own call's reply.
    pub as_of: DateTime<Utc>,
    pub grace: chrono::Duration,
    /// Stripe's customer id, sealed.
    pub stripe_customer: Option<String>,
}

/// A subscription's state written over ours, unless something newer was
/// applied already. An upgrade takes effect at once (the new allowance
/// less what this period used); a downgrade waits for the period's end;
/// a new period starts once. The caller holds the customer's row lock.
pub async fn apply_subscription(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    sub: &SubscriptionFacts,
    facts: Facts,
) -> Result<(Outcome, Vec<AccountChange>), ApiError> {
    let Facts {
        as_of: created,
        grace,
        stripe_customer,
    } = facts;
    let (price, start, end) = (sub.price.as_str(), sub.start, sub.end);
    let current = billing::lock_billing(tx, customer).await?;
    if current
        .as_ref()
        .and_then(|c| c.synced_at)
        .is_some_and(|synced| synced > created)
    {
        return Ok((Outcome::Ignored, Vec::new()));
    }
    let Some(plan) = billing::plan_by_price(tx, price).await? else {
        tracing::warn!(%price, "subscription on a price no plan has; not applied");
        return Ok((Outcome::Ignored, Vec::new()));
    };
    let status = status_of(&sub.status);
    let past_due_since = match status {
        SubscriptionStatus::PastDue => Some(
            current
                .as_ref()
                .and_then(|c| c.past_due_since)
                .unwrap_or(created),
        ),
        _ => None,
    };
    // A new period begins at or after the end of ours; anything else is a
    // change within the period.
    let old_end = current.as_ref().and_then(|c| c.end);
    let same_period = old_end.is_some_and(|old_end| start < old_end);
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
    // A smaller allowance mid-period waits for the period's end.
    let downgrade = current.as_ref().is_some_and(|c| {
        same_period && c.plan_id != plan.id && is_smaller(plan.tokens_per_month, c.allowance)
    });
    let (plan_now, pending) = match (&current, downgrade) {
        (Some(c), true) => (c.plan_id.as_str(), Some(plan.id.as_str())),
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
            synced_at: created,
            stripe_customer,
            anchor: reanchor.then_some(start),
        },
    )
    .await?;

    let allowance_now = match (&current, downgrade) {
        (Some(c), true) => i64::from(c.allowance),
        _ => i64::from(plan.tokens_per_month),
    };
    let mut changes = vec![
        AccountChange::SetOpenUntil(
            status.open_until(past_due_since.map_or(0, |t| (t + grace).timestamp_millis())),
        ),
        AccountChange::SetNextAllowance(i64::from(plan.tokens_per_month)),
    ];
    if !same_period {
        // A new period (or the first): started once, keyed by the old end.
        let old_end = old_end.unwrap_or(start);
        let anchor = match current.as_ref().and_then(|c| c.anchor) {
            Some(anchor) if !reanchor => anchor,
            _ => start,
        };
        let next_allowance = i64::from(plan.tokens_per_month);
        let new_period = rollover(
            old_end.min(start),
            allowance_now,
            anchor,
            end,
            next_allowance,
        );
        hot.rollover(customer, &new_period).await?;
    } else {
        changes.push(AccountChange::SetAllowance(allowance_now));
        if reanchor {
            let next_allowance = i64::from(plan.tokens_per_month);
            changes.push(AccountChange::SetPeriod(hot_period(
                start,
                end,
                next_allowance,
            )));
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

/// `invoice.paid`: the period it pays for starts (once), the subscription
/// is in good standing.
async fn invoice_paid(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    object: &Value,
    created: DateTime<Utc>,
) -> Applied {
    let line = object["lines"]["data"].get(0).unwrap_or(&Value::Null);
    let (Some(start), Some(end)) = (
        int_at(line, &["period", "start"]),
        int_at(line, &["period", "end"]),
    ) else {
        return Err(missing("lines.data[0].period"));
    };
    let (start, end) = (time(start)?, time(end)?);
    let Some(current) = billing::lock_billing(tx, customer).await? else {
        return Ok((Outcome::Ignored, Vec::new()));
    };
    let old_end = current.end.unwrap_or(start);
    if end > old_end {
        let allowance = billing::roll_to(tx, customer, start, end, created).await?;
        let anchor = current.anchor.unwrap_or(start);
        let paid_for = rollover(old_end, allowance, anchor, end, allowance);
        hot.rollover(customer, &paid_for).await?;
    } else {
        billing::mark_paid(tx, customer, created).await?;
    }
    Ok((Outcome::Applied, vec![AccountChange::SetOpenUntil(0)]))
}

/// `payment_intent.succeeded`: a token purchase, credited once.
async fn purchase_succeeded(
    tx: &mut sqlx::PgConnection,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let pi = str_at(object, &["id"]).ok_or_else(|| missing("id"))?;
    let tokens = str_at(object, &["metadata", "tokens"])
        .and_then(|t| t.parse::<i32>().ok())
        .filter(|t| *t > 0);
    let amount = int_at(object, &["amount_received"])
        .or_else(|| int_at(object, &["amount"]))
        .and_then(|a| i32::try_from(a).ok())
        .filter(|a| *a > 0)
        .ok_or_else(|| missing("amount"))?;
    let Some(tokens) = tokens else {
        // Not a token purchase of ours.
        return Ok((Outcome::Ignored, Vec::new()));
    };
    let purchase =
        str_at(object, &["metadata", "purchase_id"]).and_then(|p| Uuid::parse_str(p).ok());
    Ok(
        match billing::complete_purchase(tx, customer, purchase, pi, tokens, amount).await? {
            Some(credited) => (
                Outcome::Applied,
                vec![AccountChange::CreditPurchased {
                    tokens: i64::from(credited),
                    once: Once::purchase(pi),
                }],
            ),
            None => (Outcome::Duplicate, Vec::new()),
        },
    )
}

/// `charge.refunded`: the refunded share of a purchase's tokens is taken
/// back, as far as it is unspent.
async fn refunded(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    object: &Value,
) -> Applied {
    let pi = str_at(object, &["payment_intent"]).ok_or_else(|| missing("payment_intent"))?;
    let amount = int_at(object, &["amount"])
        .filter(|a| *a > 0)
        .ok_or_else(|| missing("amount"))?;
    let refunded = int_at(object, &["amount_refunded"])
        .unwrap_or(0)
        .clamp(0, amount);
    let Some(purchase) = billing::lock_purchase(tx, pi).await? else {
        return Ok((Outcome::Ignored, Vec::new()));
    };
    if purchase.status == "pending" || purchase.customer_id != customer {
        return Ok((Outcome::Ignored, Vec::new()));
    }
    let share = (i64::from(purchase.tokens_purchased) * refunded / amount) as i32;
    let more = i64::from(share - purchase.tokens_refunded);
    if more <= 0 {
        return Ok((Outcome::Duplicate, Vec::new()));
    }
    // The live balance decides what is unspent, atomically with the
    // consumes spending it; the ledger records exactly what was taken.
    let once = Once::refund(pi, share);
    let taken = match hot.take_purchased(customer, &once, more).await? {
        Some(taken) => taken,
        None => more.min(customers::purchased_balance(tx, customer).await?.max(0)),
    };
    billing::record_refund(tx, pi, share, refunded >= amount, customer, taken).await?;
    Ok((
        Outcome::Applied,
        vec![AccountChange::TookPurchased {
            tokens: taken,
            once,
        }],
    ))
}
