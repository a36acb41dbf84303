//! One simulated world: the real service (its own database and Redis
//! prefix, the flusher and the scheduler driven step by step), Stripe's
//! stand-in on its test clock, and what the simulation knows to be true
//! (what Stripe charged for, what the service answered). Each step acts;
//! the invariants are checked after it (see `check_books`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use connected_apps::{domain::usage_drift::UsageDrift, period::Cadence};
use fred::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    helpers::{spawn_app_with, Customer, TestApp},
    steps::{shuffled, Card, Delivery, Step, OPERATOR_SHOP, SHOPS},
    stripe_clock::Failure,
    stripe_standin::StandIn,
};

/// Every billing period lasts this long, at Stripe and in the service.
pub const PERIOD_SECS: i64 = 2;
/// A consume this close to a period boundary may fall on either side:
/// checks that depend on the side are skipped for it.
const BOUNDARY_MARGIN_MS: i64 = 400;
/// How many subscription calls a slow Stripe step slows.
const SLOW_STRIPE_CALLS: u32 = 8;

/// What a run exercised, so a passing run shows it was not idle.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub consumes_charged: u64,
    pub refusals_checked: u64,
    pub refusals_near_a_boundary: u64,
    pub events_delivered: u64,
    pub rebuilds_compared: u64,
    pub books_checked: u64,
    pub periods_paid: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.consumes_charged += o.consumes_charged;
        self.refusals_checked += o.refusals_checked;
        self.refusals_near_a_boundary += o.refusals_near_a_boundary;
        self.events_delivered += o.events_delivered;
        self.rebuilds_compared += o.rebuilds_compared;
        self.books_checked += o.books_checked;
        self.periods_paid += o.periods_paid;
    }
}

/// A broken invariant: what, and at which step.
#[derive(Debug)]
pub struct Violation(pub String);

type Checked = Result<(), Violation>;

fn broken<T>(what: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(what.into()))
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn allowance_of_price(price: &str) -> i64 {
    match price {
        "price_starter_monthly" => 1_000,
        "price_pro_monthly" => 10_000,
        _ => -1,
    }
}

/// A period the merchant paid for, as Stripe (or the operator) says:
/// `[start, end)` in epoch ms and the largest allowance it had (an upgrade
/// opens at once, a downgrade waits for the next period).
#[derive(Debug, Clone, Copy)]
struct Window {
    start: i64,
    end: i64,
    allowance: i64,
}

struct Shop {
    customer: Customer,
    embed_key: String,
    /// The operator's anchor, for shop 2; periods count from it.
    anchor_ms: Option<i64>,
    /// Stripe's periods of this shop, oldest first (Stripe shops).
    windows: Vec<Window>,
    /// The live subscription Stripe had at the last look.
    live: Option<String>,
    /// Disputes opened: payment intent -> cents.
    disputes: HashMap<String, i64>,
    granted: i64,
}

pub struct World {
    app: TestApp,
    stripe: StandIn,
    shops: Vec<Shop>,
    /// Every event id a consume was answered 200 with.
    charged: HashSet<Uuid>,
    /// Events Stripe sent that wait for a later delivery.
    held: Vec<Value>,
    /// The seed, for the orders it draws (shuffles).
    seed: u64,
    step: u64,
    /// Whether a call of this step may be answered 503 (Stripe failing).
    stripe_failing: bool,
    pub tally: Tally,
}

