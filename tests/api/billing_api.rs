//! The billing API against a local stand-in for Stripe (wiremock) that
//! answers with objects in the shape of Stripe's API fixtures.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
};

use chrono::Utc;
use serde_json::{json, Value};
use uuid::Uuid;
use wiremock::{
    matchers::{body_string_contains, header, method, path},
    Mock, MockServer, Request, Respond, ResponseTemplate,
};

use crate::helpers::{spawn_app_with, Customer, TestApp};

fn fixture(name: &str) -> Value {
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

/// A stand-in for Stripe and an instance of the service pointed at it.
/// It finds no customer by search, lists no live subscription, and
/// attaches any card.
async fn with_stripe() -> (TestApp, MockServer) {
    let stripe = MockServer::start().await;
    stripe_answers(
        &stripe,
        "GET",
        "/v1/subscriptions",
        200,
        json!({"object": "list", "data": [], "has_more": false, "url": "/v1/subscriptions"}),
    )
    .await;
    stripe_answers(
        &stripe,
        "GET",
        "/v1/customers/search",
        200,
        json!({"object": "search_result", "data": [], "has_more": false, "next_page": null,
               "url": "/v1/customers/search"}),
    )
    .await;
    Mock::given(method("POST"))
        .and(wiremock::matchers::path_regex(
            "^/v1/payment_methods/[^/]+/attach$",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(fixture("payment_method")))
        .mount(&stripe)
        .await;
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_standin");
    stripe_answers(&stripe, "POST", "/v1/customers/cus_standin", 200, customer).await;
    let base = format!("{}/", stripe.uri());
    let app = spawn_app_with(&[
        ("STRIPE_API_BASE", &base),
        ("STRIPE_SECRET_KEY", "sk_test_standin"),
        ("STRIPE_PUBLISHABLE_KEY", "pk_test_standin"),
    ])
    .await;
    (app, stripe)
}

async fn stripe_answers(stripe: &MockServer, verb: &str, at: &str, status: u16, body: Value) {
    Mock::given(method(verb))
        .and(path(at))
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
        .mount(stripe)
        .await;
}

fn subscription_for(customer: Uuid, price: &str) -> Value {
    let now = Utc::now().timestamp();
    let mut sub = fixture("subscription");
    sub["id"] = json!("sub_standin");
    sub["status"] = json!("active");
    sub["customer"] = json!("cus_standin");
    sub["metadata"] = json!({"customer_id": customer.to_string()});
    sub["pending_update"] = Value::Null;
    let item = &mut sub["items"]["data"][0];
    item["price"]["id"] = json!(price);
    item["current_period_start"] = json!(now);
    item["current_period_end"] = json!(now + 30 * 86_400);
    sub
}

async fn post(app: &TestApp, shop: &Customer, at: &str, body: Value) -> (u16, Value) {
    app.post_json(at, &shop.token, body).await
}

/// Buys `tokens` with `payment_method` (no Idempotency-Key).
async fn purchase_tokens(
    app: &TestApp,
    shop: &Customer,
    tokens: i64,
    payment_method: &str,
) -> (u16, Value) {
    let body = json!({"tokens": tokens, "payment_method_id": payment_method});
    post(app, shop, "/api/v1/customer/billing/tokens/purchase", body).await
}

/// Buys `tokens` with a card that needs 3-D Secure: Stripe's payment
/// intent `payment_intent_id` waits for the customer.
async fn purchase_awaiting_3ds(
    app: &TestApp,
    stripe: &MockServer,
    shop: &Customer,
    payment_intent_id: &str,
    tokens: i64,
) -> (u16, Value) {
    stripe_answers(
        stripe,
        "POST",
        "/v1/payment_intents",
        200,
        payment_intent(payment_intent_id, "requires_action"),
    )
    .await;
    purchase_tokens(app, shop, tokens, "pm_card_threeDSecure2Required").await
}

/// Subscribes `shop` to Starter with Stripe's test card.
async fn subscribe_to_starter(app: &TestApp, shop: &Customer) -> (u16, Value) {
    let body = json!({"plan_id": "starter", "payment_method_id": "pm_card_visa"});
    post(app, shop, "/api/v1/customer/billing/subscribe", body).await
}

#[tokio::test]
async fn subscribing_creates_the_stripe_customer_once_and_opens_the_plan() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_standin");
    let mut setup = fixture("setup_intent");
    setup["client_secret"] = json!("seti_standin_secret_1");
    stripe_answers(&stripe, "POST", "/v1/setup_intents", 200, setup).await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .and(header(
            "Idempotency-Key",
            format!("customer-{}", shop.id).as_str(),
        ))
        .and(body_string_contains(shop.id.to_string().as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(customer))
        .expect(1)
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .and(body_string_contains("price_starter_monthly"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(subscription_for(shop.id, "price_starter_monthly")),
        )
        .expect(1)
        .mount(&stripe)
        .await;

    let (status, body) = post(
        &app,
        &shop,
        "/api/v1/customer/billing/setup-intent",
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_secret"], "seti_standin_secret_1");
    assert_eq!(body["publishable_key"], "pk_test_standin");

    let (status, body) = subscribe_to_starter(&app, &shop).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["plan_id"], "starter");
    assert_eq!(body["status"], "active");
    assert_eq!(body["stripe_subscription_id"], "sub_standin");

    app.activate(&shop, "rec-001").await;
    let (status, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!((status, &consumed["tokens_remaining"]), (200, &json!(998)));

    let (status, _) = subscribe_to_starter(&app, &shop).await;
    assert_eq!(status, 409, "subscribed once");
    let (status, shown) = app
        .get_json("/api/v1/customer/billing/subscription", &shop.token)
        .await;
    assert_eq!((status, &shown["plan_id"]), (200, &json!("starter")));
    let (_, plans) = app
        .get_json("/api/v1/customer/billing/plans", &shop.token)
        .await;
    assert_eq!(plans["plans"].as_array().unwrap().len(), 3, "{plans}");
    // The mocks' `expect(1)` are checked when the stand-in drops.
}

fn payment_intent(id: &str, status: &str) -> Value {
    let mut intent = fixture("payment_intent");
    intent["id"] = json!(id);
    intent["status"] = json!(status);
    intent["client_secret"] = json!(format!("{id}_secret_1"));
    intent
}

#[tokio::test]
async fn a_purchase_paid_at_once_is_credited_once_whatever_retries_and_webhooks_follow() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    // Stripe is asked to charge once (checked when the stand-in drops): a
    // retry, even one after Stripe forgot the idempotency key (24 h), is
    // answered from our record and the intent as it stands.
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(payment_intent("pi_standin", "succeeded")),
        )
        .expect(1)
        .mount(&stripe)
        .await;
    stripe_answers(
        &stripe,
        "GET",
        "/v1/payment_intents/pi_standin",
        200,
        payment_intent("pi_standin", "succeeded"),
    )
    .await;

    let (app, shop) = (&app, &shop);
    let buy = |tokens: i64| async move {
        let response = app
            .http
            .post(app.url("/api/v1/customer/billing/tokens/purchase"))
            .bearer_auth(&shop.token)
            .header("Idempotency-Key", "order-42")
            .json(&json!({"tokens": tokens, "payment_method_id": "pm_card_visa"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    };
    let (status, first) = buy(500).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["credited"], true);
    assert_eq!(
        first["price_cents"], 250,
        "500 tokens at 500 cents a thousand"
    );
    let (status, retried) = buy(500).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(
        (
            &retried["purchase_id"],
            &retried["payment_intent_id"],
            &retried["credited"]
        ),
        (
            &first["purchase_id"],
            &first["payment_intent_id"],
            &json!(true)
        ),
        "the same purchase"
    );
    let (status, other) = buy(900).await;
    assert_eq!(
        (status, &other["error"]["code"]),
        (409, &json!("conflict")),
        "the key names another purchase: {other}"
    );
    // Stripe's own confirmation arrives too.
    let intent = json!({"id": "pi_standin", "amount": 250, "amount_received": 250,
        "metadata": {"customer_id": shop.id.to_string(), "tokens": "500"}});
    let (_, webhook) = app
        .stripe_event(
            "evt_pi_standin",
            "payment_intent.succeeded",
            Utc::now().timestamp(),
            intent,
        )
        .await;
    assert_eq!(webhook["outcome"], "duplicate");

    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(
        consumed["tokens_remaining"], 498,
        "credited once: {consumed}"
    );
}

#[tokio::test]
async fn a_refused_card_is_a_422_and_records_nothing() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    stripe_answers(
        &stripe,
        "POST",
        "/v1/payment_intents",
        402,
        json!({"error": {"type": "card_error", "code": "card_declined",
                         "message": "Your card was declined."}}),
    )
    .await;
    let (status, body) = purchase_tokens(&app, &shop, 500, "pm_card_chargeDeclined").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "payment_method_id");
    let purchases: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_purchases")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(purchases, 0);

    let (status, body) = purchase_tokens(&app, &shop, 5, "not-a-pm").await;
    assert_eq!(status, 422);
    let mut fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        ["payment_method_id", "tokens"],
        "one detail per field"
    );
}

#[tokio::test]
async fn an_upgrade_opens_more_at_once_a_downgrade_waits_and_cancelling_keeps_the_period() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_standin");
    stripe_answers(&stripe, "POST", "/v1/customers", 200, customer).await;
    let starter = subscription_for(shop.id, "price_starter_monthly");
    let pro = subscription_for(shop.id, "price_pro_monthly");
    stripe_answers(&stripe, "POST", "/v1/subscriptions", 200, starter.clone()).await;
    stripe_answers(
        &stripe,
        "GET",
        "/v1/subscriptions/sub_standin",
        200,
        starter.clone(),
    )
    .await;
    let on = |needle: &'static str, answer: Value| {
        Mock::given(method("POST"))
            .and(path("/v1/subscriptions/sub_standin"))
            .and(body_string_contains(needle))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
    };
    on("price_pro_monthly", pro).mount(&stripe).await;
    on("proration_behavior=none", starter.clone())
        .mount(&stripe)
        .await;
    let mut cancelling = starter;
    cancelling["cancel_at_period_end"] = json!(true);
    on("cancel_at_period_end=true", cancelling)
        .mount(&stripe)
        .await;

    let (status, _) = subscribe_to_starter(&app, &shop).await;
    assert_eq!(status, 201);
    app.activate(&shop, "rec-001").await;
    let spend = |tokens: i64| {
        app.consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": tokens}),
        )
    };
    assert_eq!(spend(1_000).await.0, 200);
    assert_eq!(spend(2).await.0, 402, "Starter's 1000 are spent");

    let (status, body) = app
        .patch_json(
            "/api/v1/customer/billing/subscription",
            &shop.token,
            json!({"plan_id": "professional"}),
        )
        .await;
    assert_eq!(
        (status, &body["plan_id"]),
        (200, &json!("professional")),
        "{body}"
    );
    let (status, body) = spend(2).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(10_000 - 1_000 - 2))
    );

    let (status, body) = app
        .patch_json(
            "/api/v1/customer/billing/subscription",
            &shop.token,
            json!({"plan_id": "starter"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["plan_id"], "professional",
        "a downgrade waits for the period's end"
    );
    assert_eq!(body["pending_plan_id"], "starter");
    assert_eq!(
        spend(2).await.0,
        200,
        "Professional's allowance holds this period"
    );

    let (status, body) = app
        .delete_json("/api/v1/customer/billing/subscription", &shop.token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["cancel_at_period_end"], true);
    assert_eq!(body["status"], "active", "in force until the period's end");
}

#[tokio::test]
async fn a_purchase_awaiting_3d_secure_is_credited_only_when_a_payment_attempt_succeeds() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    let (status, body) = purchase_awaiting_3ds(&app, &stripe, &shop, "pi_3ds", 500).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["credited"], &body["client_secret"]),
        (&json!(false), &json!("pi_3ds_secret_1"))
    );
    let purchase_status = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT status FROM token_purchases WHERE stripe_payment_intent_id = 'pi_3ds'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    assert_eq!(purchase_status().await, "pending");

    // The first attempt fails; the customer tries again on the same intent.
    let intent = json!({"id": "pi_3ds", "amount": 250, "amount_received": 250,
        "metadata": {"customer_id": shop.id.to_string(), "tokens": "500"}});
    let now = Utc::now().timestamp();
    app.stripe_event(
        "evt_3ds_failed",
        "payment_intent.payment_failed",
        now,
        intent.clone(),
    )
    .await;
    assert_eq!(purchase_status().await, "failed");
    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(
        consumed["error"]["code"], "insufficient_tokens",
        "nothing credited"
    );

    app.stripe_event("evt_3ds_ok", "payment_intent.succeeded", now + 5, intent)
        .await;
    assert_eq!(purchase_status().await, "completed");
    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(consumed["tokens_remaining"], 498, "{consumed}");
}

