//! Stripe's API, through async-stripe, at `STRIPE_API_BASE`.
//!
//! Every call that creates something carries an idempotency key derived
//! from what it is for (our customer, our purchase), so a retry after a
//! timeout never creates a second customer, subscription or charge.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::{
    invoice_payment::ListInvoicePayment,
    subscription::{
        CancelSubscription, CreateSubscription, CreateSubscriptionItems,
        CreateSubscriptionPaymentBehavior, ListSubscription, RetrieveSubscription,
        UpdateSubscription, UpdateSubscriptionItems, UpdateSubscriptionPaymentBehavior,
        UpdateSubscriptionProrationBehavior,
    },
};
use stripe_core::{
    customer::{CreateCustomer, SearchCustomer, UpdateCustomer, UpdateCustomerInvoiceSettings},
    payment_intent::{CreatePaymentIntent, RetrievePaymentIntent},
    setup_intent::CreateSetupIntent,
};
use stripe_payment::payment_method::AttachPaymentMethod;
use uuid::Uuid;

use crate::{config::StripeSettings, domain::stripe_events::SubscriptionFacts, error::ApiError};

pub struct Stripe {
    client: Client,
}

/// A payment intent for a purchase, as the dashboard needs it.
#[derive(Debug, Clone)]
pub struct Payment {
    pub id: String,
    /// `succeeded`, `requires_action` (3-D Secure: the dashboard confirms
    /// with the client secret), `processing`, …
    pub status: String,
    pub client_secret: Option<String>,
    /// Why the last attempt failed (a card's decline), when it did.
    pub error: Option<String>,
}

/// What a plan change came to at Stripe.
#[derive(Debug, Clone)]
pub enum PlanChange {
    /// Applied: the subscription as it now is.
    Done(SubscriptionFacts),
    /// An upgrade whose invoice is not paid: Stripe keeps it pending and
    /// the subscription on its old price. With the payment that failed or
    /// waits for the customer (3-D Secure), when Stripe says which.
    Unpaid(Option<Payment>),
}

fn idempotent(key: String) -> RequestStrategy {
    RequestStrategy::Idempotent(
        IdempotencyKey::new(key).expect("our idempotency keys are short ASCII"),
    )
}

fn ours(customer: Uuid) -> HashMap<String, String> {
    HashMap::from([("customer_id".to_owned(), customer.to_string())])
}

/// Every Stripe call by its `billing_sync_total{operation}` name.
pub const OPERATIONS: [&str; 13] = [
    "attach",
    "cancel",
    "change_price",
    "create_customer",
    "find_customer",
    "invoice_payments",
    "list_subscriptions",
    "pay",
    "retrieve_payment",
    "retrieve_subscription",
    "set_default_card",
    "setup_intent",
    "subscribe",
];

/// A call to Stripe's answer, counted (`billing_sync_total{operation,
/// outcome}`: `ok`; `refused` for the caller's reasons, a declined card
/// say; `error` when Stripe could not be reached or failed), its error
/// mapped onto ours.
trait Counted<T> {
    fn counted(self, operation: &'static str) -> Result<T, ApiError>;
}

impl<T> Counted<T> for Result<T, StripeError> {
    fn counted(self, operation: &'static str) -> Result<T, ApiError> {
        let outcome = match &self {
            Ok(_) => "ok",
            Err(StripeError::Stripe(_, status))
                if (400..500).contains(status) && *status != 429 =>
            {
                "refused"
            }
            Err(_) => "error",
        };
        metrics::counter!("billing_sync_total", "operation" => operation, "outcome" => outcome)
            .increment(1);
        self.map_err(failure)
    }
}

/// Stripe's refusals are the caller's to fix (a declined card, a payment
/// method that does not exist): 422 on `payment_method_id`. Anything else
/// means Stripe could not be reached or answered oddly: 503, retry later.
fn failure(e: StripeError) -> ApiError {
    match e {
        StripeError::Stripe(errors, status) if (400..500).contains(&status) && status != 429 => {
            let message = errors
                .message
                .clone()
                .unwrap_or_else(|| "refused by the payment provider".to_owned());
            ApiError::validation("payment_method_id", message)
        }
        other => ApiError::Unavailable(anyhow::anyhow!("stripe: {other}")),
    }
}

impl Stripe {
    pub fn new(settings: &StripeSettings) -> anyhow::Result<Self> {
        let client = ClientBuilder::new(settings.secret_key.expose())
            .url(settings.api_base.as_str())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self { client })
    }

    /// The Stripe customer made for `customer` earlier, found by the
    /// `customer_id` metadata every customer we create carries: the net
    /// for a customer whose id we failed to store. Stripe's search lags
    /// writes by up to a minute; within a day of a creation, the creation's
    /// idempotency key answers with the same customer anyway.
    pub async fn find_customer(&self, customer: Uuid) -> Result<Option<String>, ApiError> {
        let found = SearchCustomer::new(format!("metadata['customer_id']:'{customer}'"))
            .send(&self.client)
            .await
            .counted("find_customer")?;
        Ok(found.data.first().map(|c| c.id.to_string()))
    }