impl World {
    pub async fn start(seed: u64) -> World {
        let stripe = StandIn::start().await;
        stripe.with_clock(PERIOD_SECS);
        let period = PERIOD_SECS.to_string();
        let app = spawn_app_with(&[
            ("STRIPE_API_BASE", &stripe.base()),
            ("STRIPE_SECRET_KEY", "sk_test_standin"),
            ("BILLING_PERIOD_SECONDS", &period),
        ])
        .await;
        let mut shops = Vec::new();
        for i in 0..SHOPS {
            let plan = (i == OPERATOR_SHOP).then_some("professional");
            let customer = app.create_customer(plan).await;
            app.activate(&customer, "rec-001").await;
            let (_, embed_key) = app
                .create_embed_key(&customer, json!({"app_permissions": ["rec-001"]}))
                .await;
            let anchor_ms = match plan {
                Some(_) => Some(
                    sqlx::query_scalar::<_, DateTime<Utc>>(
                        "SELECT billing_cycle_start FROM customer_billing WHERE customer_id = $1",
                    )
                    .bind(customer.id)
                    .fetch_one(&app.db)
                    .await
                    .unwrap()
                    .timestamp_millis(),
                ),
                None => None,
            };
            shops.push(Shop {
                customer,
                embed_key,
                anchor_ms,
                windows: Vec::new(),
                live: None,
                disputes: HashMap::new(),
                granted: 0,
            });
        }
        World {
            app,
            stripe,
            shops,
            charged: HashSet::new(),
            held: Vec::new(),
            seed,
            step: 0,
            stripe_failing: false,
            tally: Tally::default(),
        }
    }

    /// Runs one step and checks what must hold after it.
    pub async fn run(&mut self, step: Step) -> Checked {
        self.step += 1;
        let sent_at = now_ms();
        self.stripe.advance(sent_at / 1000);
        self.observe(sent_at);
        self.act(step).await?;
        self.stripe_failing = self.stripe.failures_pending();
        self.observe(sent_at);
        Ok(())
    }

    /// The end of a sequence: every event delivered, the reconciliation
    /// run, the streams drained; then the books must agree with Stripe.
    pub async fn settle(&mut self) -> Checked {
        // The end state is read with Stripe answering at once: with two-
        // second periods, a Stripe slow to answer subscription calls makes
        // the final delivery (a read of Stripe for each renewal event close
        // to our last read) fall further behind the clock than it catches up.
        self.stripe.slow_subscriptions(Duration::ZERO);
        let now = now_ms();
        self.stripe.advance(now / 1000);
        self.observe(now);
        self.deliver(Delivery::InOrder).await?;
        self.reconcile().await?;
        self.deliver(Delivery::InOrder).await?;
        self.flush(false).await?;
        for i in 0..OPERATOR_SHOP {
            let truth = self
                .stripe
                .live_subscription_of(&self.shops[i].customer.id.to_string());
            let ours: Option<(Option<String>, String)> = sqlx::query_as(
                "SELECT stripe_subscription_id, status FROM customer_billing WHERE customer_id = $1",
            )
            .bind(self.shops[i].customer.id)
            .fetch_optional(&self.app.db)
            .await
            .unwrap();
            let ours_live = ours
                .as_ref()
                .filter(|(_, status)| status != "canceled")
                .and_then(|(id, _)| id.clone());
            let truth_id = truth
                .as_ref()
                .and_then(|s| s["id"].as_str())
                .map(str::to_owned);
            if ours_live != truth_id {
                return broken(format!(
                    "shop {i}: Stripe bills {truth_id:?}, the books show {ours:?}"
                ));
            }
        }
        Ok(())
    }

