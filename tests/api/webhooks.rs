//! Stripe's webhooks: signatures, each event applied once whatever the
//! order and repetition of deliveries, and their effect on consumes.

use std::sync::Arc;

use chrono::Utc;
use connected_apps::{
    auth::stripe_signature::sign,
    hot::account::{AccountChange, Once},
};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, spawn_app_with, Customer, TestApp, WEBHOOK_SECRET};

pub fn now() -> i64 {
    Utc::now().timestamp()
}

/// A Stripe subscription object as our subscribe endpoint creates it
/// (our customer id in its metadata), in the current period.
pub fn subscription(customer: Uuid, price: &str, status: &str) -> Value {
    // Whole days, so every event of a test names the same period.
    let (_, end) = current_period();
    json!({"id": format!("sub_{}", customer.simple()), "object": "subscription",
           "customer": "cus_test", "status": status, "cancel_at_period_end": false,
           "metadata": {"customer_id": customer.to_string()},
           "items": {"data": [{"price": {"id": price},
                               "current_period_start": end - 30 * 86_400,
                               "current_period_end": end}]}})
}

/// An invoice of the customer's subscription for the period `[start,
/// end)` (unix seconds), as API versions since 2025 shape it: the
/// subscription under `parent.subscription_details`.
pub fn invoice(customer: Uuid, id: &str, start: i64, end: i64) -> Value {
    json!({"id": id, "object": "invoice",
           "parent": {"type": "subscription_details",
                      "subscription_details": {"subscription": format!("sub_{}", customer.simple()),
                                               "metadata": {"customer_id": customer.to_string()}}},
           "lines": {"data": [{"period": {"start": start, "end": end}}]}})
}

/// The current period of [`subscription`]: `(start, end)`.
pub fn current_period() -> (i64, i64) {
    let end = (now() / 86_400 + 20) * 86_400;
    (end - 30 * 86_400, end)
}

/// Delivers `kind` with `object`, created now, and expects it applied.
pub async fn deliver_applied(app: &TestApp, id: &str, kind: &str, object: Value) {
    let (status, body) = app.stripe_event(id, kind, now(), object).await;
    assert_eq!(
        (status, &body["outcome"]),
        (200, &json!("applied")),
        "{body}"
    );
}

pub async fn subscribed(app: &TestApp, price: &str) -> Customer {
    let shop = app.create_customer(None).await;
    deliver_applied(
        app,
        &format!("evt_created_{}", shop.id.simple()),
        "customer.subscription.created",
        subscription(shop.id, price, "active"),
    )
    .await;
    shop
}

async fn consume(app: &TestApp, shop: &Customer, tokens: i64) -> (u16, Value) {
    app.consume(
        &shop.token,
        json!({"app_id": "rec-001", "tokens_consumed": tokens}),
    )
    .await
}

