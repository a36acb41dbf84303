//! Billing sequences where money went missing: a period gap then a wiped
//! Redis, a retried subscribe, a cancellation then a new subscription, a
//! late or stale event, a burst of billing changes. Each is a sequence a
//! merchant or Stripe produces; each test failed before its fix.

use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use futures::future::join_all;
use serde_json::{json, Value};

use crate::{
    helpers::{spawn_app, Customer, TestApp},
    stripe_clock::Failure,
    stripe_semantics::with_standin,
    stripe_standin::{StandIn, PROFESSIONAL, STARTER},
    webhooks::{deliver_applied, invoice, now, subscribed, subscription},
};

async fn subscribe(app: &TestApp, shop: &Customer, plan: &str, card: &str) -> (u16, Value) {
    app.post_json(
        "/api/v1/customer/billing/subscribe",
        &shop.token,
        json!({"plan_id": plan, "payment_method_id": card}),
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

async fn billing_of(app: &TestApp, shop: &Customer) -> (String, String, Option<String>) {
    sqlx::query_as(
        "SELECT plan_id, status, stripe_subscription_id FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// Subscribes `shop` to Starter through the API: the subscription and its
/// Stripe customer, as Stripe holds them.
async fn subscribed_to_starter(
    app: &TestApp,
    stripe: &StandIn,
    shop: &Customer,
) -> (String, String) {
    assert_eq!(subscribe(app, shop, "starter", "pm_card_visa").await.0, 201);
    let subscription = billing_of(app, shop).await.2.unwrap();
    let stripe_customer = stripe.subscription(&subscription)["customer"]
        .as_str()
        .unwrap()
        .to_owned();
    (subscription, stripe_customer)
}

// 1. A rebuild after a missed period boundary.

#[tokio::test]
async fn a_rebuild_after_a_missed_boundary_counts_the_usage_of_the_period_entered() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["rec-001"]).await;
    // The scheduler has been down for 10 days into the next period: the
    // ledger still records the period that ended then.
    sqlx::query(
        "UPDATE customer_billing SET billing_anchor = NOW() - INTERVAL '1 month' - INTERVAL '10 days', \
             billing_cycle_start = NOW() - INTERVAL '1 month' - INTERVAL '10 days', \
             billing_cycle_end = NOW() - INTERVAL '10 days' WHERE customer_id = $1",
    )
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();
    app.wipe_redis().await;
    assert_eq!(spend(&app, &shop, 8_000).await.0, 200);
    app.drain_usage().await;

    app.lose_account_hash(shop.id).await;
    let (status, body) = spend(&app, &shop, 2).await;

    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(1_998)),
        "the 8,000 charged in the new period still count after the rebuild"
    );
}

// 6. The period entered after several missed boundaries starts at the
// last boundary passed.

#[tokio::test]
async fn a_consume_after_several_missed_boundaries_starts_the_period_at_the_last_boundary() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    assert_eq!(spend(&app, &shop, 1).await.0, 200);
    // The hot state last rolled two boundaries ago.
    let at = Utc::now().timestamp_millis();
    let (two_ago, one_ago) = (at - 20_000, at - 10_000);
    let next_ends = format!("{one_ago},{},{}", at + 3_600_000, at + 7_200_000);
    let _: () = app
        .redis
        .hset(
            app.state.hot.keys().account(shop.id),
            [
                ("period_start", (two_ago - 10_000).to_string()),
                ("period_end", two_ago.to_string()),
                ("next_ends", next_ends),
            ],
        )
        .await
        .unwrap();

    assert_eq!(spend(&app, &shop, 1).await.0, 200);

    let start: i64 = app
        .redis
        .hget(app.state.hot.keys().account(shop.id), "period_start")
        .await
        .unwrap();
    assert_eq!(start, one_ago, "the period entered began one boundary ago");
}

// 5. The scripts need Redis 7.0: checked at start, on every master.

#[tokio::test]
async fn the_redis_the_suite_runs_on_passes_the_version_check() {
    let app = spawn_app().await;
    connected_apps::hot::version::check(&app.redis)
        .await
        .expect("Redis 7.0 or newer");
}

// 3. Cancel now, subscribe again: a new period of its own.

