//! Subscribing and buying tokens through Stripe.
//!
//! One billing request of a customer at a time: a lease per customer in
//! Postgres (`ledger::leases`), taken before Stripe is called and holding
//! no connection meanwhile, so two requests never create two Stripe
//! customers or two subscriptions, and a second one is answered 409 at
//! once rather than queued. The customer's row lock (which every other write of the
//! customer takes) is held only to record what Stripe answered, never
//! across a call to Stripe: a slow Stripe holds up only that customer's
//! billing. Each call also carries an idempotency key naming everything it
//! depends on, so a retry after a timeout is answered by Stripe with the
//! first result. What Stripe answers is applied exactly as its webhook
//! will be ([`stripe_events::apply_subscription`],
//! [`billing::complete_purchase`]), and whichever comes second finds it
//! done.

use std::sync::Arc;

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
        catalog, customers, leases,
        sealed::{stripe_customer_place, Sealer},
    },
    stripe::{Payment, PlanChange, Stripe},
};

/// Tokens one purchase may buy.
pub const PURCHASE_TOKENS: std::ops::RangeInclusive<i32> = 100..=1_000_000;

pub struct Subscriptions {
    pub(super) stripe: Arc<Stripe>,
    pub(super) accounts: Arc<Accounts>,
    sealer: Arc<Sealer>,
    pub(super) hot: HotStore,
    pub(super) db: sqlx::PgPool,
    pub(super) grace: chrono::Duration,
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
    async fn stored_stripe_customer(&self, customer: Uuid) -> Result<Option<String>, ApiError> {
        customers::stripe_customer(&mut *self.db.acquire().await?, customer)
            .await?
            .map(|sealed| self.open_stripe_customer(customer, &sealed))
            .transpose()
    }

    /// A Stripe customer id as stored, sealed, opened.
    pub(super) fn open_stripe_customer(
        &self,
        customer: Uuid,
        sealed: &str,
    ) -> Result<String, ApiError> {
        self.sealer
            .open(sealed, &stripe_customer_place(customer))
            .map_err(|e| ApiError::Internal(e.into()))
    }

    /// A SetupIntent client secret, for Stripe.js to collect a card.
    pub async fn setup_intent(&self, customer: Uuid) -> Result<String, ApiError> {
        let stripe_customer = self.stored_stripe_customer(customer).await?;
        self.stripe.setup_intent(stripe_customer.as_deref()).await
    }

    /// Serialises the customer's billing requests (see the module docs):
    /// runs `work` holding the customer's billing lease, or answers 409 at
    /// once while another change of the customer holds it. The lease holds
    /// no connection (`ledger::leases`), so however many merchants change
    /// their billing at once, the pool stays free for every other route.
    async fn one_at_a_time<T>(
        &self,
        customer: Uuid,
        work: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        let holder = Uuid::new_v4();
        if !leases::take(
            &mut *self.db.acquire().await?,
            customer,
            holder,
            BILLING_LEASE,
        )
        .await?
        {
            return Err(ApiError::Conflict(
                "another billing change of this customer is under way; try again shortly".into(),
            ));
        }
        let mut lease = Lease {
            db: self.db.clone(),
            customer,
            holder,
            held: true,
        };
        let result = work.await;
        // Given back before the answer, so a retry right after it (another
        // card after a decline) finds it free.
        lease.give_back().await;
        result
    }

    /// The customer's Stripe customer: the one we stored, else one Stripe
    /// made for us earlier (found by its metadata), else a new one, stored
    /// at once; with `payment_method` attached as its default card.
    async fn stripe_customer_with(
        &self,
        customer: Uuid,
        payment_method: &str,
    ) -> Result<String, ApiError> {
        let id = match self.stored_stripe_customer(customer).await? {
            Some(id) => id,
            None => {
                let id = match self.stripe.find_customer(customer).await? {
                    Some(id) => id,
                    None => {
                        let me = customers::find(&mut *self.db.acquire().await?, customer)
                            .await?
                            .ok_or(ApiError::NotFound("customer"))?;
                        self.stripe
                            .create_customer(customer, &me.email, &me.name)
                            .await?
                    }
                };
                let sealed = self.sealer.seal(&id, &stripe_customer_place(customer));
                customers::set_stripe_customer(&mut *self.db.acquire().await?, customer, &sealed)
                    .await?;
                id
            }
        };
        self.stripe.attach(payment_method, &id).await?;
        Ok(id)
    }