async fn events_recorded(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM stripe_webhook_events")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn tampered_stale_and_foreign_signatures_are_refused_and_rotated_ones_pass() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let body = json!({"id": "evt_sig", "type": "customer.subscription.created", "created": now(),
                      "data": {"object": subscription(shop.id, "price_starter_monthly", "active")}})
    .to_string();

    let tampered = body.replace("price_starter_monthly", "price_pro_monthly");
    let signature = sign(&[WEBHOOK_SECRET], body.as_bytes(), now());
    let refused = [
        (tampered.clone(), signature.clone()),
        (
            body.clone(),
            sign(&[WEBHOOK_SECRET], body.as_bytes(), now() - 301),
        ),
        (
            body.clone(),
            sign(&["whsec_someone_else"], body.as_bytes(), now()),
        ),
        (body.clone(), "t=1,v1=zz".to_owned()),
    ];
    for (payload, signature) in refused {
        let (status, answer) = app.deliver_webhook(payload, &signature).await;
        assert_eq!(status, 401, "{answer}");
        assert_eq!(answer["error"]["code"], "invalid_signature");
    }
    assert_eq!(events_recorded(&app).await, 0, "nothing applied");

    // Stripe rolling its secret signs with the old and the new one.
    let rotated = sign(&["whsec_retired", WEBHOOK_SECRET], body.as_bytes(), now());
    let (status, _) = app.deliver_webhook(body.clone(), &rotated).await;
    assert_eq!(status, 200);

    // We rolling ours hold both: a delivery under the old one passes too.
    let rolling = spawn_app_with(&[("STRIPE_WEBHOOK_SECRET", "whsec_old, whsec_new")]).await;
    let signed_old = sign(&["whsec_old"], body.as_bytes(), now());
    let (status, _) = rolling.deliver_webhook(body, &signed_old).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_subscription_created_opens_the_plan_to_consumes() {
    let app = spawn_app().await;
    let shop = subscribed(&app, "price_starter_monthly").await;
    app.activate(&shop, "rec-001").await;

    let (status, body) = consume(&app, &shop, 10).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens_remaining"], 990);
    let (plan, status, sub): (String, String, Option<String>) = sqlx::query_as(
        "SELECT plan_id, status, stripe_subscription_id FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((plan.as_str(), status.as_str()), ("starter", "active"));
    assert_eq!(sub, Some(format!("sub_{}", shop.id.simple())));
}

#[tokio::test]
async fn a_failed_payment_is_past_due_consuming_through_the_grace_period_then_refused() {
    for (grace, expected) in [("72", 200), ("0", 402)] {
        let app = spawn_app_with(&[("PAST_DUE_GRACE_HOURS", grace)]).await;
        let shop = subscribed(&app, "price_starter_monthly").await;
        app.activate(&shop, "rec-001").await;
        assert_eq!(consume(&app, &shop, 1).await.0, 200);

        let (start, end) = current_period();
        let invoice = invoice(shop.id, "in_1", start, end);
        let (status, _) = app
            .stripe_event(
                &format!("evt_failed_{grace}"),
                "invoice.payment_failed",
                now(),
                invoice,
            )
            .await;
        assert_eq!(status, 200);

        let (status, body) = consume(&app, &shop, 1).await;
        assert_eq!(status, expected, "grace {grace} h: {body}");
        if expected == 402 {
            assert_eq!(body["error"]["code"], "subscription_inactive");
        }
        let state: String =
            sqlx::query_scalar("SELECT status FROM customer_billing WHERE customer_id = $1")
                .bind(shop.id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(state, "past_due");
    }
}

#[tokio::test]
async fn duplicate_and_reordered_deliveries_leave_the_newest_state_applied_once() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let t = now();
    let created = subscription(shop.id, "price_starter_monthly", "incomplete");
    let updated = subscription(shop.id, "price_pro_monthly", "active");

    // The update (newer) arrives first, then the creation, then the update again.
    let (_, first) = app
        .stripe_event(
            "evt_updated",
            "customer.subscription.updated",
            t,
            updated.clone(),
        )
        .await;
    let (_, late) = app
        .stripe_event(
            "evt_created",
            "customer.subscription.created",
            t - 5,
            created,
        )
        .await;
    let (_, again) = app
        .stripe_event("evt_updated", "customer.subscription.updated", t, updated)
        .await;
    assert_eq!(first["outcome"], "applied");
    assert_eq!(late["outcome"], "ignored", "older than what is applied");
    assert_eq!(again["outcome"], "duplicate");

    let (plan, status): (String, String) =
        sqlx::query_as("SELECT plan_id, status FROM customer_billing WHERE customer_id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!((plan.as_str(), status.as_str()), ("professional", "active"));
}

#[tokio::test]
async fn reaching_the_limit_then_upgrading_lets_consumes_carry_on_at_once() {
    let app = spawn_app().await;
    let shop = subscribed(&app, "price_starter_monthly").await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(consume(&app, &shop, 990).await.0, 200);
    let (status, body) = consume(&app, &shop, 20).await;
    assert_eq!((status, &body["tokens_remaining"]), (402, &json!(10)));

    let (status, _) = app
        .stripe_event(
            "evt_upgrade",
            "customer.subscription.updated",
            now(),
            subscription(shop.id, "price_pro_monthly", "active"),
        )
        .await;
    assert_eq!(status, 200);

    // Professional's 10000, less the 990 used this period.
    let (status, body) = consume(&app, &shop, 20).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens_remaining"], 10_000 - 990 - 20);
}

fn payment_intent(customer: Uuid, id: &str, tokens: i64) -> Value {
    json!({"id": id, "object": "payment_intent", "amount": tokens * 2, "amount_received": tokens * 2,
           "status": "succeeded",
           "metadata": {"customer_id": customer.to_string(), "tokens": tokens.to_string()}})
}

/// A shop with rec-001 active that bought `tokens` with payment intent `pi`.
async fn shop_with_purchase(app: &TestApp, pi: &str, tokens: i64) -> Customer {
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    deliver_applied(
        app,
        &format!("evt_{pi}"),
        "payment_intent.succeeded",
        payment_intent(shop.id, pi, tokens),
    )
    .await;
    shop
}

/// The charge of a purchase of `tokens` (2 cents each), refunded in full.
fn full_refund(pi: &str, tokens: i64) -> Value {
    json!({"id": format!("ch_{pi}"), "object": "charge", "payment_intent": pi,
           "amount": tokens * 2, "amount_refunded": tokens * 2, "refunded": true})
}

/// (purchased tokens credited, purchased tokens used) in the ledger.
async fn ledger_purchased(app: &TestApp, shop: &Customer) -> (i64, i64) {
    sqlx::query_as(
        "SELECT purchased_tokens_credited, purchased_tokens_used FROM customers WHERE id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_purchase_is_credited_once_under_concurrent_duplicate_deliveries() {
    let app = Arc::new(spawn_app().await);
    let shop = app.create_customer(None).await;
    let intent = payment_intent(shop.id, "pi_once", 500);

    // The same event delivered eight times at once, and another event for
    // the same payment intent four times.
    let mut deliveries = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (app, intent) = (app.clone(), intent.clone());
        let id = if i % 3 == 0 { "evt_pi_b" } else { "evt_pi_a" };
        deliveries.spawn(async move {
            app.stripe_event(id, "payment_intent.succeeded", now(), intent)
                .await
                .0
        });
    }
    while let Some(status) = deliveries.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }

    let credited: i64 =
        sqlx::query_scalar("SELECT purchased_tokens_credited FROM customers WHERE id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(credited, 500);
    let status: String = sqlx::query_scalar(
        "SELECT status FROM token_purchases WHERE stripe_payment_intent_id = 'pi_once'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(status, "completed");
    // The live balance, once loaded, has them once too.
    app.activate(&shop, "rec-001").await;
    let (_, body) = consume(&app, &shop, 1).await;
    assert_eq!(body["tokens_remaining"], 499);
}

#[tokio::test]
async fn a_refund_takes_back_the_unspent_purchased_tokens() {
    let app = spawn_app().await;
    let shop = shop_with_purchase(&app, "pi_r", 500).await;
    assert_eq!(consume(&app, &shop, 100).await.0, 200);

    let (status, body) = app
        .stripe_event(
            "evt_refund",
            "charge.refunded",
            now(),
            full_refund("pi_r", 500),
        )
        .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    let (_, again) = app
        .stripe_event(
            "evt_refund_2",
            "charge.refunded",
            now(),
            full_refund("pi_r", 500),
        )
        .await;
    assert_eq!(again["outcome"], "duplicate");

    let (status, body) = consume(&app, &shop, 1).await;
    assert_eq!((status, &body["tokens_remaining"]), (402, &json!(0)));
    let status: String = sqlx::query_scalar(
        "SELECT status FROM token_purchases WHERE stripe_payment_intent_id = 'pi_r'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (ledger_purchased(&app, &shop).await.0, status.as_str()),
        (100, "refunded"),
        "the 100 spent stay spent"
    );
}

#[tokio::test]
async fn a_refund_after_redis_lost_the_hot_state_takes_back_what_the_ledger_holds_unspent() {
    let app = spawn_app().await;
    let shop = shop_with_purchase(&app, "pi_cold", 500).await;
    assert_eq!(consume(&app, &shop, 100).await.0, 200);
    app.drain_usage().await;
    app.wipe_redis().await;

    let (status, body) = app
        .stripe_event(
            "evt_refund_cold",
            "charge.refunded",
            now(),
            full_refund("pi_cold", 500),
        )
        .await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("applied")));

    assert_eq!(
        ledger_purchased(&app, &shop).await,
        (100, 100),
        "the 400 unspent taken back, the 100 spent kept"
    );
    let (status, body) = consume(&app, &shop, 1).await;
    assert_eq!((status, &body["tokens_remaining"]), (402, &json!(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_racing_consumes_takes_back_in_the_ledger_exactly_what_it_took_from_the_live_balance(
) {
    let app = Arc::new(spawn_app().await);
    let mut shops = tokio::task::JoinSet::new();
    for i in 0..4 {
        let app = app.clone();
        shops.spawn(async move {
            let pi = format!("pi_race_{i}");
            let shop = shop_with_purchase(&app, &pi, 300).await;

            // The shop spends its 300 tokens one at a time, eight at once,
            // and its purchase is refunded in full while it does.
            let spending = {
                let (app, shop) = (app.clone(), shop.clone());
                tokio::spawn(async move { app.consume_many(&shop, "rec-001", 400, 8).await })
            };
            while app
                .hot_balance(shop.id)
                .await
                .is_none_or(|(_, left)| left > 250)
            {
                tokio::task::yield_now().await;
            }
            let (status, body) = app
                .stripe_event(
                    &format!("evt_refund_race_{i}"),
                    "charge.refunded",
                    now(),
                    full_refund(&pi, 300),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let charged = spending.await.unwrap().len() as i64;
            (shop, charged)
        });
    }
    let shops = shops.join_all().await;
    app.drain_usage().await;

    for (shop, charged) in shops {
        let (credited, used) = ledger_purchased(&app, &shop).await;
        let (rows, spent) = app.usage_rows(shop.id).await;
        assert_eq!((rows, used), (charged, spent));
        assert_eq!(
            credited, spent,
            "each of the 300 tokens either spent or refunded, once"
        );
        assert_eq!(
            app.hot_balance(shop.id).await,
            Some((0, credited - used)),
            "the live balance and the ledger agree"
        );
    }
}

#[tokio::test]
async fn a_subscription_whose_period_ends_before_it_starts_is_a_400_and_changes_nothing() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let mut sub = subscription(shop.id, "price_pro_monthly", "active");
    let start = &sub["items"]["data"][0]["current_period_start"].clone();
    sub["items"]["data"][0]["current_period_end"] = start.clone();

    let (status, body) = app
        .stripe_event(
            "evt_empty_period",
            "customer.subscription.created",
            now(),
            sub,
        )
        .await;

    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid_request")),
        "{body}"
    );
    assert_eq!(events_recorded(&app).await, 0);
    let (status, _) = app
        .get_json("/api/v1/customer/billing/subscription", &shop.token)
        .await;
    assert_eq!(status, 404, "no subscription recorded");
}

/// A customer with 8 purchased tokens left and its hot state loaded.
async fn loaded_with_eight_tokens(app: &TestApp) -> Customer {
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    app.grant(shop.id, 10).await;
    assert_eq!(consume(app, &shop, 2).await.0, 200);
    shop
}

#[tokio::test]
async fn a_credit_done_in_redis_by_a_delivery_that_died_before_its_commit_is_done_once() {
    let app = spawn_app().await;
    let shop = loaded_with_eight_tokens(&app).await;
    // The first delivery credited the hot state, then its process died
    // before Postgres committed: Stripe saw no answer and delivers again.
    app.state
        .hot
        .update_account(
            shop.id,
            &[AccountChange::CreditPurchased {
                tokens: 500,
                once: Once::purchase("pi_crash"),
            }],
        )
        .await
        .unwrap();

    deliver_applied(
        &app,
        "evt_pi_crash",
        "payment_intent.succeeded",
        payment_intent(shop.id, "pi_crash", 500),
    )
    .await;

    assert_eq!(app.hot_balance(shop.id).await, Some((0, 508)));
    app.drain_usage().await;
    assert_eq!(
        ledger_purchased(&app, &shop).await,
        (510, 2),
        "the ledger caught up"
    );
}

#[tokio::test]
async fn a_take_done_in_redis_by_a_refund_that_died_before_its_commit_is_done_once() {
    let app = spawn_app().await;
    let shop = loaded_with_eight_tokens(&app).await;
    app.stripe_event(
        "evt_pi_back",
        "payment_intent.succeeded",
        now(),
        payment_intent(shop.id, "pi_back", 500),
    )
    .await;
    // The refund's first delivery took the 500 back in Redis and died.
    let once = Once::refund("pi_back", 500);
    let taken = app.state.hot.take_purchased(shop.id, &once, 500).await;
    assert_eq!(taken.unwrap(), Some(500));

    deliver_applied(
        &app,
        "evt_refund_back",
        "charge.refunded",
        full_refund("pi_back", 500),
    )
    .await;

    assert_eq!(app.hot_balance(shop.id).await, Some((0, 8)));
    app.drain_usage().await;
    assert_eq!(ledger_purchased(&app, &shop).await, (10, 2));
}

#[tokio::test]
async fn a_credit_whose_commit_fails_is_undone_in_redis_and_done_once_by_the_retry() {
    let app = spawn_app().await;
    let shop = loaded_with_eight_tokens(&app).await;
    // Postgres refuses the next commit that writes a purchase.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'commit refused'; END $$; \
         CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT OR UPDATE ON token_purchases \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let intent = payment_intent(shop.id, "pi_refused", 500);

    let (status, _) = app
        .stripe_event(
            "evt_refused",
            "payment_intent.succeeded",
            now(),
            intent.clone(),
        )
        .await;
    assert_eq!(status, 500);
    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((0, 8)),
        "the credit undone with its commit"
    );

    sqlx::raw_sql("DROP TRIGGER refuse_commit ON token_purchases")
        .execute(&app.db)
        .await
        .unwrap();
    deliver_applied(&app, "evt_refused", "payment_intent.succeeded", intent).await;
    assert_eq!(app.hot_balance(shop.id).await, Some((0, 508)));
    assert_eq!(ledger_purchased(&app, &shop).await.0, 510);
}

#[tokio::test]
async fn a_switch_from_an_operators_plan_to_stripe_mid_period_starts_a_period_at_the_switch() {
    use fred::prelude::*;
    let app = spawn_app().await;
    let shop = app.create_customer(Some("starter")).await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(consume(&app, &shop, 100).await.0, 200);
    let our_start: chrono::DateTime<Utc> = sqlx::query_scalar(
        "SELECT billing_cycle_start FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    // Stripe's period began ten days ago: not ours, not the one after.
    let (start, end) = (now() - 10 * 86_400, now() + 20 * 86_400);
    let mut sub = subscription(shop.id, "price_pro_monthly", "active");
    sub["items"]["data"][0]["current_period_start"] = json!(start);
    sub["items"]["data"][0]["current_period_end"] = json!(end);

    deliver_applied(&app, "evt_switch", "customer.subscription.created", sub).await;

    let account = app.state.hot.keys().account(shop.id);
    let (period_end, next_ends): (i64, String) = app
        .redis
        .hmget(account, vec!["period_end", "next_ends"])
        .await
        .unwrap();
    let next_end: i64 = next_ends.split(',').next().unwrap().parse().unwrap();
    assert_eq!(
        period_end,
        end * 1000,
        "no period starts at the operator's end, inside Stripe's"
    );
    assert!(next_end > period_end);
    let (anchor, starts, ends): (
        chrono::DateTime<Utc>,
        chrono::DateTime<Utc>,
        chrono::DateTime<Utc>,
    ) = sqlx::query_as(
        "SELECT billing_anchor, billing_cycle_start, billing_cycle_end FROM customer_billing \
             WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((anchor.timestamp(), ends.timestamp()), (start, end));
    let hot_start: i64 = app
        .redis
        .hget(app.state.hot.keys().account(shop.id), "period_start")
        .await
        .unwrap();
    assert!(
        starts > our_start,
        "a new subscription's period begins at the switch"
    );
    assert_eq!(
        starts.timestamp_millis(),
        hot_start,
        "this period's usage is counted over the hot state's window"
    );
    let (status, body) = consume(&app, &shop, 2).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(10_000 - 2)),
        "Professional at once, from zero: the operator's plan's use was the operator's"
    );
    app.drain_usage().await;
    let used: i64 =
        sqlx::query_scalar("SELECT tokens_used FROM customer_billing WHERE customer_id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(used, 2, "the ledger counts the same window");
}

#[tokio::test]
async fn an_event_carrying_a_nul_in_customer_text_is_applied() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let mut intent = payment_intent(shop.id, "pi_nul", 300);
    intent["description"] = json!("gift for Ann\u{0}e");
    intent["shipping"] = json!({"name": "\u{0}"});

    deliver_applied(&app, "evt_pi_nul", "payment_intent.succeeded", intent).await;

    assert_eq!(ledger_purchased(&app, &shop).await, (300, 0));
}

#[tokio::test]
async fn events_we_do_not_act_on_are_acknowledged() {
    let app = spawn_app().await;
    let (status, body) = app
        .stripe_event(
            "evt_other",
            "customer.created",
            now(),
            json!({"id": "cus_1"}),
        )
        .await;
    assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
}

#[tokio::test]
async fn a_downgrade_waits_for_the_period_the_next_invoice_pays_for() {
    let app = spawn_app().await;
    let shop = subscribed(&app, "price_pro_monthly").await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(consume(&app, &shop, 2_000).await.0, 200);

    // Moved to Starter (1000 a period) mid-period: Professional's
    // allowance holds until the period's end.
    let starter = subscription(shop.id, "price_starter_monthly", "active");
    app.stripe_event(
        "evt_down",
        "customer.subscription.updated",
        now(),
        starter.clone(),
    )
    .await;
    let (status, body) = consume(&app, &shop, 1_000).await;
    assert_eq!((status, &body["tokens_remaining"]), (200, &json!(7_000)));

    // The next period, paid: Starter's allowance, from zero.
    let end = starter["items"]["data"][0]["current_period_end"]
        .as_i64()
        .unwrap();
    let invoice = invoice(shop.id, "in_next", end, end + 30 * 86_400);
    let (status, body) = app
        .stripe_event("evt_paid", "invoice.paid", now() + 1, invoice)
        .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("applied")),
        "{body}"
    );
    let plan: String =
        sqlx::query_scalar("SELECT plan_id FROM customer_billing WHERE customer_id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(plan, "starter");
    let (status, body) = consume(&app, &shop, 10).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(990)),
        "{body}"
    );
}