    /// Records what Stripe says each shop pays for now: a new window when
    /// a subscription begins (no earlier than the step that made it) or a
    /// period renews, the largest allowance seen within a window, and the
    /// end of the last window when the subscription ends.
    fn observe(&mut self, step_started: i64) {
        for shop in self.shops.iter_mut().take(OPERATOR_SHOP) {
            let truth = self
                .stripe
                .live_subscription_of(&shop.customer.id.to_string());
            let Some(sub) = truth else {
                if shop.live.take().is_some() {
                    if let Some(last) = shop.windows.last_mut() {
                        last.end = last.end.min(now_ms());
                    }
                }
                continue;
            };
            let id = sub["id"].as_str().unwrap_or_default().to_owned();
            let item = &sub["items"]["data"][0];
            let start = item["current_period_start"].as_i64().unwrap_or(0) * 1000;
            let end = item["current_period_end"].as_i64().unwrap_or(0) * 1000;
            let allowance = allowance_of_price(item["price"]["id"].as_str().unwrap_or_default());
            if shop.live.as_deref() != Some(id.as_str()) {
                if let Some(last) = shop.windows.last_mut() {
                    last.end = last.end.min(step_started);
                }
                shop.windows.push(Window {
                    start: start.max(step_started),
                    end,
                    allowance,
                });
                shop.live = Some(id);
                continue;
            }
            let last = shop
                .windows
                .last_mut()
                .expect("a live subscription has a window");
            if last.end == end {
                last.allowance = wider(last.allowance, allowance);
                continue;
            }
            // Renewed, through one boundary or several.
            let mut at = last.end;
            while at < end {
                let next_end = (at + PERIOD_SECS * 1000).min(end);
                shop.windows.push(Window {
                    start: at,
                    end: next_end,
                    allowance,
                });
                at = next_end;
            }
        }
    }

    /// Whether a boundary of the shop's periods lies near `[from, to]`.
    fn near_boundary(&self, shop: usize, from: i64, to: i64) -> bool {
        let near = |b: i64| b >= from - BOUNDARY_MARGIN_MS && b <= to + BOUNDARY_MARGIN_MS;
        let s = &self.shops[shop];
        if let Some(anchor) = s.anchor_ms {
            let period = PERIOD_SECS * 1000;
            let n = (from - anchor).div_euclid(period);
            return (n - 1..=n + 2).any(|k| near(anchor + k * period));
        }
        s.windows.iter().any(|w| near(w.start) || near(w.end))
    }

    /// The window a charge at `at` belongs to, for a Stripe shop, or the
    /// operator's period for shop 2.
    fn window_at(&self, shop: usize, at: i64) -> Option<Window> {
        let s = &self.shops[shop];
        if let Some(anchor) = s.anchor_ms {
            let period = PERIOD_SECS * 1000;
            let n = (at - anchor).div_euclid(period);
            return Some(Window {
                start: anchor + n * period,
                end: anchor + (n + 1) * period,
                allowance: 10_000,
            });
        }
        s.windows
            .iter()
            .rev()
            .find(|w| w.start <= at && at < w.end)
            .copied()
    }

