//! A stand-in for Stripe's API that keeps state and behaves as Stripe
//! documents it, for the billing scenarios that depend on Stripe's real
//! behaviour rather than on one canned answer:
//!
//! - idempotency keys: the same key and parameters get the saved reply,
//!   the same key with other parameters a 400 `idempotency_error`, and
//!   keys are forgotten after 24 hours ([`StandIn::forget_keys`]);
//! - customers searchable by metadata (`/v1/customers/search`);
//! - Stripe's test cards: `pm_card_visa` pays, `pm_card_chargeDeclined`
//!   attaches but declines every charge with `card_declined`,
//!   `pm_card_authenticationRequired` needs 3-D Secure;
//! - subscriptions created with `error_if_incomplete` (a declined first
//!   invoice is a 402 and nothing is created); price changes invoiced at
//!   once with `always_invoice` and, unpaid, either kept pending
//!   (`pending_if_incomplete`: old price, `pending_update`, the open
//!   invoice as `latest_invoice`) or applied anyway (`allow_incomplete`,
//!   the default: new price, `past_due`);
//! - an invoice's payments (`/v1/invoice_payments?invoice=…`) and their
//!   payment intents, with the decline as `last_payment_error`.
//!
//! Objects are Stripe's published fixtures (`stripe/*.json`) with the
//! fields that matter set.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use serde_json::{json, Value};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub fn fixture(name: &str) -> Value {
    let text = match name {
        "customer" => include_str!("stripe/customer.json"),
        "subscription" => include_str!("stripe/subscription.json"),
        "setup_intent" => include_str!("stripe/setup_intent.json"),
        "payment_intent" => include_str!("stripe/payment_intent.json"),
        "payment_method" => include_str!("stripe/payment_method.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).unwrap()
}

/// The prices of the seeded plans.
pub const STARTER: &str = "price_starter_monthly";
pub const PROFESSIONAL: &str = "price_pro_monthly";
pub const ENTERPRISE: &str = "price_enterprise_monthly";

/// What Stripe holds.
#[derive(Default)]
pub(crate) struct World {
    pub(crate) next: u32,
    pub(crate) customers: Vec<Value>,
    /// Customer id -> its default card.
    pub(crate) default_card: HashMap<String, String>,
    pub(crate) subscriptions: HashMap<String, Value>,
    pub(crate) payment_intents: HashMap<String, Value>,
    /// Invoice id -> its payment intent.
    pub(crate) invoice_payments: HashMap<String, String>,
    /// Idempotency key -> the parameters sent with it and the reply.
    pub(crate) keys: HashMap<String, (String, u16, Value)>,
    /// Every request: method, path, form body.
    pub(crate) calls: Vec<(String, String, String)>,
    /// How long subscription calls take.
    pub(crate) subscription_delay: Duration,
    /// How many more subscription calls take that long, when counted
    /// (`slow_subscription_calls`); `None`: every call from now on.
    pub(crate) slow_calls_left: Option<u32>,
    /// Every customer's default card from now on, when set.
    pub(crate) card_override: Option<String>,
    /// Whether `POST /v1/subscriptions` does its work and answers 500.
    pub(crate) lose_replies: bool,
    /// The test clock (`stripe_clock`): periods' length and the events
    /// waiting to be delivered, when one is on.
    pub(crate) clock: Option<crate::stripe_clock::Clock>,
}

impl World {
    pub(crate) fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}_standin{}", self.next)
    }
}

#[derive(Clone)]
pub struct StandIn {
    pub server: Arc<MockServer>,
    pub(crate) world: Arc<Mutex<World>>,
}

fn form(request: &Request) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn card_error(message: &str, code: &str) -> (u16, Value) {
    (
        402,
        json!({"error": {"type": "card_error", "code": code, "decline_code": "generic_decline",
                          "message": message}}),
    )
}