#[tokio::test]
async fn the_stripe_customer_id_is_sealed_at_rest_and_resealed_under_a_new_key() {
    use connected_apps::ledger::{
        billing::reseal_stripe_customers,
        sealed::{stripe_customer_place, Sealer},
    };
    let app = spawn_app().await;
    let shop = subscribed(&app, "price_starter_monthly").await;
    let stored = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT stripe_customer_id FROM customer_billing WHERE customer_id = $1",
        )
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap()
    };
    let place = stripe_customer_place(shop.id);
    let sealed = stored().await;
    assert!(!sealed.contains("cus_test"), "{sealed}");
    assert_eq!(app.state.sealer.open(&sealed, &place).unwrap(), "cus_test");

    // A new key first, the old one kept until everything is re-sealed.
    let ring = format!(
        "k2:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=,{}",
        app.settings.data_encryption_keys.expose()
    );
    let rotated = Sealer::from_ring(&ring).unwrap();
    assert_eq!(reseal_stripe_customers(&app.db, &rotated).await.unwrap(), 1);
    assert_eq!(reseal_stripe_customers(&app.db, &rotated).await.unwrap(), 0);
    let resealed = stored().await;
    assert!(resealed.starts_with("v1:k2:"), "{resealed}");
    let new_key_only =
        Sealer::from_ring("k2:AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=").unwrap();
    assert_eq!(new_key_only.open(&resealed, &place).unwrap(), "cus_test");
}

#[tokio::test]
async fn a_deleted_subscription_stops_consumes_at_once() {
    let app = spawn_app().await;
    let shop = subscribed(&app, "price_starter_monthly").await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(consume(&app, &shop, 1).await.0, 200);

    let (status, _) = app
        .stripe_event(
            "evt_deleted",
            "customer.subscription.deleted",
            now() + 1,
            subscription(shop.id, "price_starter_monthly", "active"),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = consume(&app, &shop, 1).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (402, &json!("subscription_inactive"))
    );
}