    /// Subscribes the customer to `plan_id` with `payment_method`.
    pub async fn subscribe(
        &self,
        customer: Uuid,
        plan_id: &str,
        payment_method: &str,
    ) -> Result<SubscriptionRow, ApiError> {
        self.one_at_a_time(customer, async {
            let mut conn = self.db.acquire().await?;
            let (_, price) = stripe_plan(&mut conn, plan_id).await?;
            let current = billing::subscription(&mut conn, customer).await?;
            drop(conn);
            if current
                .as_ref()
                .is_some_and(|c| c.stripe_subscription_id.is_some() && c.status != "canceled")
            {
                return Err(ApiError::Conflict(
                    "already subscribed; change the plan instead".into(),
                ));
            }
            let stripe_customer = self.stripe_customer_with(customer, payment_method).await?;
            let sealed = self
                .sealer
                .seal(&stripe_customer, &stripe_customer_place(customer));
            // A live subscription at Stripe that our books do not show: the
            // reply to an earlier attempt lost to a timeout, or its
            // recording to a Postgres blip, and this is the merchant's
            // retry (with another card, so another idempotency key).
            // Adopted, never a second one made beside it.
            let live = self.stripe.live_subscriptions(&stripe_customer).await?;
            if let Some(newest) = live.into_iter().next() {
                let same_plan = newest.price == price;
                let row = self.record(customer, newest, Some(sealed)).await?;
                if same_plan {
                    return Ok(row);
                }
                return Err(ApiError::Conflict(
                    "a subscription to another plan is already live; change the plan instead"
                        .into(),
                ));
            }
            let follows = current
                .as_ref()
                .and_then(|c| c.stripe_subscription_id.as_deref());
            let made = self
                .stripe
                .subscribe(customer, &stripe_customer, &price, payment_method, follows)
                .await;
            let sub = match made {
                Ok(sub) => sub,
                // Its reply lost: the subscription Stripe made, if it did.
                Err(e @ ApiError::Unavailable(_)) => {
                    match self.stripe.live_subscriptions(&stripe_customer).await {
                        Ok(live) => live.into_iter().next().ok_or(e)?,
                        Err(_) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            };
            self.record(customer, sub, Some(sealed)).await
        })
        .await
    }

    /// Moves a Stripe subscription to another plan: an upgrade once its
    /// prorated invoice is paid (402 `payment_failed` with the card's
    /// decline, the old plan intact, when it is not), a downgrade at the
    /// period's end.
    pub async fn change_plan(
        &self,
        customer: Uuid,
        plan_id: &str,
    ) -> Result<SubscriptionRow, ApiError> {
        self.one_at_a_time(customer, async {
            let mut conn = self.db.acquire().await?;
            let (plan, price) = stripe_plan(&mut conn, plan_id).await?;
            let (sub, current_allowance) = stripe_subscription(&mut conn, customer).await?;
            drop(conn);
            let upgrade = !is_smaller(plan.tokens_per_month, current_allowance);
            match self.stripe.change_price(&sub, &price, upgrade).await {
                Ok(PlanChange::Done(facts)) => self.record(customer, facts, None).await,
                Ok(PlanChange::Unpaid(payment)) => Err(unpaid_upgrade(payment)),
                Err(e) => {
                    let done = |facts: &SubscriptionFacts| facts.price == price;
                    self.read_back(customer, &sub, e, done).await
                }
            }
        })
        .await
    }

    /// Cancels the Stripe subscription at the period's end, or at once.
    pub async fn cancel(
        &self,
        customer: Uuid,
        immediately: bool,
    ) -> Result<SubscriptionRow, ApiError> {
        self.one_at_a_time(customer, async {
            let mut conn = self.db.acquire().await?;
            let (sub, _) = stripe_subscription(&mut conn, customer).await?;
            drop(conn);
            match self.stripe.cancel(&sub, immediately).await {
                Ok(facts) => self.record(customer, facts, None).await,
                Err(e) => {
                    let done = |facts: &SubscriptionFacts| match immediately {
                        true => facts.status == "canceled",
                        false => facts.cancel_at_period_end,
                    };
                    self.read_back(customer, &sub, e, done).await
                }
            }
        })
        .await
    }

    /// After a change Stripe did not confirm, reads the subscription back
    /// and records it as it is: when the reply was lost (a timeout or a
    /// 5xx: Stripe may have done it), answered as done when `done` says
    /// it is; when Stripe refused it (a 4xx: the subscription ended there
    /// while its `deleted` event is still on its way), 404 once our books
    /// show the end too. Else the first error. Without this, a
    /// cancellation Stripe made would go unseen until its webhook or the
    /// reconciliation, and the merchant served meanwhile.
    async fn read_back(
        &self,
        customer: Uuid,
        subscription: &str,
        error: ApiError,
        done: impl Fn(&SubscriptionFacts) -> bool,
    ) -> Result<SubscriptionRow, ApiError> {
        let refused = matches!(error, ApiError::Validation(_));
        if !refused && !matches!(error, ApiError::Unavailable(_)) {
            return Err(error);
        }
        let Ok(facts) = self.stripe.subscription(subscription).await else {
            return Err(error);
        };
        let (finished, ended) = (done(&facts), facts.status == "canceled");
        let row = self.record(customer, facts, None).await?;
        match (refused, finished, ended) {
            (false, true, _) => Ok(row),
            (true, _, true) => Err(ApiError::NotFound("subscription")),
            _ => Err(error),
        }
    }

    /// Applies what Stripe answered, as its webhook will be applied, under
    /// the customer's row lock, and reads the subscription back.
    async fn record(
        &self,
        customer: Uuid,
        sub: SubscriptionFacts,
        stripe_customer: Option<String>,
    ) -> Result<SubscriptionRow, ApiError> {
        write_over(
            &self.accounts,
            &self.hot,
            self.grace,
            customer,
            sub,
            stripe_customer,
        )
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
                let stripe_customer = self.stored_stripe_customer(customer).await?;
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

/// Writes Stripe's state of a subscription over ours, as its webhook
/// would be applied ([`apply_subscription`]), under the customer's row
/// lock, and reads the subscription back: the reply to our own call, a
/// subscription adopted, the reconciliation's read.
pub(super) async fn write_over(
    accounts: &Accounts,
    hot: &HotStore,
    grace: chrono::Duration,
    customer: Uuid,
    sub: SubscriptionFacts,
    stripe_customer: Option<String>,
) -> Result<SubscriptionRow, ApiError> {
    let (hot, cadence) = (hot.clone(), accounts.cadence());
    accounts
        .change(customer, move |tx| {
            Box::pin(async move {
                let facts = Facts {
                    event_at: None,
                    grace,
                    cadence,
                    stripe_customer,
                };
                let (_, changes) = apply_subscription(tx, &hot, customer, &sub, facts).await?;
                let row = billing::subscription(tx, customer).await?.ok_or_else(|| {
                    ApiError::Internal(anyhow::anyhow!("subscription not written"))
                })?;
                Ok((row, changes))
            })
        })
        .await
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

/// How long a billing change may hold the customer's lease: past the
/// longest change (a handful of Stripe calls of at most 10 s each), so a
/// lease expires only when its holder died.
const BILLING_LEASE: std::time::Duration = std::time::Duration::from_secs(120);

/// A taken lease: given back when the work ends, or by a task of its own
/// when the work is dropped midway (its request cut short).
struct Lease {
    db: sqlx::PgPool,
    customer: Uuid,
    holder: Uuid,
    held: bool,
}

impl Lease {
    async fn give_back(&mut self) {
        self.held = false;
        give_back(&self.db, self.customer, self.holder).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.held {
            let (db, customer, holder) = (self.db.clone(), self.customer, self.holder);
            tokio::spawn(async move { give_back(&db, customer, holder).await });
        }
    }
}

async fn give_back(db: &sqlx::PgPool, customer: Uuid, holder: Uuid) {
    let given_back = match db.acquire().await {
        Ok(mut conn) => leases::give_back(&mut conn, customer, holder).await,
        Err(e) => Err(e),
    };
    if let Err(e) = given_back {
        tracing::warn!(%customer, error = %e, "could not give the billing lease back; it expires by itself");
    }
}

/// The customer's Stripe subscription and its plan's allowance.
async fn stripe_subscription(
    conn: &mut sqlx::PgConnection,
    customer: Uuid,
) -> Result<(String, i32), ApiError> {
    let row = billing::current_plan(conn, customer)
        .await?
        .ok_or(ApiError::NotFound("subscription"))?;
    match row {
        (Some(sub), allowance) => Ok((sub, allowance)),
        (None, _) => Err(ApiError::NotFound("subscription")),
    }
}

/// The answer to an upgrade whose invoice is not paid.
fn unpaid_upgrade(payment: Option<crate::stripe::Payment>) -> ApiError {
    let (message, client_secret) = match payment {
        Some(p) if p.status == "requires_action" => (
            "the upgrade's payment needs the customer's confirmation (3-D Secure); \
             the plan is unchanged until it is paid"
                .to_owned(),
            p.client_secret,
        ),
        Some(p) => (
            format!(
                "the upgrade's payment failed: {}; the plan is unchanged",
                p.error
                    .unwrap_or_else(|| "the card was declined".to_owned())
                    .trim_end_matches('.')
            ),
            None,
        ),
        None => (
            "the upgrade's invoice is not paid; the plan is unchanged until it is".to_owned(),
            None,
        ),
    };
    ApiError::PaymentFailed {
        message,
        client_secret,
    }
}