    async fn act(&mut self, step: Step) -> Checked {
        match step {
            Step::Subscribe { shop, plan, card } => {
                self.billing_call(
                    shop,
                    "POST",
                    "/api/v1/customer/billing/subscribe",
                    json!({"plan_id": plan, "payment_method_id": card.id()}),
                    &[201, 409, 422],
                )
                .await
            }
            Step::ChangePlan { shop, plan } => {
                self.billing_call(
                    shop,
                    "PATCH",
                    "/api/v1/customer/billing/subscription",
                    json!({"plan_id": plan}),
                    &[200, 402, 404, 409, 422],
                )
                .await
            }
            Step::Cancel { shop, at_once } => {
                let path = format!("/api/v1/customer/billing/subscription?immediately={at_once}");
                self.billing_call(shop, "DELETE", &path, Value::Null, &[200, 404, 409])
                    .await
            }
            Step::SetCard { card } => {
                self.stripe.set_default_card(card.id());
                Ok(())
            }
            Step::Buy { shop, tokens, card } => self.buy(shop, tokens, card).await,
            Step::Confirm { shop } => {
                let waiting = self
                    .purchases(shop)
                    .into_iter()
                    .find(|pi| pi["status"] == json!("requires_action"));
                if let Some(pi) = waiting {
                    self.stripe.confirm(pi["id"].as_str().unwrap_or_default());
                }
                Ok(())
            }
            Step::Refund {
                shop,
                purchase,
                percent,
            } => {
                if let Some((pi, amount)) = self.paid_purchase(shop, purchase) {
                    self.stripe.refund(&pi, amount * percent / 100);
                }
                Ok(())
            }
            Step::OpenDispute { shop, purchase } => {
                if let Some((pi, amount)) = self.paid_purchase(shop, purchase) {
                    if !self.shops[shop].disputes.contains_key(&pi) {
                        let cents = amount / 2;
                        self.stripe.open_dispute(&pi, cents);
                        self.shops[shop].disputes.insert(pi, cents);
                    }
                }
                Ok(())
            }
            Step::CloseDispute {
                shop,
                purchase,
                won,
            } => {
                if let Some((pi, _)) = self.paid_purchase(shop, purchase) {
                    if let Some(cents) = self.shops[shop].disputes.remove(&pi) {
                        self.stripe.close_dispute(&pi, cents, won);
                    }
                }
                Ok(())
            }
            Step::Consume {
                shop,
                tokens,
                embed_key,
                retried,
            } => self.consume(shop, tokens, embed_key, retried).await,
            Step::Grant { shop, tokens } => {
                self.app.grant(self.shops[shop].customer.id, tokens).await;
                self.shops[shop].granted += tokens;
                Ok(())
            }
            Step::Advance { boundaries } => {
                let period = PERIOD_SECS * 1000;
                let wait = if boundaries == 0 {
                    150
                } else {
                    // Just past the `boundaries`-th whole period boundary.
                    let now = now_ms();
                    (now / period + i64::from(boundaries)) * period + 60 - now
                };
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                Ok(())
            }
            Step::Deliver(how) => self.deliver(how).await,
            Step::Reconcile => self.reconcile().await,
            Step::Scheduler => {
                let periods = connected_apps::domain::billing::Periods::new(
                    self.app.db.clone(),
                    self.app.state.hot.clone(),
                    Cadence::Seconds(PERIOD_SECS),
                );
                periods
                    .roll_ended(Utc::now())
                    .await
                    .map_err(|e| Violation(format!("the scheduler's rollover failed: {e}")))?;
                Ok(())
            }
            Step::WipeAccount { shop } => self.wipe(shop).await,
            Step::Flush { killed } => self.flush(killed).await,
            Step::StripeSlow { millis } => {
                // Slow for its next few calls, not for the rest of the
                // sequence: with two-second periods, a Stripe slow for good
                // makes a delivery of a backlog of renewals (a read of
                // Stripe each) fall further behind the clock than it
                // catches up, and the sequence never ends.
                self.stripe
                    .slow_subscription_calls(Duration::from_millis(millis), SLOW_STRIPE_CALLS);
                Ok(())
            }
            Step::StripeFails { lose_reply } => {
                self.stripe.fail_next(if lose_reply {
                    Failure::LoseReply
                } else {
                    Failure::Refuse
                });
                self.stripe_failing = true;
                Ok(())
            }
        }
    }

    /// A billing request whose answer must be one of `expected`, or a 503
    /// while Stripe is made to fail; never a 500.
    async fn billing_call(
        &mut self,
        shop: usize,
        method: &str,
        path: &str,
        body: Value,
        expected: &[u16],
    ) -> Checked {
        let token = self.shops[shop].customer.token.clone();
        let (status, answer) = match method {
            "POST" => self.app.post_json(path, &token, body).await,
            "PATCH" => self.app.patch_json(path, &token, body).await,
            _ => self.app.delete_json(path, &token).await,
        };
        if expected.contains(&status) || (status == 503 && self.stripe_failing) {
            return Ok(());
        }
        broken(format!("{method} {path} answered {status}: {answer}"))
    }