#[tokio::test]
async fn a_subscription_made_after_cancelling_at_once_starts_from_zero_usage() {
    let (app, _stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(
        subscribe(&app, &shop, "professional", "pm_card_visa")
            .await
            .0,
        201
    );
    assert_eq!(spend(&app, &shop, 9_000).await.0, 200);
    let (status, _) = app
        .delete_json(
            "/api/v1/customer/billing/subscription?immediately=true",
            &shop.token,
        )
        .await;
    assert_eq!(status, 200);

    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );

    let (status, body) = spend(&app, &shop, 1_000).await;
    assert_eq!(
        (status, &body["tokens_remaining"]),
        (200, &json!(0)),
        "Starter's whole month, paid for today: {body}"
    );
}

// 2. A live subscription the service does not see.

#[tokio::test]
async fn a_subscribe_retried_after_its_reply_was_lost_adopts_the_subscription_stripe_made() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    stripe.lose_subscription_replies(true);
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        503,
        "Stripe made it, the reply was lost"
    );
    stripe.lose_subscription_replies(false);

    // The merchant tries again with another card (a new idempotency key).
    let (status, body) = subscribe(&app, &shop, "starter", "pm_card_mastercard").await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(
        stripe.calls("POST", "/v1/subscriptions").len(),
        1,
        "no second subscription"
    );
    assert_eq!(
        billing_of(&app, &shop).await.2.as_deref(),
        body["stripe_subscription_id"].as_str()
    );
}

#[tokio::test]
async fn a_change_whose_reply_was_lost_is_read_back_from_stripe() {
    let (app, stripe) = with_standin().await;
    stripe.with_clock(30 * 86_400);
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    stripe.fail_next(Failure::LoseReply);
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
        "the upgrade Stripe made: {body}"
    );

    stripe.fail_next(Failure::LoseReply);
    let (status, body) = app
        .delete_json(
            "/api/v1/customer/billing/subscription?immediately=true",
            &shop.token,
        )
        .await;

    assert_eq!(
        (status, &body["status"]),
        (200, &json!("canceled")),
        "{body}"
    );
    assert_eq!(
        spend(&app, &shop, 1).await.1["error"]["code"],
        "subscription_inactive",
        "not served once Stripe cancelled"
    );
}

#[tokio::test]
async fn when_the_subscription_ends_while_another_is_live_the_live_one_is_adopted() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    let (first, stripe_customer) = subscribed_to_starter(&app, &stripe, &shop).await;
    let second =
        stripe.subscribe_behind_our_back(&stripe_customer, PROFESSIONAL, &shop.id.to_string());
    stripe.change_behind_our_back(&first, STARTER, "canceled");

    deliver_applied(
        &app,
        "evt_first_deleted",
        "customer.subscription.deleted",
        stripe.subscription(&first),
    )
    .await;

    assert_eq!(
        billing_of(&app, &shop).await,
        (
            "professional".to_owned(),
            "active".to_owned(),
            second["id"].as_str().map(str::to_owned)
        ),
        "the one the merchant still pays for"
    );
}

#[tokio::test]
async fn the_reconciliation_reports_every_customer_with_two_live_subscriptions() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    let (first, stripe_customer) = subscribed_to_starter(&app, &stripe, &shop).await;
    let second = stripe.subscribe_behind_our_back(&stripe_customer, STARTER, &shop.id.to_string());

    let (status, report) = app
        .post_json(
            "/api/v1/admin/billing/reconcile",
            &app.admin_token(),
            json!({}),
        )
        .await;

    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["duplicates"],
        json!([{"customer_id": shop.id, "subscriptions": [second["id"], first]}])
    );
    assert!(app
        .metrics_text()
        .await
        .contains("billing_duplicate_subscriptions 1"));
    assert_eq!(
        billing_of(&app, &shop).await.2.as_deref(),
        Some(first.as_str()),
        "ours stays the one metered"
    );
}

// 7. Canceled is final, whatever the seconds say.

