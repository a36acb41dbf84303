//! Subscribing and buying tokens through Stripe.
//!
//! The calls to Stripe run under the customer's row lock, so two requests
//! of one customer never create two Stripe customers or two
//! subscriptions; each call also carries an idempotency key, so a retry
//! after a timeout is answered by Stripe with the first result. What
//! Stripe answers is applied exactly as its webhook will be
//! ([`stripe_events::apply_subscription`], [`billing::complete_purchase`]),
//! and whichever comes second finds it done.

use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use crate::{
    domain::{
        accounts::Accounts,
        stripe_events::{apply_subscription, is_smaller, Facts, SubscriptionFacts},
    },
    error::ApiError,
    hot::{
        account::{AccountChange, Once},
        HotStore,
    },
    ledger::{
        billing::{self, SubscriptionRow},
        catalog, customers,
        sealed::{stripe_customer_place, Sealer},
    },
    stripe::{Payment, Stripe},
};

/// Tokens one purchase may buy.
pub const PURCHASE_TOKENS: std::ops::RangeInclusive<i32> = 100..=1_000_000;

pub struct Subscriptions {
    stripe: Arc<Stripe>,
    accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    hot: HotStore,
    db: sqlx::PgPool,
    grace: chrono::Duration,
    /// `PAYG_PRICE_CENTS_PER_1000_TOKENS`.
    cents_per_1000: i64,
}

/// A purchase under way or done.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub id: Uuid,
    pub tokens: i32,
    pub price_cents: i32,
    pub payment: Payment,
    /// Whether the tokens are on the balance already.
    pub credited: bool,
}