    async fn buy(&mut self, shop: usize, tokens: i64, card: Card) -> Checked {
        let response = self
            .app
            .http
            .post(self.app.url("/api/v1/customer/billing/tokens/purchase"))
            .bearer_auth(&self.shops[shop].customer.token)
            .header("Idempotency-Key", Uuid::new_v4().to_string())
            .json(&json!({"tokens": tokens, "payment_method_id": card.id()}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200 | 422 => Ok(()),
            503 if self.stripe_failing => Ok(()),
            _ => broken(format!("a purchase answered {status}: {body}")),
        }
    }

    /// The shop's payment intents at Stripe, oldest first.
    fn purchases(&self, shop: usize) -> Vec<Value> {
        self.stripe
            .payment_intents_of(&self.shops[shop].customer.id.to_string())
    }

    /// The `n`-th purchase of the shop, when Stripe took its money: its
    /// payment intent and amount.
    fn paid_purchase(&self, shop: usize, n: usize) -> Option<(String, i64)> {
        let intent = self.purchases(shop).into_iter().nth(n)?;
        (intent["status"] == json!("succeeded")).then(|| {
            (
                intent["id"].as_str().unwrap_or_default().to_owned(),
                intent["amount"].as_i64().unwrap_or(0),
            )
        })
    }

    async fn consume(
        &mut self,
        shop: usize,
        tokens: i64,
        embed_key: bool,
        retried: bool,
    ) -> Checked {
        let s = &self.shops[shop];
        let (credential, body, tokens) = if embed_key {
            // The app's own cost: an embed key charges what the app costs.
            (s.embed_key.clone(), json!({"app_id": "rec-001"}), 2)
        } else {
            (
                s.customer.token.clone(),
                json!({"app_id": "rec-001", "tokens_consumed": tokens}),
                tokens,
            )
        };
        let key = Uuid::new_v4().to_string();
        let send = || {
            let request = self
                .app
                .http
                .post(self.app.url("/api/v1/customer/tokens/consume"))
                .bearer_auth(&credential)
                .json(&body);
            let request = if retried {
                request.header("Idempotency-Key", &key)
            } else {
                request
            };
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (
                    status,
                    response.json::<Value>().await.unwrap_or(Value::Null),
                )
            }
        };
        let from = now_ms();
        let (status, answer) = send().await;
        let to = now_ms();
        if retried {
            let (again, replayed) = send().await;
            if status == 200 && (again != 200 || replayed["event_id"] != answer["event_id"]) {
                return broken(format!(
                    "a retry under one Idempotency-Key answered {again} {replayed} after {answer}"
                ));
            }
            if status != 200 && again == 200 {
                if let Some(event) = replayed["event_id"].as_str().and_then(|e| e.parse().ok()) {
                    self.charged.insert(event);
                }
            }
        }
        match (status, answer["error"]["code"].as_str()) {
            (200, _) => {
                let event: Uuid = answer["event_id"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .map_err(|_| Violation(format!("a charge without an event id: {answer}")))?;
                self.charged.insert(event);
                self.tally.consumes_charged += 1;
                Ok(())
            }
            (402, Some("insufficient_tokens")) => self.check_refusal(shop, tokens, from, to).await,
            (403, Some("subscription_inactive")) | (402, Some("subscription_inactive")) => {
                self.check_status_refusal(shop, from, to).await
            }
            _ if status < 500 && shop != OPERATOR_SHOP => Ok(()),
            _ => broken(format!(
                "a consume of shop {shop} answered {status}: {answer}"
            )),
        }
    }

    /// Refused for its status: never while Stripe bills the shop for a
    /// live subscription that the service has recorded.
    async fn check_status_refusal(&mut self, shop: usize, from: i64, to: i64) -> Checked {
        if shop == OPERATOR_SHOP {
            return broken("the operator's shop was refused for its status");
        }
        if self.near_boundary(shop, from, to) {
            self.tally.refusals_near_a_boundary += 1;
            return Ok(());
        }
        self.tally.refusals_checked += 1;
        let Some(live) = &self.shops[shop].live else {
            return Ok(());
        };
        let ours: Option<Option<String>> = sqlx::query_scalar(
            "SELECT stripe_subscription_id FROM customer_billing WHERE customer_id = $1",
        )
        .bind(self.shops[shop].customer.id)
        .fetch_optional(&self.app.db)
        .await
        .unwrap();
        if ours.flatten().as_deref() == Some(live.as_str()) {
            return broken(format!(
                "shop {shop} was refused for its status while Stripe bills {live}, which the service holds"
            ));
        }
        Ok(())
    }

    /// Refused for its balance: never while the period's allowance left
    /// plus the purchased tokens cover the request, when the service knows
    /// the plan Stripe bills.
    async fn check_refusal(&mut self, shop: usize, tokens: i64, from: i64, to: i64) -> Checked {
        if self.near_boundary(shop, from, to) {
            self.tally.refusals_near_a_boundary += 1;
            return Ok(());
        }
        let Some(window) = self.window_at(shop, from) else {
            return Ok(());
        };
        if shop != OPERATOR_SHOP && !self.service_knows_the_plan(shop, window).await {
            return Ok(());
        }
        self.drain().await?;
        self.tally.refusals_checked += 1;
        let customer = self.shops[shop].customer.id;
        let (used, purchased): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE((SELECT SUM(tokens_consumed - purchased_tokens_consumed) FROM token_usage \
                              WHERE customer_id = $1 AND created_at >= $2 AND created_at < $3), 0)::int8, \
                    (SELECT purchased_tokens_credited - purchased_tokens_used FROM customers WHERE id = $1)",
        )
        .bind(customer)
        .bind(DateTime::from_timestamp_millis(window.start))
        .bind(DateTime::from_timestamp_millis(window.end))
        .fetch_one(&self.app.db)
        .await
        .unwrap();
        let left = if window.allowance < 0 {
            i64::MAX
        } else {
            (window.allowance - used).max(0) + purchased
        };
        if left >= tokens {
            return broken(format!(
                "shop {shop} was refused {tokens} tokens with {left} left in {window:?} (used {used}, purchased {purchased})"
            ));
        }
        Ok(())
    }

