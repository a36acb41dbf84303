//! Exactness under concurrency: no overdraw, no double charge.

use std::collections::HashSet;

use connected_apps::{
    config::Limit,
    hot::charge::{Charge, ChargeOutcome, Idempotency},
};

use fred::interfaces::KeysInterface;
use futures::future::join_all;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_consumes_never_overdraw_and_each_sees_its_own_balance() {
    let app = spawn_app().await;
    // starter: 1000 tokens; rec-001 costs 2, so exactly 500 can succeed…
    // and with 100 purchased on top, exactly 550 of 600.
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 100).await;

    let results =
        join_all((0..600).map(|_| app.consume(&shop.token, json!({"app_id": "rec-001"})))).await;

    let charged: Vec<i64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["tokens_remaining"].as_i64().unwrap())
        .collect();
    let refused = results
        .iter()
        .filter(|(s, b)| *s == 402 && b["error"]["code"] == "insufficient_tokens")
        .count();
    assert_eq!(charged.len(), 550);
    assert_eq!(refused, 50);
    let distinct: HashSet<i64> = charged.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        550,
        "every success saw a balance of its own"
    );
    assert_eq!(distinct.iter().min(), Some(&0));
    assert_eq!(app.hot_balance(shop.id).await, Some((1000, 0)));

    // And the ledger agrees once the events are persisted.
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (550, 1100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_retries_raced_concurrently_charge_once_and_answer_alike() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let responses = join_all((0..50).map(|_| {
        app.http
            .post(app.url("/api/v1/customer/tokens/consume"))
            .bearer_auth(&shop.token)
            .header("Idempotency-Key", "checkout-7")
            .json(&json!({"app_id": "vto-001", "session_id": "sess-1"}))
            .send()
    }))
    .await;

    let mut bodies = HashSet::new();
    let mut replayed = 0;
    for response in responses {
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        if response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
        {
            replayed += 1;
        }
        bodies.insert(response.text().await.unwrap());
    }
    assert_eq!(bodies.len(), 1, "every retry got the first response");
    assert_eq!(replayed, 49);
    assert_eq!(app.hot_balance(shop.id).await, Some((5, 0)));
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (1, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_that_miss_the_redis_deadline_are_503_and_charge_nothing() {
    // A deadline so short that, under this burst, many scripts reach Redis
    // only after their caller has given up.
    // The outcome read gets all the time it needs: what is tested is that a
    // 503 it confirms was never charged.
    let app = crate::helpers::spawn_app_with(&[
        ("REDIS_TIMEOUT_MS", "20"),
        ("REDIS_SETTLE_TIMEOUT_MS", "5000"),
    ])
    .await;
    let shop = app.create_customer(Some("enterprise")).await;
    // Setting up talks to Redis too, under the same short deadline: retry it.
    while app
        .http
        .post(app.url("/api/v1/customer/apps/rec-001/activate"))
        .bearer_auth(&shop.token)
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {}
    // Load the hot state first, so the burst measures charging alone.
    while app
        .consume(&shop.token, json!({"app_id": "rec-001"}))
        .await
        .0
        != 200
    {}

    let results =
        join_all((0..600).map(|_| app.consume(&shop.token, json!({"app_id": "rec-001"})))).await;

    let charged = results.iter().filter(|(s, _)| *s == 200).count() as i64;
    let unavailable = results
        .iter()
        .filter(|(s, b)| *s == 503 && b["error"]["code"] == "unavailable")
        .count() as i64;
    assert_eq!(
        charged + unavailable,
        600,
        "every request was charged or refused with 503"
    );
    let (used, _) = app.hot_balance(shop.id).await.unwrap();
    assert_eq!(used, 2 * (charged + 1), "a 503 never charged");
    app.drain_usage().await;
    assert_eq!(
        app.usage_rows(shop.id).await,
        (charged + 1, 2 * (charged + 1))
    );
}

/// A professional shop with `rec-001` active and its hot state loaded (one
/// consume of 2 tokens charged).
async fn loaded_shop() -> (crate::helpers::TestApp, crate::helpers::Customer) {
    let app = crate::helpers::spawn_app().await;
    let shop = app.customer_with_apps("professional", &["rec-001"]).await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(status, 200, "{body}");
    (app, shop)
}

/// A charge of one use of `rec-001` for `shop`, as the consume endpoint
/// builds it.
fn rec_charge<'a>(
    app: &'a crate::helpers::TestApp,
    shop: &crate::helpers::Customer,
    idempotency: Option<Idempotency<'a>>,
) -> Charge<'a> {
    let rec = app.state.catalog.get("rec-001").unwrap();
    Charge {
        customer: shop.id,
        app_slug: "rec-001",
        app_id: rec.row.id,
        tokens: 2,
        event_id: uuid::Uuid::now_v7(),
        embed_key: None,
        idempotency,
        session_id: None,
        metadata: None,
        customer_limit: Limit::NONE,
    }
}

