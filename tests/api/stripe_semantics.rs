//! Billing that stays exact against Stripe's real behaviour: no allowance
//! before payment, no stale event undoing a newer one, no usage lost at a
//! period boundary. Each scenario plays Stripe's documented behaviour,
//! through the stateful stand-in (`stripe_standin`) or as the events
//! Stripe delivers, in the order that hurts.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};

use crate::{
    helpers::{spawn_app, spawn_app_with, Customer, TestApp},
    stripe_standin::{StandIn, ENTERPRISE, PROFESSIONAL, STARTER},
    webhooks::{current_period, deliver_applied, invoice, now, subscribed, subscription},
};

pub async fn with_standin() -> (TestApp, StandIn) {
    let stripe = StandIn::start().await;
    let app = spawn_app_with(&[
        ("STRIPE_API_BASE", &stripe.base()),
        ("STRIPE_SECRET_KEY", "sk_test_standin"),
    ])
    .await;
    (app, stripe)
}

async fn subscribe(app: &TestApp, shop: &Customer, plan: &str, card: &str) -> (u16, Value) {
    app.post_json(
        "/api/v1/customer/billing/subscribe",
        &shop.token,
        json!({"plan_id": plan, "payment_method_id": card}),
    )
    .await
}

async fn change_plan(app: &TestApp, shop: &Customer, plan: &str) -> (u16, Value) {
    app.patch_json(
        "/api/v1/customer/billing/subscription",
        &shop.token,
        json!({"plan_id": plan}),
    )
    .await
}

async fn spend(app: &TestApp, shop: &Customer, tokens: i64) -> (u16, Value) {
    app.consume(
        &shop.token,
        json!({"app_id": "rec-001", "tokens_consumed": tokens}),
    )
    .await
}

async fn billing_row(app: &TestApp, shop: &Customer) -> (String, String) {
    sqlx::query_as("SELECT plan_id, status FROM customer_billing WHERE customer_id = $1")
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

async fn event(app: &TestApp, id: &str, kind: &str, created: i64, object: Value) -> Value {
    let (status, body) = app.stripe_event(id, kind, created, object).await;
    assert_eq!(status, 200, "{body}");
    body
}

// 1. An upgrade opens the bigger allowance only once it is paid.

#[tokio::test]
async fn an_upgrade_whose_card_declines_keeps_the_old_plan_and_says_why() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    app.activate(&shop, "rec-001").await;
    stripe.set_default_card("pm_card_chargeDeclined");

    let (status, body) = change_plan(&app, &shop, "enterprise").await;

    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["code"], "payment_failed");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("declined"), "{message}");
    assert_eq!(billing_row(&app, &shop).await.0, "starter");
    assert_eq!(spend(&app, &shop, 1_000).await.0, 200);
    assert_eq!(spend(&app, &shop, 2).await.0, 402, "still Starter's 1000");
    let sent = stripe.calls(
        "POST",
        &format!("/v1/subscriptions/{}", sub_of(&app, &shop).await),
    );
    let upgrade = sent.last().unwrap();
    assert_eq!(upgrade["payment_behavior"], "pending_if_incomplete");
    assert_eq!(upgrade["proration_behavior"], "always_invoice");
}

#[tokio::test]
async fn an_upgrade_paid_at_once_opens_the_new_allowance_at_once() {
    let (app, _stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    app.activate(&shop, "rec-001").await;
    assert_eq!(spend(&app, &shop, 1_000).await.0, 200);

    let (status, body) = change_plan(&app, &shop, "professional").await;

    assert_eq!(
        (status, &body["plan_id"]),
        (200, &json!("professional")),
        "{body}"
    );
    let (status, body) = spend(&app, &shop, 2).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(10_000 - 1_002))
    );
}

#[tokio::test]
async fn a_price_stripe_switched_before_payment_opens_only_once_stripe_says_it_is_paid() {
    // Stripe's default `allow_incomplete` (a change made in the dashboard):
    // the new price at once, the subscription past_due until paid.
    let app = spawn_app().await;
    let shop = subscribed(&app, STARTER).await;
    app.activate(&shop, "rec-001").await;
    let t = now();
    event(
        &app,
        "evt_unpaid",
        "customer.subscription.updated",
        t,
        subscription(shop.id, ENTERPRISE, "past_due"),
    )
    .await;

    assert_eq!(
        billing_row(&app, &shop).await,
        ("starter".into(), "past_due".into())
    );
    assert_eq!(
        spend(&app, &shop, 1_001).await.0,
        402,
        "no unlimited allowance unpaid"
    );

    let (start, end) = current_period();
    event(
        &app,
        "evt_proration_paid",
        "invoice.paid",
        t + 1,
        invoice(shop.id, "in_up", start, end),
    )
    .await;
    event(
        &app,
        "evt_paid_up",
        "customer.subscription.updated",
        t + 1,
        subscription(shop.id, ENTERPRISE, "active"),
    )
    .await;

    assert_eq!(
        billing_row(&app, &shop).await,
        ("enterprise".into(), "active".into())
    );
    let (status, body) = spend(&app, &shop, 50_000).await;
    assert_eq!((status, &body["tokens_remaining"]), (200, &json!(-1)));
}