    /// Whether the service holds the subscription Stripe bills, on the
    /// plan (or the pending downgrade) whose allowance the window has.
    async fn service_knows_the_plan(&self, shop: usize, window: Window) -> bool {
        let Some(live) = &self.shops[shop].live else {
            return false;
        };
        let ours: Option<(Option<String>, i32, Option<String>)> = sqlx::query_as(
            "SELECT b.stripe_subscription_id, p.tokens_per_month, b.status FROM customer_billing b \
             JOIN billing_plans p ON p.id = b.plan_id WHERE b.customer_id = $1",
        )
        .bind(self.shops[shop].customer.id)
        .fetch_optional(&self.app.db)
        .await
        .unwrap();
        matches!(ours, Some((Some(id), allowance, _)) if &id == live && i64::from(allowance) == window.allowance)
    }

    async fn deliver(&mut self, how: Delivery) -> Checked {
        let mut events = std::mem::take(&mut self.held);
        events.extend(self.stripe.take_events());
        match how {
            Delivery::InOrder => {}
            Delivery::Shuffled => shuffled(&mut events, self.seed ^ self.step),
            Delivery::Twice => {
                events = events.into_iter().flat_map(|e| [e.clone(), e]).collect();
            }
            Delivery::HoldHalf => {
                let later = events.split_off(events.len() / 2);
                self.held = later;
            }
            Delivery::DropSubscriptionEvents => events.retain(|e| {
                !e["type"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("customer.subscription.")
            }),
        }
        for event in events {
            let (status, answer) = self
                .app
                .stripe_event(
                    event["id"].as_str().unwrap_or_default(),
                    event["type"].as_str().unwrap_or_default(),
                    event["created"].as_i64().unwrap_or(0),
                    event["data"]["object"].clone(),
                )
                .await;
            if status != 200 {
                return broken(format!(
                    "Stripe's {} was answered {status}: {answer}",
                    event["type"]
                ));
            }
            self.tally.events_delivered += 1;
        }
        Ok(())
    }

    async fn reconcile(&mut self) -> Checked {
        let (status, report) = self
            .app
            .post_json(
                "/api/v1/admin/billing/reconcile",
                &self.app.admin_token(),
                json!({}),
            )
            .await;
        if status != 200 {
            return broken(format!("the reconciliation answered {status}: {report}"));
        }
        if report["failed"] != json!(0) && !self.stripe_failing {
            return broken(format!("the reconciliation failed: {report}"));
        }
        Ok(())
    }

    /// Redis loses the shop's account hash: the balance the service shows
    /// before and after its rebuild is the same.
    async fn wipe(&mut self, shop: usize) -> Checked {
        let token = self.shops[shop].customer.token.clone();
        let from = now_ms();
        let (_, before) = self
            .app
            .get_json("/api/v1/customer/tokens/usage", &token)
            .await;
        self.app
            .lose_account_hash(self.shops[shop].customer.id)
            .await;
        let (status, after) = self
            .app
            .get_json("/api/v1/customer/tokens/usage", &token)
            .await;
        let to = now_ms();
        if status != 200 {
            return broken(format!("the usage after a wipe answered {status}: {after}"));
        }
        let balance = |v: &Value| {
            let p = &v["current_period"];
            (
                p["tokens_used"].clone(),
                p["tokens_remaining"].clone(),
                p["tokens_total"].clone(),
            )
        };
        if self.near_boundary(shop, from, to) {
            return Ok(());
        }
        self.tally.rebuilds_compared += 1;
        if balance(&before) != balance(&after) {
            return broken(format!(
                "a rebuild changed shop {shop}'s balance: {:?} before, {:?} after",
                balance(&before),
                balance(&after)
            ));
        }
        Ok(())
    }

    /// Persists every usage event, after killing a flusher mid-batch when
    /// asked; then the books are checked.
    async fn flush(&mut self, killed: bool) -> Checked {
        if killed {
            // A process of its own: its connections die with it, as a
            // killed process's do.
            let pool = connected_apps::ledger::pool(&self.app.settings.database).unwrap();
            let mut settings = self.app.settings.flusher.clone();
            settings.consumer_name = format!("sim-killed-{}", self.step);
            let mut flusher = connected_apps::workers::flusher::Flusher::connect(
                &self.app.settings.redis,
                pool.clone(),
                settings,
            )
            .await
            .unwrap();
            let step = tokio::spawn(async move { flusher.step().await });
            tokio::time::sleep(Duration::from_millis(self.step % 7)).await;
            step.abort();
            let _ = step.await;
            pool.close().await;
        }
        self.drain().await?;
        self.check_books().await
    }

    /// Drains the streams, claiming what a killed flusher left pending.
    async fn drain(&mut self) -> Checked {
        let mut flusher = self.app.flusher_named("sim-flusher", 100).await;
        for _ in 0..50 {
            flusher
                .claim_abandoned()
                .await
                .map_err(|e| Violation(format!("claiming failed: {e}")))?;
            while flusher
                .step()
                .await
                .map_err(|e| Violation(format!("a flush failed: {e}")))?
                > 0
            {}
            if self.app.pending_entries().await == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(110)).await;
        }
        broken("the streams did not drain")
    }