/// Whether a charge to `card` succeeds, and if not how it fails.
fn charge(card: &str) -> Result<(), (&'static str, &'static str)> {
    match card {
        "pm_card_chargeDeclined" => Err(("card_declined", "Your card was declined.")),
        "pm_card_authenticationRequired" => Err((
            "authentication_required",
            "This payment requires authentication.",
        )),
        _ => Ok(()),
    }
}

impl StandIn {
    pub async fn start() -> Self {
        let standin = StandIn {
            server: Arc::new(MockServer::start().await),
            world: Arc::default(),
        };
        Mock::given(wiremock::matchers::any())
            .respond_with(Responder(standin.world.clone()))
            .mount(&standin.server)
            .await;
        standin
    }

    pub fn base(&self) -> String {
        format!("{}/", self.server.uri())
    }

    /// Stripe forgets idempotency keys after 24 hours.
    pub fn forget_keys(&self) {
        self.world.lock().unwrap().keys.clear();
    }

    /// Every customer's default card from now on (a card that expired,
    /// say): `pm_card_chargeDeclined` makes their next invoice decline.
    pub fn set_default_card(&self, card: &str) {
        self.world.lock().unwrap().card_override = Some(card.to_owned());
    }

    /// Subscription calls answer after `delay` (a slow Stripe).
    pub fn slow_subscriptions(&self, delay: Duration) {
        let mut world = self.world.lock().unwrap();
        world.subscription_delay = delay;
        world.slow_calls_left = None;
    }

    /// The next `calls` subscription calls answer after `delay`, the ones
    /// after them at once: a Stripe slow for a while.
    #[allow(dead_code)] // The billing simulation's (tests/simulation.rs).
    pub fn slow_subscription_calls(&self, delay: Duration, calls: u32) {
        let mut world = self.world.lock().unwrap();
        world.subscription_delay = delay;
        world.slow_calls_left = Some(calls);
    }