/// A purchase waiting for 3-D Secure whose success's delivery fails and
/// is retried hours later, while support refunds half of it and a dispute
/// holds the rest: each event counts once, in whatever order it comes.
#[tokio::test]
async fn a_refund_and_a_dispute_before_the_payments_success_reduce_what_the_success_credits() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    let (status, body) = purchase_awaiting_3ds(&app, &stripe, &shop, "pi_late", 1000).await;
    assert_eq!((status, &body["credited"]), (200, &json!(false)), "{body}");
    let now = Utc::now().timestamp();
    let charge = json!({"id": "ch_late", "object": "charge", "payment_intent": "pi_late",
                        "amount": 500, "amount_refunded": 250});
    let (_, refunded) = app
        .stripe_event("evt_late_refund", "charge.refunded", now, charge)
        .await;
    assert_eq!(refunded["outcome"], "applied", "{refunded}");
    let dispute = |status: &str| {
        json!({"id": "dp_late", "object": "dispute", "amount": 100, "charge": "ch_late",
               "payment_intent": "pi_late", "status": status})
    };
    let (_, disputed) = app
        .stripe_event(
            "evt_late_dispute",
            "charge.dispute.created",
            now,
            dispute("needs_response"),
        )
        .await;
    assert_eq!(disputed["outcome"], "applied", "{disputed}");

    let intent = json!({"id": "pi_late", "amount": 500, "amount_received": 500,
        "metadata": {"customer_id": shop.id.to_string(), "tokens": "1000"}});
    app.stripe_event(
        "evt_late_ok",
        "payment_intent.succeeded",
        now + 3600,
        intent.clone(),
    )
    .await;
    app.stripe_event(
        "evt_late_ok_again",
        "payment_intent.succeeded",
        now + 3601,
        intent,
    )
    .await;

    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(
        consumed["tokens_remaining"], 298,
        "1,000 bought, 500 refunded, 200 held by the dispute: {consumed}"
    );
    app.stripe_event(
        "evt_late_won",
        "charge.dispute.closed",
        now + 7200,
        dispute("won"),
    )
    .await;
    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(
        consumed["tokens_remaining"], 496,
        "the dispute's 200 given back"
    );
    let credited: i64 =
        sqlx::query_scalar("SELECT purchased_tokens_credited FROM customers WHERE id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(credited, 500, "the ledger agrees");
    assert_eq!(app.drain_usage().await, 2);
    let used: i64 = sqlx::query_scalar("SELECT purchased_tokens_used FROM customers WHERE id = $1")
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(used, 4);
}