#[tokio::test]
async fn a_stale_update_of_the_same_second_as_the_deletion_does_not_reopen_the_subscription() {
    let app = spawn_app().await;
    let shop = subscribed(&app, STARTER).await;
    app.activate(&shop, "rec-001").await;
    let t = now() + 5;
    let (status, _) = app
        .stripe_event(
            "evt_deleted",
            "customer.subscription.deleted",
            t,
            subscription(shop.id, STARTER, "canceled"),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body) = app
        .stripe_event(
            "evt_stale_update",
            "customer.subscription.updated",
            t,
            subscription(shop.id, STARTER, "active"),
        )
        .await;

    assert_eq!((status, &body["outcome"]), (200, &json!("ignored")));
    assert_eq!(billing_of(&app, &shop).await.1, "canceled");
    assert_eq!(
        spend(&app, &shop, 1).await.1["error"]["code"],
        "subscription_inactive"
    );
}

// 9. A subscription another customer holds.

#[tokio::test]
async fn an_event_naming_another_customer_for_a_held_subscription_is_recorded_as_conflicting() {
    let app = spawn_app().await;
    let holder = subscribed(&app, STARTER).await;
    let other = app.create_customer(None).await;
    let mut sub = subscription(holder.id, PROFESSIONAL, "active");
    sub["metadata"]["customer_id"] = json!(other.id.to_string());

    let (status, body) = app
        .stripe_event(
            "evt_wrong_customer",
            "customer.subscription.updated",
            now(),
            sub,
        )
        .await;

    assert_eq!(
        (status, &body["outcome"]),
        (200, &json!("conflicting")),
        "{body}"
    );
    assert_eq!(billing_of(&app, &holder).await.0, "starter");
}

// 8. A burst of billing changes takes no other route down.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_billing_changes_leaves_every_other_route_answering() {
    let (app, stripe) = with_standin().await;
    let busy = app.create_customer(None).await;
    assert_eq!(
        subscribe(&app, &busy, "starter", "pm_card_visa").await.0,
        201
    );
    let newcomers = join_all((0..10).map(|_| app.create_customer(None))).await;
    let bystander = app.create_customer(Some("starter")).await;
    stripe.slow_subscriptions(Duration::from_millis(1_500));

    let changes = join_all((0..20).map(|i| {
        let plan = if i % 2 == 0 {
            "professional"
        } else {
            "starter"
        };
        app.patch_json(
            "/api/v1/customer/billing/subscription",
            &busy.token,
            json!({"plan_id": plan}),
        )
    }));
    let subscribes = join_all(
        newcomers
            .iter()
            .map(|shop| subscribe(&app, shop, "starter", "pm_card_visa")),
    );
    let others = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        join_all(
            (0..20)
                .map(|_| app.get_json("/api/v1/customer/billing/subscription", &bystander.token)),
        )
        .await
    };
    let (changes, subscribes, others) = tokio::join!(changes, subscribes, others);

    let statuses = |answers: &[(u16, Value)]| answers.iter().map(|a| a.0).collect::<Vec<_>>();
    assert_eq!(statuses(&others), vec![200; 20], "{others:?}");
    assert_eq!(statuses(&subscribes), vec![201; 10], "{subscribes:?}");
    assert!(
        changes.iter().all(|(s, _)| *s == 200 || *s == 409),
        "one change at a time, the rest 409 at once: {changes:?}"
    );
    assert!(changes.iter().any(|(s, _)| *s == 200), "{changes:?}");
}

// Found by the simulation: the `created` event of a subscription,
// delivered after our reply to its cancellation, reopened it.