    /// The requests made to `path` with `method`, as form bodies.
    pub fn calls(&self, method: &str, path: &str) -> Vec<HashMap<String, String>> {
        self.world
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(m, p, _)| m == method && p == path)
            .map(|(_, _, body)| {
                form_urlencoded::parse(body.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .collect()
    }

    pub fn customers(&self) -> usize {
        self.world.lock().unwrap().customers.len()
    }

    /// A subscription as Stripe holds it now.
    pub fn subscription(&self, id: &str) -> Value {
        self.world.lock().unwrap().subscriptions[id].clone()
    }

    /// Creates a subscription at Stripe without telling anyone (in
    /// Stripe's dashboard, or by a call whose reply was lost): returns it.
    pub fn subscribe_behind_our_back(
        &self,
        stripe_customer: &str,
        price: &str,
        ours: &str,
    ) -> Value {
        let mut world = self.world.lock().unwrap();
        let id = world.id("sub");
        let sub = subscription(&id, stripe_customer, price, ours);
        world.subscriptions.insert(id, sub.clone());
        sub
    }

    /// Makes every subscription call fail from now on as a timeout would
    /// look to the caller: Stripe does the work, the reply is lost (a 500
    /// after the change, which the client reports as Stripe failing), and
    /// listing subscriptions fails too.
    pub fn lose_subscription_replies(&self, lose: bool) {
        self.world.lock().unwrap().lose_replies = lose;
    }

    /// Edits a subscription at Stripe without telling anyone.
    pub fn edit_subscription(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        let mut world = self.world.lock().unwrap();
        edit(world.subscriptions.get_mut(id).unwrap());
    }

    /// Changes a subscription at Stripe without telling anyone (a change
    /// in the dashboard whose webhook never arrived).
    pub fn change_behind_our_back(&self, id: &str, price: &str, status: &str) {
        let mut world = self.world.lock().unwrap();
        let sub = world.subscriptions.get_mut(id).unwrap();
        sub["items"]["data"][0]["price"]["id"] = json!(price);
        sub["status"] = json!(status);
    }

    fn route(world: &mut World, method: &str, path: &str, request: &Request) -> (u16, Value) {
        let params = form(request);
        let segments: Vec<&str> = path.trim_start_matches("/v1/").split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", ["customers", "search"]) => {
                let query = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "query")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let wanted = query.split('\'').nth(3).unwrap_or_default().to_owned();
                let data: Vec<Value> = world
                    .customers
                    .iter()
                    .filter(|c| c["metadata"]["customer_id"] == json!(wanted))
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"object": "search_result", "data": data, "has_more": false,
                           "next_page": null, "url": "/v1/customers/search"}),
                )
            }
            ("POST", ["customers"]) => {
                let mut customer = fixture("customer");
                customer["id"] = json!(world.id("cus"));
                customer["email"] = json!(params.get("email"));
                customer["metadata"] = json!({"customer_id": params.get("metadata[customer_id]")});
                world.customers.push(customer.clone());
                (200, customer)
            }
            ("POST", ["customers", id]) => {
                if let Some(card) = params.get("invoice_settings[default_payment_method]") {
                    world.default_card.insert((*id).to_owned(), card.clone());
                }
                let found = world
                    .customers
                    .iter()
                    .find(|c| c["id"] == json!(id))
                    .cloned();
                match found {
                    Some(c) => (200, c),
                    None => (
                        404,
                        json!({"error": {"type": "invalid_request_error", "message": "No such customer"}}),
                    ),
                }
            }
            ("POST", ["payment_methods", card, "attach"]) => {
                let mut pm = fixture("payment_method");
                pm["id"] = json!(card);
                pm["customer"] = json!(params.get("customer"));
                (200, pm)
            }
            ("POST", ["subscriptions"]) => {
                let card = params
                    .get("default_payment_method")
                    .cloned()
                    .unwrap_or_default();
                if let Err((code, message)) = charge(&card) {
                    // error_if_incomplete: nothing is created.
                    return card_error(message, code);
                }
                let id = world.id("sub");
                let customer_id = params
                    .get("metadata[customer_id]")
                    .cloned()
                    .unwrap_or_default();
                let sub = subscription(
                    &id,
                    params.get("customer").map(String::as_str).unwrap_or(""),
                    params
                        .get("items[0][price]")
                        .map(String::as_str)
                        .unwrap_or(""),
                    &customer_id,
                );
                let sub = crate::stripe_clock::created(world, sub);
                world.subscriptions.insert(id, sub.clone());
                if world.lose_replies {
                    return (
                        500,
                        json!({"error": {"type": "api_error", "message": "the reply was lost"}}),
                    );
                }
                (200, sub)
            }
            ("GET", ["subscriptions"]) if world.lose_replies => (
                500,
                json!({"error": {"type": "api_error", "message": "an error occurred"}}),
            ),
            ("GET", ["subscriptions"]) => {
                // Stripe's list: newest first, canceled ones only when asked.
                let query: HashMap<String, String> =
                    request.url.query_pairs().into_owned().collect();
                let status = query.get("status").map(String::as_str);
                let mut data: Vec<Value> = world
                    .subscriptions
                    .values()
                    .filter(|s| {
                        query
                            .get("customer")
                            .is_none_or(|c| s["customer"] == json!(c))
                    })
                    .filter(|s| match status {
                        Some("all") => true,
                        Some(wanted) => s["status"] == json!(wanted),
                        None => s["status"] != json!("canceled"),
                    })
                    .cloned()
                    .collect();
                data.sort_by_key(|s| std::cmp::Reverse(sequence(&s["id"])));
                (
                    200,
                    json!({"object": "list", "data": data, "has_more": false, "url": "/v1/subscriptions"}),
                )
            }
            ("GET", ["subscriptions", id]) => match world.subscriptions.get(*id) {
                Some(sub) => (200, sub.clone()),
                None => (
                    404,
                    json!({"error": {"type": "invalid_request_error", "message": "No such subscription"}}),
                ),
            },
            ("DELETE", ["subscriptions", id]) => {
                let Some(sub) = world.subscriptions.get_mut(*id) else {
                    return (
                        404,
                        json!({"error": {"type": "invalid_request_error", "message": "No such subscription"}}),
                    );
                };
                sub["status"] = json!("canceled");
                let sub = sub.clone();
                crate::stripe_clock::emit(world, "customer.subscription.deleted", &sub);
                (200, sub)
            }
            ("POST", ["subscriptions", id]) => Self::update_subscription(world, id, &params),
            ("GET", ["invoice_payments"]) => {
                let invoice = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "invoice")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let data: Vec<Value> = world
                    .invoice_payments
                    .get(&invoice)
                    .map(|pi| vec![invoice_payment(&invoice, pi)])
                    .unwrap_or_default();
                (
                    200,
                    json!({"object": "list", "data": data, "has_more": false, "url": "/v1/invoice_payments"}),
                )
            }
            ("POST", ["payment_intents"]) => crate::stripe_clock::pay(world, &params),
            ("GET", ["payment_intents", id]) => match world.payment_intents.get(*id) {
                Some(pi) => (200, pi.clone()),
                None => (
                    404,
                    json!({"error": {"type": "invalid_request_error", "message": "No such payment_intent"}}),
                ),
            },
            _ => (
                404,
                json!({"error": {"type": "invalid_request_error",
                                  "message": format!("the stand-in does not know {method} {path}")}}),
            ),
        }
    }

    /// A price change: invoiced at once with `always_invoice`, charged to
    /// the customer's default card; unpaid, kept pending or applied as
    /// `payment_behavior` says. A cancellation at the period's end.
    fn update_subscription(
        world: &mut World,
        id: &str,
        params: &HashMap<String, String>,
    ) -> (u16, Value) {
        let Some(mut sub) = world.subscriptions.get(id).cloned() else {
            return (
                404,
                json!({"error": {"type": "invalid_request_error", "message": "No such subscription"}}),
            );
        };
        if sub["status"] == json!("canceled") {
            return (
                400,
                json!({"error": {"type": "invalid_request_error",
                                  "message": "A canceled subscription can only update its cancellation_details and metadata."}}),
            );
        }
        if let Some(cancel) = params.get("cancel_at_period_end") {
            sub["cancel_at_period_end"] = json!(cancel == "true");
        }
        if let Some(price) = params.get("items[0][price]") {
            let invoiced =
                params.get("proration_behavior").map(String::as_str) == Some("always_invoice");
            let customer = sub["customer"].as_str().unwrap_or_default().to_owned();
            let card = world
                .card_override
                .clone()
                .or_else(|| world.default_card.get(&customer).cloned())
                .unwrap_or_default();
            let paid = !invoiced || charge(&card).is_ok();
            if invoiced {
                let invoice = world.id("in");
                let intent = world.id("pi");
                let mut pi = fixture("payment_intent");
                pi["id"] = json!(intent);
                pi["customer"] = json!(customer);
                pi["client_secret"] = json!(format!("{intent}_secret_1"));
                pi["status"] = json!(if paid {
                    "succeeded"
                } else if card == "pm_card_authenticationRequired" {
                    "requires_action"
                } else {
                    "requires_payment_method"
                });
                pi["last_payment_error"] = match charge(&card) {
                    Err((code, message)) => {
                        json!({"type": "card_error", "code": code, "message": message})
                    }
                    Ok(()) => Value::Null,
                };
                world.payment_intents.insert(intent.clone(), pi);
                world.invoice_payments.insert(invoice.clone(), intent);
                sub["latest_invoice"] = json!(invoice);
            }
            let behavior = params
                .get("payment_behavior")
                .map(String::as_str)
                .unwrap_or("allow_incomplete");
            if paid {
                sub["items"]["data"][0]["price"]["id"] = json!(price);
                sub["status"] = json!("active");
                sub["pending_update"] = Value::Null;
            } else if behavior == "pending_if_incomplete" {
                let mut pending_item = sub["items"]["data"][0].clone();
                pending_item["price"]["id"] = json!(price);
                sub["pending_update"] = json!({
                    "billing_cycle_anchor": null, "expires_at": Utc::now().timestamp() + 23 * 3600,
                    "subscription_items": [pending_item], "trial_end": null, "trial_from_plan": null,
                    "discounts": null, "metadata": null, "cancel_at_period_end": null});
            } else {
                sub["items"]["data"][0]["price"]["id"] = json!(price);
                sub["status"] = json!("past_due");
            }
        }
        world.subscriptions.insert(id.to_owned(), sub.clone());
        crate::stripe_clock::emit(world, "customer.subscription.updated", &sub);
        (200, sub)
    }
}