impl Subscriptions {
    pub fn new(
        stripe: Arc<Stripe>,
        accounts: Arc<Accounts>,
        sealer: Arc<Sealer>,
        hot: HotStore,
        db: sqlx::PgPool,
        grace: std::time::Duration,
        cents_per_1000: i64,
    ) -> Self {
        Self {
            stripe,
            accounts,
            sealer,
            hot,
            db,
            grace: chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::hours(72)),
            cents_per_1000,
        }
    }

    /// The customer's Stripe customer id, opened, if they have one.
    fn stripe_customer(
        &self,
        customer: Uuid,
        row: Option<&SubscriptionRow>,
    ) -> Result<Option<String>, ApiError> {
        row.and_then(|r| r.stripe_customer_id.as_deref())
            .map(|sealed| self.sealer.open(sealed, &stripe_customer_place(customer)))
            .transpose()
            .map_err(|e| ApiError::Internal(e.into()))
    }

    /// A SetupIntent client secret, for Stripe.js to collect a card.
    pub async fn setup_intent(&self, customer: Uuid) -> Result<String, ApiError> {
        let row = billing::subscription(&mut *self.db.acquire().await?, customer).await?;
        let stripe_customer = self.stripe_customer(customer, row.as_ref())?;
        self.stripe.setup_intent(stripe_customer.as_deref()).await
    }

    /// Subscribes the customer to `plan_id` with `payment_method`.
    pub async fn subscribe(
        &self,
        customer: Uuid,
        plan_id: &str,
        payment_method: &str,
    ) -> Result<SubscriptionRow, ApiError> {
        let (stripe, sealer, hot, grace) = (
            self.stripe.clone(),
            self.sealer.clone(),
            self.hot.clone(),
            self.grace,
        );
        let (plan_id, payment_method) = (plan_id.to_owned(), payment_method.to_owned());
        let place = stripe_customer_place(customer);
        self.accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let (_, price) = stripe_plan(tx, &plan_id).await?;
                    let current = billing::subscription(tx, customer).await?;
                    if current.as_ref().is_some_and(|c| {
                        c.stripe_subscription_id.is_some() && c.status != "canceled"
                    }) {
                        return Err(ApiError::Conflict(
                            "already subscribed; change the plan instead".into(),
                        ));
                    }
                    let stripe_customer = match current
                        .as_ref()
                        .and_then(|c| c.stripe_customer_id.as_deref())
                    {
                        Some(sealed) => {
                            let id = sealer
                                .open(sealed, &place)
                                .map_err(|e| ApiError::Internal(e.into()))?;
                            stripe.attach(&payment_method, &id).await?;
                            id
                        }
                        None => {
                            let me = customers::find(tx, customer)
                                .await?
                                .ok_or(ApiError::NotFound("customer"))?;
                            stripe
                                .create_customer(customer, &me.email, &me.name, &payment_method)
                                .await?
                        }
                    };
                    let follows = current
                        .as_ref()
                        .and_then(|c| c.stripe_subscription_id.as_deref());
                    let sub = stripe
                        .subscribe(customer, &stripe_customer, &price, &payment_method, follows)
                        .await?;
                    let sealed = sealer.seal(&stripe_customer, &place);
                    record(tx, &hot, customer, &sub, grace, Some(sealed)).await
                })
            })
            .await
    }

    /// Moves a Stripe subscription to another plan: an upgrade at once (the
    /// new allowance less this period's usage), a downgrade at the period's
    /// end.
    pub async fn change_plan(
        &self,
        customer: Uuid,
        plan_id: &str,
    ) -> Result<SubscriptionRow, ApiError> {
        let plan_id = plan_id.to_owned();
        self.with_subscription(customer, move |stripe, tx, sub| {
            Box::pin(async move {
                let (plan, price) = stripe_plan(tx, &plan_id).await?;
                let current = billing::lock_billing(tx, customer)
                    .await?
                    .ok_or(ApiError::NotFound("subscription"))?;
                let upgrade = !is_smaller(plan.tokens_per_month, current.allowance);
                stripe.change_price(&sub, &price, upgrade).await
            })
        })
        .await
    }

    /// Cancels the Stripe subscription at the period's end, or at once.
    pub async fn cancel(
        &self,
        customer: Uuid,
        immediately: bool,
    ) -> Result<SubscriptionRow, ApiError> {
        self.with_subscription(customer, move |stripe, _tx, sub| {
            Box::pin(async move { stripe.cancel(&sub, immediately).await })
        })
        .await
    }

    /// Runs `call` against the customer's Stripe subscription under the
    /// customer's row lock, and applies what Stripe answers.
    async fn with_subscription(
        &self,
        customer: Uuid,
        call: impl for<'c> FnOnce(
                Arc<Stripe>,
                &'c mut sqlx::PgConnection,
                String,
            )
                -> futures::future::BoxFuture<'c, Result<SubscriptionFacts, ApiError>>
            + Send
            + 'static,
    ) -> Result<SubscriptionRow, ApiError> {
        let (stripe, hot, grace) = (self.stripe.clone(), self.hot.clone(), self.grace);
        self.accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    let sub = billing::subscription(tx, customer)
                        .await?
                        .and_then(|row| row.stripe_subscription_id)
                        .ok_or(ApiError::NotFound("subscription"))?;
                    let facts = call(stripe, &mut *tx, sub).await?;
                    record(tx, &hot, customer, &facts, grace, None).await
                })
            })
            .await
    }

    /// Buys `tokens` with `payment_method`. `purchase` identifies the
    /// purchase (from the request's `Idempotency-Key`, so a retried request
    /// is the same purchase and Stripe charges it once).
    pub async fn purchase(
        &self,
        customer: Uuid,
        purchase: Uuid,
        tokens: i32,
        payment_method: &str,
    ) -> Result<Purchase, ApiError> {
        if !PURCHASE_TOKENS.contains(&tokens) {
            return Err(ApiError::validation("tokens", "must be 100 to 1000000"));
        }
        // Stripe's smallest charge is 50 cents.
        let price_cents = ((i64::from(tokens) * self.cents_per_1000 + 999) / 1000).max(50);
        let mut conn = self.db.acquire().await?;
        // A purchase we recorded is answered from its payment intent, never
        // charged again: Stripe forgets an idempotency key after 24 hours,
        // our purchase id (from the request's Idempotency-Key) it does not.
        let payment = match billing::purchase(&mut conn, purchase).await? {
            Some((recorded, _)) if recorded != tokens => {
                return Err(ApiError::Conflict(
                    "this Idempotency-Key was used for another purchase".into(),
                ))
            }
            Some((_, payment_intent)) => self.stripe.payment(&payment_intent).await?,
            None => {
                let row = billing::subscription(&mut conn, customer).await?;
                let stripe_customer = self.stripe_customer(customer, row.as_ref())?;
                self.stripe
                    .pay(
                        customer,
                        purchase,
                        stripe_customer.as_deref(),
                        payment_method,
                        price_cents,
                        tokens,
                    )
                    .await?
            }
        };
        drop(conn);
        let price_cents = i32::try_from(price_cents).map_err(|e| ApiError::Internal(e.into()))?;
        let (id, succeeded) = (payment.id.clone(), payment.status == "succeeded");
        let credited = self
            .accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    billing::record_pending_purchase(
                        tx,
                        purchase,
                        customer,
                        tokens,
                        price_cents,
                        &id,
                    )
                    .await?;
                    if !succeeded {
                        return Ok((false, Vec::new()));
                    }
                    // Credited once, whether this or the webhook comes first.
                    Ok(
                        match billing::complete_purchase(
                            tx,
                            customer,
                            Some(purchase),
                            &id,
                            tokens,
                            price_cents,
                        )
                        .await?
                        {
                            Some(n) => (
                                true,
                                vec![AccountChange::CreditPurchased {
                                    tokens: i64::from(n),
                                    once: Once::purchase(&id),
                                }],
                            ),
                            None => (true, Vec::new()),
                        },
                    )
                })
            })
            .await?;
        Ok(Purchase {
            id: purchase,
            tokens,
            price_cents,
            payment,
            credited,
        })
    }
}

/// A plan on offer and its Stripe price.
async fn stripe_plan(
    tx: &mut sqlx::PgConnection,
    plan_id: &str,
) -> Result<(catalog::PlanRow, String), ApiError> {
    let plan = catalog::plan(tx, plan_id)
        .await?
        .ok_or(ApiError::NotFound("plan"))?;
    let price = plan
        .stripe_price_id
        .clone()
        .ok_or_else(|| ApiError::validation("plan_id", "this plan is not sold through Stripe"))?;
    Ok((plan, price))
}

/// Applies what Stripe answered, as its webhook will be applied, and
/// reads the subscription back for the response.
async fn record(
    tx: &mut sqlx::PgConnection,
    hot: &HotStore,
    customer: Uuid,
    sub: &SubscriptionFacts,
    grace: chrono::Duration,
    stripe_customer: Option<String>,
) -> Result<(SubscriptionRow, Vec<AccountChange>), ApiError> {
    let facts = Facts {
        as_of: Utc::now(),
        grace,
        stripe_customer,
    };
    let (_, changes) = apply_subscription(tx, hot, customer, sub, facts).await?;
    let row = billing::subscription(tx, customer)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("subscription not written")))?;
    Ok((row, changes))
}