// 2. Invoice events: the subscription they belong to, in order.

#[tokio::test]
async fn paying_an_old_invoice_after_dunning_ended_the_subscription_reopens_nothing() {
    let app = spawn_app().await;
    let shop = subscribed(&app, STARTER).await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(
        spend(&app, &shop, 1).await.0,
        200,
        "the hot state is loaded"
    );
    let (start, end) = current_period();
    let t = now();
    event(
        &app,
        "evt_failed",
        "invoice.payment_failed",
        t,
        invoice(shop.id, "in_open", start, end),
    )
    .await;
    event(
        &app,
        "evt_ended",
        "customer.subscription.deleted",
        t + 1,
        subscription(shop.id, STARTER, "canceled"),
    )
    .await;

    event(
        &app,
        "evt_old_paid",
        "invoice.paid",
        t + 2,
        invoice(shop.id, "in_open", start, end),
    )
    .await;

    assert_eq!(billing_row(&app, &shop).await.1, "canceled");
    let (status, body) = spend(&app, &shop, 1).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (402, &json!("subscription_inactive"))
    );
}

#[tokio::test]
async fn a_late_payment_of_period_n_does_not_clear_the_failure_of_period_n_plus_1() {
    let app = spawn_app_with(&[("PAST_DUE_GRACE_HOURS", "0")]).await;
    let shop = subscribed(&app, STARTER).await;
    app.activate(&shop, "rec-001").await;
    let (start, end) = current_period();
    let next = end + 30 * 86_400;
    let t = now();
    event(
        &app,
        "evt_failed_n1",
        "invoice.payment_failed",
        t,
        invoice(shop.id, "in_n1", end, next),
    )
    .await;

    event(
        &app,
        "evt_paid_n",
        "invoice.paid",
        t - 60,
        invoice(shop.id, "in_n", start, end),
    )
    .await;

    assert_eq!(billing_row(&app, &shop).await.1, "past_due");
    assert_eq!(spend(&app, &shop, 1).await.0, 402, "past due, no grace");
    event(
        &app,
        "evt_paid_n1",
        "invoice.paid",
        t + 5,
        invoice(shop.id, "in_n1", end, next),
    )
    .await;
    assert_eq!(billing_row(&app, &shop).await.1, "active");
}

#[tokio::test]
async fn a_failure_delivered_after_the_retry_that_paid_it_blocks_no_one() {
    let app = spawn_app_with(&[("PAST_DUE_GRACE_HOURS", "0")]).await;
    let shop = subscribed(&app, STARTER).await;
    app.activate(&shop, "rec-001").await;
    let (start, end) = current_period();
    let t = now();
    event(
        &app,
        "evt_paid",
        "invoice.paid",
        t,
        invoice(shop.id, "in_1", start, end),
    )
    .await;

    let late = event(
        &app,
        "evt_failed_first",
        "invoice.payment_failed",
        t - 3600,
        invoice(shop.id, "in_1", start, end),
    )
    .await;

    assert_eq!(late["outcome"], "ignored");
    assert_eq!(billing_row(&app, &shop).await.1, "active");
    assert_eq!(spend(&app, &shop, 1).await.0, 200);
}

// 3. Subscription events: the current subscription, Stripe's clock.

#[tokio::test]
async fn a_late_event_of_a_replaced_subscription_changes_nothing() {
    let (app, stripe) = with_standin().await;
    let shop = subscribed(&app, STARTER).await;
    let t = now();
    event(
        &app,
        "evt_a_ended",
        "customer.subscription.deleted",
        t,
        subscription(shop.id, STARTER, "canceled"),
    )
    .await;
    // The one that replaces it, as Stripe holds it: an event of another
    // subscription after ours ended is applied as Stripe reads it.
    let second = stripe.subscribe_behind_our_back("cus_test", PROFESSIONAL, &shop.id.to_string());
    event(
        &app,
        "evt_b",
        "customer.subscription.created",
        t + 1,
        second,
    )
    .await;

    let late = event(
        &app,
        "evt_a_late",
        "customer.subscription.updated",
        t + 2,
        subscription(shop.id, ENTERPRISE, "active"),
    )
    .await;

    assert_eq!(late["outcome"], "ignored");
    assert_eq!(
        billing_row(&app, &shop).await,
        ("professional".into(), "active".into())
    );
}