/// The server's responder: the stand-in's state, not the server. Holding
/// the server would make a cycle that keeps it from going back to
/// wiremock's pool (1,000 servers a process), and a process making more
/// stand-ins than that (the billing simulation) would wait forever for one.
struct Responder(Arc<Mutex<World>>);

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let method = request.method.to_string();
        let path = request.url.path().to_owned();
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let mut world = self.0.lock().unwrap();
        world
            .calls
            .push((method.clone(), path.clone(), body.clone()));
        let delay = if path.starts_with("/v1/subscriptions") {
            let delay = world.subscription_delay;
            match &mut world.slow_calls_left {
                Some(0) => Duration::ZERO,
                Some(left) => {
                    *left -= 1;
                    delay
                }
                None => delay,
            }
        } else {
            Duration::ZERO
        };
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (status, reply) = match key.as_ref().and_then(|k| world.keys.get(k)).cloned() {
            Some((sent, status, reply)) if sent == body => (status, reply),
            Some(_) => (
                400,
                json!({"error": {"type": "idempotency_error",
                                  "message": "Keys for idempotent requests can only be used with the same parameters they were first used with."}}),
            ),
            None if method != "GET" && crate::stripe_clock::fails_before(&mut world) => (
                500,
                json!({"error": {"type": "api_error", "message": "an error occurred"}}),
            ),
            None => {
                let (status, reply) = StandIn::route(&mut world, &method, &path, request);
                let (status, reply) =
                    crate::stripe_clock::after(&mut world, &method, status, reply);
                if let Some(key) = key {
                    world.keys.insert(key, (body, status, reply.clone()));
                }
                (status, reply)
            }
        };
        ResponseTemplate::new(status)
            .set_body_json(reply)
            .set_delay(delay)
    }
}

