//! Applying Stripe's webhook events to the ledger and the hot state.
//!
//! Each event is applied at most once: its id is recorded in
//! `stripe_webhook_events` in the same transaction as its effects. Stripe
//! delivers late, twice and out of order, so a handler acts on the
//! object's state and on what was applied before, never on arrival:
//!
//! - [`subscription`]: a subscription event applies only to the customer's
//!   current subscription (or one that replaces an ended one), and only if
//!   it is not older (`created`, Stripe's clock) than the newest event of
//!   that subscription already applied. A bigger allowance opens only once
//!   Stripe says the subscription is paid up (no pending update, status
//!   active).
//! - [`invoices`]: an invoice event applies only to the subscription it
//!   belongs to; a failure of a period already paid changes nothing, and a
//!   payment clears `past_due` only for the failed period or a later one,
//!   never for a subscription that has ended.
//! - [`purchases`]: a purchase is credited once per payment intent, a
//!   refund or a dispute takes back the purchase's tokens as far as they
//!   are unspent, a dispute won gives them back.
//!
//! Every change runs under the customer's row lock, with the hot state
//! changed before the commit, as [`Accounts::change`] does.

mod invoices;
mod purchases;
mod subscription;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

pub use subscription::{apply_subscription, is_smaller, Facts, SubscriptionFacts};

use super::subscriptions::write_over;
use crate::{
    domain::accounts::Accounts,
    error::ApiError,
    hot::{account::AccountChange, HotStore},
    ledger::{
        billing,
        sealed::{stripe_customer_place, Sealer},
    },
    stripe::Stripe,
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
    /// Older than what is applied already, about a subscription that is
    /// not the customer's, of a type we do not act on, or about a customer
    /// we do not know: recorded, nothing changed.
    Ignored,
    /// About a subscription another customer holds: recorded, nothing
    /// changed, a warning logged for a person to look at.
    Conflicting,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Applied,
        Outcome::Duplicate,
        Outcome::Ignored,
        Outcome::Conflicting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::Conflicting => "conflicting",
        }
    }
}