#[tokio::test]
async fn an_event_of_the_same_second_as_our_own_call_is_applied_as_stripe_reads_now() {
    // An event this close to our call's reply cannot be ordered against
    // it (whole seconds, two clocks): Stripe's state is read anew, and
    // the change the event reports is in it.
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    let sub = sub_of(&app, &shop).await;
    stripe.edit_subscription(&sub, |s| s["cancel_at_period_end"] = json!(true));
    let cancelling = stripe.subscription(&sub);

    let body = event(
        &app,
        "evt_same_second",
        "customer.subscription.updated",
        now() - 1,
        cancelling,
    )
    .await;

    assert_eq!(body["outcome"], "applied");
    let cancel: bool = sqlx::query_scalar(
        "SELECT cancel_at_period_end FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(cancel);
}

// 4 and 5. Hot-state changes tied to their period; usage after a
// boundary always counted.

#[tokio::test]
async fn a_stale_in_period_update_after_a_consume_started_the_next_period_leaves_it_alone() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let end = now() + 3;
    let period = |price: &str, cancel: bool| {
        let mut sub = subscription(shop.id, price, "active");
        sub["items"]["data"][0]["current_period_start"] = json!(end - 30 * 86_400);
        sub["items"]["data"][0]["current_period_end"] = json!(end);
        sub["cancel_at_period_end"] = json!(cancel);
        sub
    };
    let t = now();
    deliver_applied(
        &app,
        "evt_pro",
        "customer.subscription.created",
        period(PROFESSIONAL, false),
    )
    .await;
    // A downgrade to Starter, for the next period.
    event(
        &app,
        "evt_down",
        "customer.subscription.updated",
        t + 1,
        period(STARTER, false),
    )
    .await;
    app.activate(&shop, "rec-001").await;
    tokio::time::sleep(Duration::from_millis((end - now() + 1) as u64 * 1000)).await;
    let (status, body) = spend(&app, &shop, 2).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(998)),
        "Starter's new period"
    );

    // An update of the old period, delivered only now.
    event(
        &app,
        "evt_stale",
        "customer.subscription.updated",
        t + 2,
        period(STARTER, false),
    )
    .await;

    let (status, body) = spend(&app, &shop, 2).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(996)),
        "the new period's allowance is not overwritten with the old one's"
    );
}

#[tokio::test]
async fn usage_after_several_missed_boundaries_counts_in_the_period_it_falls_in() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    // The scheduler was down: the ledger's period ended two months ago.
    sqlx::query(
        "UPDATE customer_billing SET billing_anchor = NOW() - INTERVAL '3 months' - INTERVAL '1 day', \
             billing_cycle_start = NOW() - INTERVAL '3 months' - INTERVAL '1 day', \
             billing_cycle_end = NOW() - INTERVAL '2 months' - INTERVAL '1 day' WHERE customer_id = $1",
    )
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();
    app.wipe_redis().await;

    let (status, body) = spend(&app, &shop, 2).await;
    assert_eq!((status, &body["tokens_remaining"]), (200, &json!(998)));
    let periods = connected_apps::domain::billing::Periods::new(
        app.db.clone(),
        app.state.hot.clone(),
        Default::default(),
    );
    assert_eq!(periods.roll_ended(Utc::now()).await.unwrap(), 1);

    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((2, 0)),
        "the late rollover found the period started and kept its usage"
    );
    app.drain_usage().await;
    let used: i64 =
        sqlx::query_scalar("SELECT tokens_used FROM customer_billing WHERE customer_id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(used, 2, "the ledger counts it in the same period");
}

// 6. Keys that name what the request depends on; one Stripe customer.

#[tokio::test]
async fn a_retry_with_another_card_after_a_decline_subscribes_with_one_stripe_customer() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;

    let (status, body) = subscribe(&app, &shop, "starter", "pm_card_chargeDeclined").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["details"][0]["message"]
        .as_str()
        .unwrap()
        .contains("declined"));
    let (status, body) = subscribe(&app, &shop, "starter", "pm_card_visa").await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(stripe.customers(), 1);
    assert_eq!(
        billing_row(&app, &shop).await,
        ("starter".into(), "active".into())
    );
}