/// The creation order of a stand-in object, from its id (`sub_standin7`).
pub(crate) fn sequence(id: &Value) -> u32 {
    id.as_str()
        .and_then(|id| id.rsplit("standin").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A subscription of `customer` on `price`, active, in a month-long period
/// that began now, with our customer id in its metadata.
pub fn subscription(id: &str, stripe_customer: &str, price: &str, ours: &str) -> Value {
    let now = Utc::now().timestamp();
    let mut sub = fixture("subscription");
    sub["id"] = json!(id);
    sub["status"] = json!("active");
    sub["customer"] = json!(stripe_customer);
    sub["metadata"] = json!({"customer_id": ours});
    sub["pending_update"] = Value::Null;
    sub["latest_invoice"] = Value::Null;
    sub["cancel_at_period_end"] = json!(false);
    sub["created"] = json!(now);
    let item = &mut sub["items"]["data"][0];
    item["price"]["id"] = json!(price);
    item["current_period_start"] = json!(now);
    item["current_period_end"] = json!(now + 30 * 86_400);
    sub
}

fn invoice_payment(invoice: &str, intent: &str) -> Value {
    json!({"object": "invoice_payment", "id": format!("inpay_{invoice}"), "amount_paid": null,
           "amount_requested": 17100, "created": Utc::now().timestamp(), "currency": "usd",
           "invoice": invoice, "is_default": true, "livemode": false,
           "payment": {"type": "payment_intent", "payment_intent": intent},
           "status": "open", "status_transitions": {"canceled_at": null, "paid_at": null}})
}