#[tokio::test]
async fn a_consume_that_reaches_redis_after_its_settle_charges_nothing_whatever_the_clocks_say() {
    let (app, shop) = loaded_shop().await;
    let hot = &app.state.hot;

    // The caller gave up on this charge and settled it: the script, queued
    // behind others, runs only now, well within its deadline.
    let late = rec_charge(&app, &shop, None);
    assert_eq!(
        hot.settle(&late).await.unwrap(),
        ChargeOutcome::DeadlinePassed
    );
    let outcome = hot.charge(&late).await.unwrap();

    assert_eq!(outcome, ChargeOutcome::DeadlinePassed);
    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((2, 0)),
        "nothing charged"
    );
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (1, 2), "no event written");
}

#[tokio::test]
async fn a_settle_after_the_charge_finds_it_and_answers_charged() {
    let (app, shop) = loaded_shop().await;
    let hot = &app.state.hot;

    let answered_late = rec_charge(&app, &shop, None);
    let charged = hot.charge(&answered_late).await.unwrap();
    let settled = hot.settle(&answered_late).await.unwrap();

    assert!(matches!(
        charged,
        ChargeOutcome::Charged {
            tokens_remaining: 9996,
            ..
        }
    ));
    assert!(matches!(
        settled,
        ChargeOutcome::Charged {
            tokens_remaining: 9996,
            ..
        }
    ));
}

#[tokio::test]
async fn a_fence_keeps_its_charge_records_for_the_hour_however_many_consumes_follow_it() {
    let (app, shop) = loaded_shop().await;
    let hot = &app.state.hot;
    // Three consumes whose ids were minted in one second share one record
    // hash (hot/keys.rs).
    let second = uuid::Uuid::now_v7().get_timestamp().unwrap().to_unix().0;
    let minted = |nanos| {
        let mut charge = rec_charge(&app, &shop, None);
        charge.event_id =
            uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, second, nanos));
        charge
    };
    let (before, given_up, after) = (minted(1_000), minted(2_000), minted(3_000));
    let records = hot.charge_records(shop.id, before.event_id);
    let ttl = || async { app.redis.ttl::<i64, _>(&records).await.unwrap() };

    hot.charge(&before).await.unwrap();
    let kept_for_a_charge = ttl().await;
    hot.settle(&given_up).await.unwrap();
    let after_charged = hot.charge(&after).await.unwrap();
    let late = hot.charge(&given_up).await.unwrap();

    assert!((1..=10).contains(&kept_for_a_charge), "{kept_for_a_charge}");
    assert!(matches!(after_charged, ChargeOutcome::Charged { .. }));
    assert!(
        ttl().await > 3500,
        "a consume never shortens a fence's hour"
    );
    assert_eq!(late, ChargeOutcome::DeadlinePassed, "the fence holds");
    assert_eq!(
        hot.settle(&before).await.unwrap(),
        ChargeOutcome::Charged {
            tokens_remaining: 9996,
            from_purchased: 0,
            at_ms: 0
        },
        "the records around the fence are still found"
    );
}

#[tokio::test]
async fn a_fenced_idempotent_consume_stays_fenced_and_its_retry_charges_once() {
    let (app, shop) = loaded_shop().await;
    let hot = &app.state.hot;
    let key = Idempotency {
        key: "order-42",
        fingerprint: "same-body",
        ttl_secs: 600,
    };

    // Two attempts under one key were given up on and settled; the retry
    // that follows charges; the two stale scripts then run.
    let first = rec_charge(&app, &shop, Some(key));
    let second = rec_charge(&app, &shop, Some(key));
    assert_eq!(
        hot.settle(&first).await.unwrap(),
        ChargeOutcome::DeadlinePassed
    );
    assert_eq!(
        hot.settle(&second).await.unwrap(),
        ChargeOutcome::DeadlinePassed
    );
    assert_eq!(
        hot.charge(&second).await.unwrap(),
        ChargeOutcome::DeadlinePassed
    );
    let retry = rec_charge(&app, &shop, Some(key));
    let charged = hot.charge(&retry).await.unwrap();
    let stale = hot.charge(&first).await.unwrap();

    assert!(
        matches!(charged, ChargeOutcome::Charged { .. }),
        "{charged:?}"
    );
    assert!(
        matches!(stale, ChargeOutcome::Replayed { event_id, .. } if event_id == retry.event_id),
        "the stale attempt is answered as a replay of the charge: {stale:?}"
    );
    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((4, 0)),
        "one charge under the key"
    );
}