/// Stripe's idempotency as Stripe keeps it: a key seen before is answered
/// with the reply saved for it, a new one with the next fresh object.
struct Idempotent {
    saved: Mutex<HashMap<String, Value>>,
    fresh: Mutex<VecDeque<Value>>,
}

impl Respond for Idempotent {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request
            .headers
            .get("Idempotency-Key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut saved = self.saved.lock().unwrap();
        let reply = saved
            .entry(key)
            .or_insert_with(|| self.fresh.lock().unwrap().pop_front().unwrap());
        ResponseTemplate::new(200).set_body_json(reply.clone())
    }
}

#[tokio::test]
async fn subscribing_again_after_cancelling_at_once_makes_a_new_subscription() {
    let (app, stripe) = with_stripe().await;
    let shop = app.create_customer(None).await;
    let mut customer = fixture("customer");
    customer["id"] = json!("cus_standin");
    stripe_answers(&stripe, "POST", "/v1/customers", 200, customer).await;
    stripe_answers(
        &stripe,
        "POST",
        "/v1/payment_methods/pm_card_visa/attach",
        200,
        fixture("payment_method"),
    )
    .await;
    let first = subscription_for(shop.id, "price_starter_monthly");
    let mut second = first.clone();
    second["id"] = json!("sub_second");
    let mut cancelled = first.clone();
    cancelled["status"] = json!("canceled");
    stripe_answers(
        &stripe,
        "DELETE",
        "/v1/subscriptions/sub_standin",
        200,
        cancelled,
    )
    .await;
    Mock::given(method("POST"))
        .and(path("/v1/subscriptions"))
        .respond_with(Idempotent {
            saved: Mutex::default(),
            fresh: Mutex::new(VecDeque::from([first, second])),
        })
        .mount(&stripe)
        .await;
    let (status, body) = subscribe_to_starter(&app, &shop).await;
    assert_eq!(
        (status, &body["stripe_subscription_id"]),
        (201, &json!("sub_standin")),
        "{body}"
    );
    let (status, _) = app
        .delete_json(
            "/api/v1/customer/billing/subscription?immediately=true",
            &shop.token,
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = subscribe_to_starter(&app, &shop).await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(
        (&body["stripe_subscription_id"], &body["status"]),
        (&json!("sub_second"), &json!("active")),
        "a new subscription, not Stripe's saved reply for the cancelled one"
    );
}