pub struct StripeEvents {
    stripe: Arc<Stripe>,
    accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    hot: HotStore,
    db: sqlx::PgPool,
    grace: chrono::Duration,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The Stripe customer an event's object belongs to, when it names one.
fn stripe_customer_of(object: &Value) -> Option<&str> {
    str_at(object, &["customer"]).filter(|c| c.starts_with("cus_"))
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

type Applied = Result<(Outcome, Vec<AccountChange>), ApiError>;

/// How long after a read of Stripe's state an event's `created` cannot be
/// ordered against it: whole seconds, and two clocks.
const AMBIGUOUS_SECS: i64 = 5;

/// Nothing to change.
fn ignored() -> Applied {
    Ok((Outcome::Ignored, Vec::new()))
}

impl StripeEvents {
    pub fn new(
        stripe: Arc<Stripe>,
        accounts: Arc<Accounts>,
        sealer: Arc<Sealer>,
        hot: HotStore,
        db: sqlx::PgPool,
        grace: std::time::Duration,
    ) -> Self {
        Self {
            stripe,
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
        let stripe_customer = stripe_customer_of(&event.data.object).map(str::to_owned);
        let current = self.read_anew(customer, &event).await?;
        match self.apply_to(customer, event, current).await {
            Ok(Outcome::Applied) if kind == "customer.subscription.deleted" => {
                if let Some(stripe_customer) = stripe_customer {
                    self.adopt_live(customer, &stripe_customer).await;
                }
                Ok(Outcome::Applied)
            }
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

    /// A `created` or `updated` event whose payload may be stale, applied
    /// as the subscription reads now instead: one of the customer's
    /// subscription older than the state we last read from Stripe itself
    /// (our own call's reply, a read-back, the reconciliation; Stripe's
    /// `created` has whole seconds and Stripe's clock is not ours, so an
    /// event up to a few seconds after that read cannot be ordered against
    /// it), and one of another subscription after ours ended (it would be
    /// adopted). A stale `created` must not undo the cancellation our reply
    /// recorded, nor reopen a subscription long cancelled; a newer change
    /// is in Stripe's state anyway. Stripe unreachable: 503, and Stripe
    /// delivers the event again.
    async fn read_anew(
        &self,
        customer: Uuid,
        event: &Event,
    ) -> Result<Option<SubscriptionFacts>, ApiError> {
        if !matches!(
            event.kind.as_str(),
            "customer.subscription.created" | "customer.subscription.updated"
        ) {
            return Ok(None);
        }
        let Some(id) = str_at(&event.data.object, &["id"]) else {
            return Ok(None);
        };
        let read = billing::stripe_read_at(&mut *self.db.acquire().await?, customer).await?;
        let ambiguous = match read {
            Some(billing::StripeRead {
                subscription_id: Some(ours),
                read_at: Some(read_at),
                ..
            }) if ours == id => {
                time(event.created)? <= read_at + chrono::Duration::seconds(AMBIGUOUS_SECS)
            }
            // Another subscription, ours ended: it would be adopted, and a
            // late `created` of one long cancelled says `active`.
            Some(billing::StripeRead {
                subscription_id: Some(ours),
                status,
                ..
            }) => ours != id && status == "canceled",
            _ => false,
        };
        if !ambiguous {
            return Ok(None);
        }
        metrics::counter!("stripe_webhook_events_read_anew_total").increment(1);
        Ok(Some(self.stripe.subscription(id).await?))
    }

    /// After the customer's subscription ended: another subscription of
    /// the same Stripe customer still live (made beside it, by a retry or
    /// in Stripe's dashboard) is the one the merchant pays for, and
    /// becomes ours, the newest first. Stripe not answering leaves it to
    /// the reconciliation, which looks for the same.
    async fn adopt_live(&self, customer: Uuid, stripe_customer: &str) {
        let adopted = async {
            let Some(newest) = self
                .stripe
                .live_subscriptions(stripe_customer)
                .await?
                .into_iter()
                .next()
            else {
                return Ok(None);
            };
            let id = newest.id.clone();
            let sealed = self
                .sealer
                .seal(stripe_customer, &stripe_customer_place(customer));
            write_over(
                &self.accounts,
                &self.hot,
                self.grace,
                customer,
                newest,
                Some(sealed),
            )
            .await?;
            Ok::<_, ApiError>(Some(id))
        }
        .await;
        match adopted {
            Ok(Some(subscription)) => {
                metrics::counter!("billing_subscriptions_adopted_total").increment(1);
                tracing::warn!(%customer, %subscription, "the subscription ended while another was live; adopted it");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%customer, error = %crate::telemetry::chain(&e), "could not look for another live subscription; the reconciliation will")
            }
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

    async fn apply_to(
        &self,
        customer: Uuid,
        event: Event,
        read_anew: Option<SubscriptionFacts>,
    ) -> Result<Outcome, ApiError> {
        let hot = self.hot.clone();
        let grace = self.grace;
        let cadence = self.accounts.cadence();
        // Sealed before the transaction: the key work needs no lock.
        let stripe_customer = stripe_customer_of(&event.data.object)
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
                            // Stripe's state as read now orders after every
                            // event: it takes no event time.
                            let event_at = read_anew.is_none().then_some(created);
                            let sub = match read_anew {
                                Some(sub) => sub,
                                None => SubscriptionFacts::from_event(object, &event.kind)?,
                            };
                            let facts = Facts {
                                event_at,
                                grace,
                                cadence,
                                stripe_customer,
                            };
                            apply_subscription(tx, &hot, customer, &sub, facts).await
                        }
                        "invoice.paid" => invoices::paid(tx, &hot, customer, object, cadence).await,
                        "invoice.payment_failed" => {
                            invoices::failed(tx, customer, object, created, grace).await
                        }
                        "payment_intent.succeeded" => {
                            purchases::succeeded(tx, customer, object).await
                        }
                        "payment_intent.payment_failed" => purchases::failed(tx, object).await,
                        "charge.refunded" => purchases::refunded(tx, &hot, customer, object).await,
                        "charge.dispute.created" => {
                            purchases::disputed(tx, &hot, customer, object).await
                        }
                        "charge.dispute.closed" => {
                            purchases::dispute_closed(tx, customer, object).await
                        }
                        _ => ignored(),
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
            "invoice.paid" | "invoice.payment_failed" => {
                if let Some(id) = str_at(
                    object,
                    &["parent", "subscription_details", "metadata", "customer_id"],
                ) {
                    return Ok(Uuid::parse_str(id).ok());
                }
                match invoices::subscription_of(object) {
                    Some(sub) => billing::customer_of_subscription(&mut conn, sub).await?,
                    None => None,
                }
            }
            "payment_intent.succeeded" | "payment_intent.payment_failed" => {
                match str_at(object, &["id"]) {
                    Some(pi) => billing::customer_of_payment(&mut conn, pi).await?,
                    None => None,
                }
            }
            "charge.refunded" | "charge.dispute.created" | "charge.dispute.closed" => {
                match str_at(object, &["payment_intent"]) {
                    Some(pi) => billing::customer_of_payment(&mut conn, pi).await?,
                    None => None,
                }
            }
            _ => None,
        })
    }
}