#[tokio::test]
async fn after_stripe_forgot_its_keys_the_stripe_customer_is_found_not_made_again() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    let (status, _) = app
        .delete_json(
            "/api/v1/customer/billing/subscription?immediately=true",
            &shop.token,
        )
        .await;
    assert_eq!(status, 200);
    // A day later; and our record of the Stripe customer lost with it.
    stripe.forget_keys();
    sqlx::query("UPDATE customers SET stripe_customer_id = NULL WHERE id = $1")
        .bind(shop.id)
        .execute(&app.db)
        .await
        .unwrap();

    let (status, body) = subscribe(&app, &shop, "professional", "pm_card_visa").await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(stripe.customers(), 1, "found by its metadata");
}

// 7. Disputes.

#[tokio::test]
async fn a_dispute_takes_back_the_unspent_tokens_and_a_won_one_gives_them_back() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    deliver_applied(
        &app,
        "evt_bought",
        "payment_intent.succeeded",
        json!({"id": "pi_disputed", "object": "payment_intent", "amount": 1000, "amount_received": 1000,
               "status": "succeeded",
               "metadata": {"customer_id": shop.id.to_string(), "tokens": "500"}}),
    )
    .await;
    assert_eq!(spend(&app, &shop, 200).await.0, 200);
    let dispute = |status: &str| {
        json!({"id": "dp_1", "object": "dispute", "amount": 1000, "charge": "ch_disputed",
               "payment_intent": "pi_disputed", "status": status})
    };

    deliver_applied(
        &app,
        "evt_dispute",
        "charge.dispute.created",
        dispute("needs_response"),
    )
    .await;

    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((0, 0)),
        "the 300 unspent taken"
    );
    assert_eq!(spend(&app, &shop, 1).await.0, 402);
    deliver_applied(&app, "evt_won", "charge.dispute.closed", dispute("won")).await;
    assert_eq!(app.hot_balance(shop.id).await, Some((0, 300)), "given back");
    let (credited, disputed): (i64, i32) = sqlx::query_as(
        "SELECT c.purchased_tokens_credited, p.tokens_disputed FROM customers c \
         JOIN token_purchases p ON p.customer_id = c.id WHERE c.id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((credited, disputed), (500, 0));
    let again = event(
        &app,
        "evt_won_again",
        "charge.dispute.closed",
        now(),
        dispute("won"),
    )
    .await;
    assert_eq!(again["outcome"], "duplicate", "given back once");
}

// Also: a slow Stripe holds up no other write of the customer.

#[tokio::test]
async fn a_slow_stripe_does_not_hold_the_customers_other_writes() {
    let (app, stripe) = with_standin().await;
    let app = std::sync::Arc::new(app);
    let shop = app.create_customer(None).await;
    stripe.slow_subscriptions(Duration::from_secs(3));
    let subscribing = {
        let (app, shop) = (app.clone(), shop.clone());
        tokio::spawn(async move { subscribe(&app, &shop, "starter", "pm_card_visa").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    app.grant(shop.id, 10).await;
    app.activate(&shop, "rec-001").await;

    assert!(
        !subscribing.is_finished(),
        "the grant and the activation went through while Stripe was still answering"
    );
    assert_eq!(subscribing.await.unwrap().0, 201);
}

// The net under every missed webhook.

#[tokio::test]
async fn the_reconciliation_sets_right_what_a_missed_webhook_left() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    let sub = sub_of(&app, &shop).await;
    stripe.change_behind_our_back(&sub, ENTERPRISE, "active");

    let (status, report) = app
        .post_json(
            "/api/v1/admin/billing/reconcile",
            &app.admin_token(),
            json!({}),
        )
        .await;

    assert_eq!(status, 200, "{report}");
    assert_eq!(report["checked"], 1);
    assert_eq!(
        report["fixed"],
        json!([{"customer_id": shop.id, "fields": ["plan"]}])
    );
    assert_eq!(billing_row(&app, &shop).await.0, "enterprise");
    assert!(app
        .metrics_text()
        .await
        .contains(r#"billing_reconciliation_fixes_total{field="plan"}"#));
    let (_, again) = app
        .post_json(
            "/api/v1/admin/billing/reconcile",
            &app.admin_token(),
            json!({}),
        )
        .await;
    assert_eq!(again["fixed"], json!([]), "nothing differs any more");
}

async fn sub_of(app: &TestApp, shop: &Customer) -> String {
    sqlx::query_scalar("SELECT stripe_subscription_id FROM customer_billing WHERE customer_id = $1")
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}