    /// Creates the Stripe customer for `customer`. Keyed by our customer
    /// alone, so a retry (with another card, after a decline) is answered
    /// with the same customer; the card is attached apart
    /// ([`Stripe::attach`]).
    pub async fn create_customer(
        &self,
        customer: Uuid,
        email: &str,
        name: &str,
    ) -> Result<String, ApiError> {
        let created = CreateCustomer::new()
            .email(email)
            .name(name)
            .metadata(ours(customer))
            .customize()
            .request_strategy(idempotent(format!("customer-{customer}")))
            .send(&self.client)
            .await
            .counted("create_customer")?;
        Ok(created.id.to_string())
    }

    /// Attaches a payment method to a Stripe customer and makes it the one
    /// its invoices are charged to. Attaching one already attached is
    /// harmless, so a retry needs no key.
    pub async fn attach(
        &self,
        payment_method: &str,
        stripe_customer: &str,
    ) -> Result<(), ApiError> {
        AttachPaymentMethod::new(payment_method)
            .customer(stripe_customer)
            .send(&self.client)
            .await
            .counted("attach")?;
        UpdateCustomer::new(stripe_customer)
            .invoice_settings(UpdateCustomerInvoiceSettings {
                default_payment_method: Some(payment_method.to_owned()),
                ..UpdateCustomerInvoiceSettings::new()
            })
            .send(&self.client)
            .await
            .counted("set_default_card")?;
        Ok(())
    }

    /// A SetupIntent for the dashboard to collect a card with Stripe.js.
    pub async fn setup_intent(&self, stripe_customer: Option<&str>) -> Result<String, ApiError> {
        let mut request = CreateSetupIntent::new();
        if let Some(c) = stripe_customer {
            request = request.customer(c);
        }
        let intent = request.send(&self.client).await.counted("setup_intent")?;
        intent.client_secret.ok_or_else(|| {
            ApiError::Unavailable(anyhow::anyhow!(
                "stripe: setup intent without a client secret"
            ))
        })
    }

    /// Subscribes to `price`, charging `payment_method`; a first invoice
    /// that cannot be paid is Stripe's 402 and nothing is created
    /// (`error_if_incomplete`). Keyed by everything the request depends
    /// on: our customer, the price, the card and the subscription this one
    /// follows (`None` for the first). A retry does not subscribe twice; a
    /// retry with another card after a decline is a new request, not
    /// Stripe's parameter mismatch; subscribing again after a cancellation
    /// is not answered with Stripe's saved reply for the cancelled
    /// subscription (Stripe keeps keys for 24 hours).
    pub async fn subscribe(
        &self,
        customer: Uuid,
        stripe_customer: &str,
        price: &str,
        payment_method: &str,
        follows: Option<&str>,
    ) -> Result<SubscriptionFacts, ApiError> {
        let sub = CreateSubscription::new()
            .customer(stripe_customer)
            .items(vec![CreateSubscriptionItems {
                price: Some(price.to_owned()),
                ..CreateSubscriptionItems::new()
            }])
            .default_payment_method(payment_method)
            .payment_behavior(CreateSubscriptionPaymentBehavior::ErrorIfIncomplete)
            .metadata(ours(customer))
            .customize()
            .request_strategy(idempotent(format!(
                "subscribe-{customer}-{price}-{payment_method}-after-{}",
                follows.unwrap_or("none")
            )))
            .send(&self.client)
            .await
            .counted("subscribe")?;
        facts(sub)
    }

    /// Moves the subscription to `price`. An upgrade is invoiced at once,
    /// prorated, and applied only if that invoice is paid (Stripe's
    /// pending updates, `pending_if_incomplete`): unpaid, the subscription
    /// stays on its old price and Stripe keeps the change pending until the
    /// invoice is paid or the change expires. A downgrade is not invoiced
    /// (it takes effect at the period's end, see `domain::stripe_events`).
    pub async fn change_price(
        &self,
        subscription: &str,
        price: &str,
        upgrade: bool,
    ) -> Result<PlanChange, ApiError> {
        let current = RetrieveSubscription::new(subscription)
            .send(&self.client)
            .await
            .counted("retrieve_subscription")?;
        let item = current.items.data.first().ok_or_else(no_items)?;
        let mut update =
            UpdateSubscription::new(subscription).items(vec![UpdateSubscriptionItems {
                id: Some(item.id.to_string()),
                price: Some(price.to_owned()),
                ..UpdateSubscriptionItems::new()
            }]);
        update = if upgrade {
            update
                .proration_behavior(UpdateSubscriptionProrationBehavior::AlwaysInvoice)
                .payment_behavior(UpdateSubscriptionPaymentBehavior::PendingIfIncomplete)
        } else {
            update.proration_behavior(UpdateSubscriptionProrationBehavior::None)
        };
        let sub = update.send(&self.client).await.counted("change_price")?;
        if sub.pending_update.is_none() {
            return Ok(PlanChange::Done(facts(sub)?));
        }
        let invoice = sub
            .latest_invoice
            .as_ref()
            .and_then(|i| i.id().as_ref().map(|id| id.as_str().to_owned()));
        Ok(PlanChange::Unpaid(match invoice {
            Some(invoice) => self.invoice_payment(&invoice).await?,
            None => None,
        }))
    }