#[tokio::test]
async fn a_stale_created_event_after_our_cancellation_does_not_undo_it() {
    let (app, stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(
        subscribe(&app, &shop, "starter", "pm_card_visa").await.0,
        201
    );
    let id = billing_of(&app, &shop).await.2.unwrap();
    let created = stripe.subscription(&id);
    let (status, _) = app
        .delete_json("/api/v1/customer/billing/subscription", &shop.token)
        .await;
    assert_eq!(status, 200);

    let (status, body) = app
        .stripe_event(
            "evt_created_late",
            "customer.subscription.created",
            now(),
            created,
        )
        .await;

    assert_eq!(status, 200, "{body}");
    let cancelling: bool = sqlx::query_scalar(
        "SELECT cancel_at_period_end FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(cancelling, "the cancellation Stripe holds stands");
}

// Found by the simulation: a renewal's `updated` delivered after the
// `invoice.paid` of a later period rewound the period.

#[tokio::test]
async fn an_update_of_an_older_period_after_a_later_renewal_was_paid_is_history() {
    let app = spawn_app().await;
    let shop = subscribed(&app, STARTER).await;
    let (start, end) = crate::webhooks::current_period();
    let next_end = end + 30 * 86_400;
    deliver_applied(
        &app,
        "evt_renewal_paid",
        "invoice.paid",
        crate::webhooks::invoice(shop.id, "in_renewal", end, next_end),
    )
    .await;

    let mut stale = subscription(shop.id, STARTER, "active");
    stale["items"]["data"][0]["current_period_start"] = json!(start);
    stale["items"]["data"][0]["current_period_end"] = json!(end);
    let (status, body) = app
        .stripe_event(
            "evt_stale_period",
            "customer.subscription.updated",
            now() + 60,
            stale,
        )
        .await;

    assert_eq!(
        (status, &body["outcome"]),
        (200, &json!("ignored")),
        "{body}"
    );
    let (period_start, period_end): (chrono::DateTime<Utc>, chrono::DateTime<Utc>) =
        sqlx::query_as(
            "SELECT billing_cycle_start, billing_cycle_end FROM customer_billing WHERE customer_id = $1",
        )
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        (period_start.timestamp(), period_end.timestamp()),
        (end, next_end),
        "the renewed period stands"
    );
}

// Found by the simulation: a past-due subscription cancelled at its
// period's end was served past the end, for the rest of its grace.

#[tokio::test]
async fn a_past_due_subscription_cancelled_at_its_periods_end_closes_at_the_end() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let end = now() + 2;
    let mut sub = subscription(shop.id, STARTER, "past_due");
    sub["items"]["data"][0]["current_period_start"] = json!(end - 30 * 86_400);
    sub["items"]["data"][0]["current_period_end"] = json!(end);
    sub["cancel_at_period_end"] = json!(true);
    deliver_applied(
        &app,
        "evt_past_due_ending",
        "customer.subscription.created",
        sub,
    )
    .await;
    app.activate(&shop, "rec-001").await;
    assert_eq!(
        spend(&app, &shop, 1).await.0,
        200,
        "within its grace and period"
    );

    tokio::time::sleep(Duration::from_millis(((end - now()) as u64 + 1) * 1000)).await;

    assert_eq!(
        spend(&app, &shop, 1).await.1["error"]["code"],
        "subscription_inactive",
        "past its period's end, whatever the grace"
    );
}

// Found by the simulation (seed 1422043588): a renewal's failure delivered
// after the merchant had cancelled at the period's end opened the account
// for the whole grace, past the end; a late payment of it, for good.

#[tokio::test]
async fn an_invoice_event_after_a_cancellation_at_the_periods_end_keeps_the_end() {
    let app = spawn_app().await;
    let end = now() + 2;
    let mut shops = Vec::new();
    for kind in ["invoice.payment_failed", "invoice.paid"] {
        let shop = app.create_customer(None).await;
        let mut sub = subscription(shop.id, STARTER, "past_due");
        sub["items"]["data"][0]["current_period_start"] = json!(end - 30 * 86_400);
        sub["items"]["data"][0]["current_period_end"] = json!(end);
        sub["cancel_at_period_end"] = json!(true);
        let tag = shop.id.simple();
        deliver_applied(
            &app,
            &format!("evt_ending_{tag}"),
            "customer.subscription.created",
            sub,
        )
        .await;
        // The account is in Redis (an event changes it in place there)...
        app.activate(&shop, "rec-001").await;
        assert_eq!(spend(&app, &shop, 1).await.0, 200, "{kind}: before the end");
        // ... when the renewal's invoice event comes.
        let renewal = invoice(shop.id, &format!("in_{tag}"), end - 30 * 86_400, end);
        deliver_applied(&app, &format!("evt_invoice_{tag}"), kind, renewal).await;
        assert_eq!(
            spend(&app, &shop, 1).await.0,
            200,
            "{kind}: still before the end"
        );
        shops.push((kind, shop));
    }

    tokio::time::sleep(Duration::from_millis(((end - now()) as u64 + 1) * 1000)).await;

    for (kind, shop) in &shops {
        assert_eq!(
            spend(&app, shop, 1).await.1["error"]["code"],
            "subscription_inactive",
            "after {kind}: closed at the period's end"
        );
    }
}
