//! Stripe's API, through async-stripe, at `STRIPE_API_BASE`.
//!
//! Every call that creates something carries an idempotency key derived
//! from what it is for (our customer, our purchase), so a retry after a
//! timeout never creates a second customer, subscription or charge.

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::subscription::{
    CancelSubscription, CreateSubscription, CreateSubscriptionItems, RetrieveSubscription,
    UpdateSubscription, UpdateSubscriptionItems, UpdateSubscriptionProrationBehavior,
};
use stripe_core::{
    customer::{CreateCustomer, CreateCustomerInvoiceSettings},
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
}

fn idempotent(key: String) -> RequestStrategy {
    RequestStrategy::Idempotent(
        IdempotencyKey::new(key).expect("our idempotency keys are short ASCII"),
    )
}

fn ours(customer: Uuid) -> HashMap<String, String> {
    HashMap::from([("customer_id".to_owned(), customer.to_string())])
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

    /// Creates the Stripe customer for `customer`, with `payment_method`
    /// attached as its default. Keyed by our customer: once, ever.
    pub async fn create_customer(
        &self,
        customer: Uuid,
        email: &str,
        name: &str,
        payment_method: &str,
    ) -> Result<String, ApiError> {
        let created = CreateCustomer::new()
            .email(email)
            .name(name)
            .metadata(ours(customer))
            .payment_method(payment_method)
            .invoice_settings(CreateCustomerInvoiceSettings {
                default_payment_method: Some(payment_method.to_owned()),
                ..CreateCustomerInvoiceSettings::new()
            })
            .customize()
            .request_strategy(idempotent(format!("customer-{customer}")))
            .send(&self.client)
            .await
            .map_err(failure)?;
        Ok(created.id.to_string())
    }

    /// Attaches a payment method to an existing Stripe customer.
    pub async fn attach(
        &self,
        payment_method: &str,
        stripe_customer: &str,
    ) -> Result<(), ApiError> {
        AttachPaymentMethod::new(payment_method)
            .customer(stripe_customer)
            .send(&self.client)
            .await
            .map_err(failure)?;
        Ok(())
    }

    /// A SetupIntent for the dashboard to collect a card with Stripe.js.
    pub async fn setup_intent(&self, stripe_customer: Option<&str>) -> Result<String, ApiError> {
        let mut request = CreateSetupIntent::new();
        if let Some(c) = stripe_customer {
            request = request.customer(c);
        }
        let intent = request.send(&self.client).await.map_err(failure)?;
        intent.client_secret.ok_or_else(|| {
            ApiError::Unavailable(anyhow::anyhow!(
                "stripe: setup intent without a client secret"
            ))
        })
    }

    /// Subscribes to `price`, charging `payment_method`. Keyed by our
    /// customer, the price and the subscription this one follows (`None`
    /// for the first): a retry does not subscribe twice, and subscribing
    /// again after a cancellation is not answered with Stripe's saved reply
    /// for the cancelled subscription (Stripe keeps keys for 24 hours).
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
            .metadata(ours(customer))
            .customize()
            .request_strategy(idempotent(format!(
                "subscribe-{customer}-{price}-after-{}",
                follows.unwrap_or("none")
            )))
            .send(&self.client)
            .await
            .map_err(failure)?;
        facts(sub)
    }

    /// Moves the subscription to `price`. An upgrade is invoiced at once,
    /// prorated; a downgrade is not (it takes effect at the period's end,
    /// see `domain::stripe_events`).
    pub async fn change_price(
        &self,
        subscription: &str,
        price: &str,
        upgrade: bool,
    ) -> Result<SubscriptionFacts, ApiError> {
        let current = RetrieveSubscription::new(subscription)
            .send(&self.client)
            .await
            .map_err(failure)?;
        let item = current.items.data.first().ok_or_else(no_items)?;
        let sub = UpdateSubscription::new(subscription)
            .items(vec![UpdateSubscriptionItems {
                id: Some(item.id.to_string()),
                price: Some(price.to_owned()),
                ..UpdateSubscriptionItems::new()
            }])
            .proration_behavior(if upgrade {
                UpdateSubscriptionProrationBehavior::AlwaysInvoice
            } else {
                UpdateSubscriptionProrationBehavior::None
            })
            .send(&self.client)
            .await
            .map_err(failure)?;
        facts(sub)
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
        .map_err(failure)?;
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
            .map_err(failure)?;
        Ok(payment(intent))
    }

    /// A payment intent as it stands now.
    pub async fn payment(&self, id: &str) -> Result<Payment, ApiError> {
        let intent = RetrievePaymentIntent::new(id)
            .send(&self.client)
            .await
            .map_err(failure)?;
        Ok(payment(intent))
    }
}

fn payment(intent: stripe_shared::PaymentIntent) -> Payment {
    Payment {
        id: intent.id.to_string(),
        status: intent.status.as_str().to_owned(),
        client_secret: intent.client_secret,
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
    })
}