    /// The invariants on the books, after a drain:
    /// 1. every charge answered 200 is in the ledger exactly once, and
    ///    nothing else is;
    /// 2. in no period did a merchant draw more allowance than the period
    ///    it paid for, nor any outside a paid period;
    /// 3. purchased tokens are never overdrawn, nor more credited than
    ///    Stripe was paid for plus grants;
    /// 4. the hot state agrees with the ledger (the drift check finds
    ///    nothing).
    async fn check_books(&mut self) -> Checked {
        let rows: Vec<(Uuid, Uuid, DateTime<Utc>, i32, i32)> = sqlx::query_as(
            "SELECT id, customer_id, created_at, tokens_consumed, purchased_tokens_consumed FROM token_usage",
        )
        .fetch_all(&self.app.db)
        .await
        .unwrap();
        let ids: HashSet<Uuid> = rows.iter().map(|r| r.0).collect();
        if ids.len() != rows.len() {
            return broken("an event has two rows");
        }
        if ids != self.charged {
            let lost: Vec<_> = self.charged.difference(&ids).collect();
            let extra: Vec<_> = ids.difference(&self.charged).collect();
            return broken(format!(
                "the ledger lost {lost:?} and holds unanswered {extra:?}"
            ));
        }
        for shop in 0..SHOPS {
            let customer = self.shops[shop].customer.id;
            let mut per_window: HashMap<i64, (Window, i64)> = HashMap::new();
            for (_, _, at, tokens, purchased) in rows.iter().filter(|r| r.1 == customer) {
                let drawn = i64::from(tokens - purchased);
                if drawn == 0 {
                    continue;
                }
                let at = at.timestamp_millis();
                let Some(window) = self.window_at(shop, at) else {
                    return broken(format!(
                        "shop {shop} drew {drawn} allowance at {at}, outside any period it paid for"
                    ));
                };
                per_window.entry(window.start).or_insert((window, 0)).1 += drawn;
            }
            for (window, drawn) in per_window.values() {
                if window.allowance >= 0 && *drawn > window.allowance {
                    return broken(format!(
                        "shop {shop} drew {drawn} in {window:?}, past its allowance"
                    ));
                }
            }
            let (credited, used): (i64, i64) = sqlx::query_as(
                "SELECT purchased_tokens_credited, purchased_tokens_used FROM customers WHERE id = $1",
            )
            .bind(customer)
            .fetch_one(&self.app.db)
            .await
            .unwrap();
            let bought: i64 = self
                .purchases(shop)
                .iter()
                .filter(|pi| pi["status"] == json!("succeeded"))
                .map(|pi| {
                    pi["metadata"]["tokens"]
                        .as_str()
                        .and_then(|t| t.parse::<i64>().ok())
                        .unwrap_or(0)
                })
                .sum();
            if used > credited || credited > bought + self.shops[shop].granted {
                return broken(format!(
                    "shop {shop}: purchased credited {credited}, used {used}, bought {bought}, granted {}",
                    self.shops[shop].granted
                ));
            }
        }
        let drift = UsageDrift::new(self.app.db.clone(), self.app.state.hot.clone())
            .check()
            .await
            .map_err(|e| Violation(format!("the drift check failed: {e}")))?;
        if let Some((customer, _, _)) = drift.drifted.first() {
            let hot: HashMap<String, String> = self
                .app
                .redis
                .hgetall(self.app.state.hot.keys().account(*customer))
                .await
                .unwrap();
            let hot: Vec<_> = [
                "used",
                "allowance",
                "period_start",
                "period_end",
                "next_ends",
            ]
            .iter()
            .map(|f| {
                (
                    f,
                    hot.get(*f).map(|v| v.chars().take(40).collect::<String>()),
                )
            })
            .collect();
            let ledger: Option<(DateTime<Utc>, DateTime<Utc>, String)> = sqlx::query_as(
                "SELECT billing_cycle_start, billing_cycle_end, status FROM customer_billing WHERE customer_id = $1",
            )
            .bind(customer)
            .fetch_optional(&self.app.db)
            .await
            .unwrap();
            let charges: Vec<(i64, i32)> = rows
                .iter()
                .filter(|r| r.1 == *customer)
                .map(|r| (r.2.timestamp_millis(), r.3 - r.4))
                .collect();
            return broken(format!(
                "hot state and ledger differ: {:?}; hot {hot:?}; ledger period {ledger:?}; charges {charges:?}",
                drift.drifted
            ));
        }
        self.tally.books_checked += 1;
        self.tally.periods_paid = self.shops.iter().map(|s| s.windows.len() as u64).sum();
        Ok(())
    }
}

/// The larger of two allowances, -1 (unlimited) the largest.
fn wider(a: i64, b: i64) -> i64 {
    if a < 0 || b < 0 {
        -1
    } else {
        a.max(b)
    }
}