    /// The payment of an invoice, as its latest payment intent stands.
    async fn invoice_payment(&self, invoice: &str) -> Result<Option<Payment>, ApiError> {
        let payments = ListInvoicePayment::new()
            .invoice(invoice)
            .send(&self.client)
            .await
            .counted("invoice_payments")?;
        let intent = payments.data.iter().find_map(|p| {
            p.payment
                .payment_intent
                .as_ref()
                .map(|pi| pi.id().as_str().to_owned())
        });
        match intent {
            Some(intent) => Ok(Some(self.payment(&intent).await?)),
            None => Ok(None),
        }
    }

    /// The subscription as Stripe holds it now.
    pub async fn subscription(&self, subscription: &str) -> Result<SubscriptionFacts, ApiError> {
        let sub = RetrieveSubscription::new(subscription)
            .send(&self.client)
            .await
            .counted("retrieve_subscription")?;
        facts(sub)
    }

    /// The Stripe customer's live subscriptions (every status but
    /// `canceled` and `incomplete_expired`), newest first as Stripe lists
    /// them: what subscribing, a subscription's end and the reconciliation
    /// look at, so no subscription is billed at Stripe unseen by us.
    pub async fn live_subscriptions(
        &self,
        stripe_customer: &str,
    ) -> Result<Vec<SubscriptionFacts>, ApiError> {
        let listed = ListSubscription::new()
            .customer(stripe_customer)
            .limit(100)
            .send(&self.client)
            .await
            .counted("list_subscriptions")?;
        listed
            .data
            .into_iter()
            .filter(|sub| !matches!(sub.status.as_str(), "canceled" | "incomplete_expired"))
            .map(facts)
            .collect()
    }

    /// Cancels at the period's end, or at once.
    pub async fn cancel(
        &self,
        subscription: &str,
        immediately: bool,
    ) -> Result<SubscriptionFacts, ApiError> {
        let sub = if immediately {
            CancelSubscription::new(subscription)
                .send(&self.client)
                .await
        } else {
            UpdateSubscription::new(subscription)
                .cancel_at_period_end(true)
                .send(&self.client)
                .await
        }
        .counted("cancel")?;
        facts(sub)
    }

    /// Charges `amount_cents` for `tokens`, confirmed at once with the
    /// card (the subscriber's Stripe customer's, or one collected for this
    /// payment alone). Keyed by our purchase id.
    pub async fn pay(
        &self,
        customer: Uuid,
        purchase: Uuid,
        stripe_customer: Option<&str>,
        payment_method: &str,
        amount_cents: i64,
        tokens: i32,
    ) -> Result<Payment, ApiError> {
        let mut metadata = ours(customer);
        metadata.insert("tokens".to_owned(), tokens.to_string());
        metadata.insert("purchase_id".to_owned(), purchase.to_string());
        let mut request = CreatePaymentIntent::new(amount_cents, stripe_types::Currency::USD);
        if let Some(c) = stripe_customer {
            request = request.customer(c);
        }
        let intent = request
            .payment_method(payment_method)
            .confirm(true)
            .description(format!("{tokens} Connected Apps tokens"))
            .metadata(metadata)
            .customize()
            .request_strategy(idempotent(format!("purchase-{purchase}")))
            .send(&self.client)
            .await
            .counted("pay")?;
        Ok(payment(intent))
    }

    /// A payment intent as it stands now.
    pub async fn payment(&self, id: &str) -> Result<Payment, ApiError> {
        let intent = RetrievePaymentIntent::new(id)
            .send(&self.client)
            .await
            .counted("retrieve_payment")?;
        Ok(payment(intent))
    }
}

fn payment(intent: stripe_shared::PaymentIntent) -> Payment {
    Payment {
        id: intent.id.to_string(),
        status: intent.status.as_str().to_owned(),
        client_secret: intent.client_secret,
        error: intent.last_payment_error.and_then(|e| e.message),
    }
}

fn no_items() -> ApiError {
    ApiError::Unavailable(anyhow::anyhow!("stripe: subscription without items"))
}

/// What we keep of a subscription Stripe returned.
fn facts(sub: stripe_shared::Subscription) -> Result<SubscriptionFacts, ApiError> {
    let item = sub.items.data.first().ok_or_else(no_items)?;
    let at = |secs: i64| {
        DateTime::<Utc>::from_timestamp(secs, 0)
            .ok_or_else(|| ApiError::Unavailable(anyhow::anyhow!("stripe: bad period")))
    };
    let (start, end) = (at(item.current_period_start)?, at(item.current_period_end)?);
    if end <= start {
        return Err(ApiError::Unavailable(anyhow::anyhow!("stripe: bad period")));
    }
    Ok(SubscriptionFacts {
        id: sub.id.to_string(),
        price: item.price.id.to_string(),
        status: sub.status.as_str().to_owned(),
        start,
        end,
        cancel_at_period_end: sub.cancel_at_period_end,
        pending_update: sub.pending_update.is_some(),
    })
}
