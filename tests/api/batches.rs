//! Consumes coalesced into one script call (hot/coalesce.rs): each charge
//! of a batch is answered as if it came alone, and a batch that fails
//! mid-way leaves each charge settled on its own. On one Redis server a
//! call carries the charges of several shards, and the same holds of it
//! (the second half of this file); in a Redis Cluster a call stays within
//! one shard, so those tests have nothing to drive there.

use std::collections::HashSet;

use connected_apps::{
    config::Limit,
    hot::charge::{Charge, ChargeOutcome, Idempotency},
};
use fred::interfaces::{HashesInterface, KeysInterface};
use futures::future::join_all;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Customer, TestApp};

/// A professional shop (10,000 tokens a period) with `rec-001` active and
/// its hot state loaded (one consume of 2 tokens charged).
async fn loaded_shop(app: &TestApp) -> Customer {
    let shop = app.customer_with_apps("professional", &["rec-001"]).await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(status, 200, "{body}");
    shop
}

/// One use of `app_slug` by `customer`, as the consume endpoint builds it.
fn use_of<'a>(app: &'a TestApp, customer: Uuid, app_slug: &'a str, tokens: i64) -> Charge<'a> {
    Charge {
        customer,
        app_slug,
        app_id: app.state.catalog.get(app_slug).unwrap().row.id,
        tokens,
        event_id: Uuid::now_v7(),
        embed_key: None,
        idempotency: None,
        session_id: None,
        metadata: None,
        customer_limit: Limit::NONE,
    }
}

/// `n` loaded professional shops whose accounts live in `n` different
/// shards, each with `rec-001` active and 2 tokens used.
async fn shops_of_different_shards(app: &TestApp, n: usize) -> Vec<Customer> {
    let keys = app.state.hot.keys();
    assert!(usize::from(keys.shards()) >= n, "enough shards");
    let mut shops: Vec<Customer> = Vec::new();
    while shops.len() < n {
        let shop = loaded_shop(app).await;
        if shops
            .iter()
            .all(|s| keys.shard_of(s.id) != keys.shard_of(shop.id))
        {
            shops.push(shop);
        }
    }
    shops
}

/// Ends `customer`'s period a second ago with all but 3 tokens used; the
/// next ends in 30 days, with the same allowance. Returns the account's key
/// and the next period's end.
async fn period_just_ended(app: &TestApp, customer: Uuid) -> (String, i64) {
    let now = chrono::Utc::now().timestamp_millis();
    let account = app.state.hot.keys().account(customer);
    let next_end = now + 30 * 86_400_000;
    let _: i64 = app
        .redis
        .hset(
            &account,
            vec![
                ("used", "9997".to_owned()),
                ("period_end", (now - 1_000).to_string()),
                ("next_ends", next_end.to_string()),
                ("next_allowance", "10000".to_owned()),
            ],
        )
        .await
        .unwrap();
    (account, next_end)
}

/// A customer of `shard` whose account key holds a string: the consume
/// script fails on it with a Redis error, after the charges before it in
/// its call were made.
async fn broken_account_in(app: &TestApp, shard: u16) -> Uuid {
    let hot = &app.state.hot;
    let broken = std::iter::repeat_with(Uuid::new_v4)
        .find(|id| hot.keys().shard_of(*id) == shard)
        .unwrap();
    let _: () = app
        .redis
        .set(hot.keys().account(broken), "not a hash", None, None, false)
        .await
        .unwrap();
    broken
}

fn outcomes(results: Vec<Result<ChargeOutcome, connected_apps::hot::HotError>>) -> Vec<String> {
    results
        .into_iter()
        .map(|r| match r {
            Ok(ChargeOutcome::Charged {
                tokens_remaining, ..
            }) => format!("charged, {tokens_remaining} left"),
            Ok(ChargeOutcome::Replayed { tokens, .. }) => format!("replayed {tokens}"),
            Ok(ChargeOutcome::InsufficientTokens { tokens_remaining }) => {
                format!("insufficient, {tokens_remaining} left")
            }
            Ok(ChargeOutcome::RateLimited(_)) => "rate limited".into(),
            Ok(other) => format!("{other:?}"),
            Err(_) => "error".into(),
        })
        .collect()
}

#[tokio::test]
async fn one_batch_answers_each_charge_as_if_it_came_alone() {
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    let order = |fingerprint| Idempotency {
        key: "order-9",
        fingerprint,
        ttl_secs: 600,
    };
    // One request an hour, no burst (the tests' own consume limit is far
    // above their rates, so the shop's limiter is rested): the first consume
    // of the batch under it passes, the second, at the same instant, is
    // limited.
    fn limited(mut charge: Charge<'_>) -> Charge<'_> {
        charge.customer_limit = Limit {
            per_hour: 1,
            burst: 1,
        };
        charge
    }
    let app = &app;
    let mut first_of_order = use_of(app, shop.id, "rec-001", 2);
    first_of_order.idempotency = Some(order("body-a"));
    let mut retry_of_order = use_of(app, shop.id, "rec-001", 2);
    retry_of_order.idempotency = Some(order("body-a"));
    let mut order_with_another_body = use_of(app, shop.id, "rec-001", 2);
    order_with_another_body.idempotency = Some(order("body-b"));

    let batch = [
        use_of(app, shop.id, "rec-001", 2),
        use_of(app, shop.id, "rec-001", 1_000_000),
        use_of(app, shop.id, "vto-001", 5),
        limited(use_of(app, shop.id, "rec-001", 2)),
        limited(use_of(app, shop.id, "rec-001", 2)),
        first_of_order,
        retry_of_order,
        order_with_another_body,
        use_of(app, shop.id, "rec-001", 0),
        use_of(app, shop.id, "rec-001", 2),
    ];
    let results = app.state.hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        [
            "charged, 9996 left",
            "insufficient, 9996 left",
            "AppNotActive",
            "charged, 9994 left",
            "rate limited",
            "charged, 9992 left",
            "replayed 2",
            "IdempotencyConflict",
            "error",
            "charged, 9990 left",
        ],
        "each refusal touched no other charge"
    );
    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((10, 0)),
        "five charges of 2"
    );
    app.drain_usage().await;
    assert_eq!(
        app.usage_rows(shop.id).await,
        (5, 10),
        "one event per charge"
    );
}

#[tokio::test]
async fn a_batch_across_the_period_boundary_charges_every_use_in_the_new_period() {
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    let (account, next_end) = period_just_ended(&app, shop.id).await;

    let batch: Vec<_> = (0..3)
        .map(|_| use_of(&app, shop.id, "rec-001", 2))
        .collect();
    let results = app.state.hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        [
            "charged, 9998 left",
            "charged, 9996 left",
            "charged, 9994 left"
        ],
        "the first rolled the period; the others charged in it"
    );
    let period: Vec<Option<i64>> = app
        .redis
        .hmget(&account, vec!["used", "period_end"])
        .await
        .unwrap();
    assert_eq!(period, [Some(6), Some(next_end)]);
}

#[tokio::test]
async fn a_batch_that_fails_mid_way_settles_each_charge_on_its_own() {
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    // A customer of the same shard whose account the script fails on after
    // the charge before it was made; the reply of the whole call is lost.
    let hot = &app.state.hot;
    let broken = broken_account_in(&app, hot.keys().shard_of(shop.id)).await;

    let before = use_of(&app, shop.id, "rec-001", 2);
    let after = use_of(&app, shop.id, "rec-001", 2);
    let batch = [before, use_of(&app, broken, "rec-001", 2), after];
    let results = hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        ["charged, 9996 left", "DeadlinePassed", "DeadlinePassed"],
        "the charge made before the failure is found; the others are fenced"
    );
    // The fenced charge never happens, even if its call reaches Redis again.
    let again = hot.charge(&batch[2]).await.unwrap();
    assert_eq!(again, ChargeOutcome::DeadlinePassed);
    assert_eq!(app.hot_balance(shop.id).await, Some((4, 0)));
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (2, 4));
}

#[tokio::test]
async fn a_batch_that_fails_mid_way_still_gives_its_charge_records_their_ttl() {
    // The record hashes get their TTL after the last charge of a call
    // (lua/consume.lua): a failure before it must not leave them for good.
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    let hot = &app.state.hot;
    let broken = broken_account_in(&app, hot.keys().shard_of(shop.id)).await;
    let charged = use_of(&app, shop.id, "rec-001", 2);
    // With an Idempotency-Key its settle fences its own key, not the hash.
    let mut failing = use_of(&app, broken, "rec-001", 2);
    failing.idempotency = Some(Idempotency {
        key: "order-1",
        fingerprint: "body-a",
        ttl_secs: 600,
    });
    let records = hot.charge_records(shop.id, charged.event_id);

    let results = hot.charge_all(&[charged, failing]).await.unwrap();

    assert_eq!(outcomes(results), ["charged, 9996 left", "DeadlinePassed"]);
    let ttl: i64 = app.redis.ttl(&records).await.unwrap();
    assert!((1..=10).contains(&ttl), "the records expire: TTL {ttl}");
}

#[tokio::test]
async fn a_charge_whose_event_cannot_be_written_leaves_no_record_and_is_not_charged() {
    // The usage stream's key holds a string: the XADD fails after the
    // charge was checked. Its record must not say it was charged.
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    let hot = &app.state.hot;
    let stream = hot.keys().usage_stream(hot.keys().shard_of(shop.id));
    let _: () = app
        .redis
        .set(stream, "not a stream", None, None, false)
        .await
        .unwrap();

    let results = hot
        .charge_all(&[use_of(&app, shop.id, "rec-001", 2)])
        .await
        .unwrap();

    assert_eq!(outcomes(results), ["DeadlinePassed"], "settled: fenced");
    assert_eq!(app.hot_balance(shop.id).await, Some((2, 0)), "not charged");
}

#[tokio::test]
async fn a_call_sent_twice_charges_each_use_once_and_answers_both_sendings_alike() {
    // In a Redis Cluster a slot moving to another master makes the client
    // send a call again (MOVED, ASK); a call that did run must not charge
    // twice, and its second answer must say "charged" as the first did.
    let app = crate::helpers::spawn_app().await;
    let shop = loaded_shop(&app).await;
    let mut keyed = use_of(&app, shop.id, "rec-001", 2);
    keyed.idempotency = Some(Idempotency {
        key: "order-10",
        fingerprint: "body-a",
        ttl_secs: 600,
    });
    let batch = [
        use_of(&app, shop.id, "rec-001", 2),
        keyed,
        use_of(&app, shop.id, "rec-001", 2),
    ];

    let first = app.state.hot.charge_all(&batch).await.unwrap();
    let second = app.state.hot.charge_all(&batch).await.unwrap();

    let charged = [
        "charged, 9996 left",
        "charged, 9994 left",
        "charged, 9992 left",
    ];
    assert_eq!(outcomes(first), charged);
    assert_eq!(outcomes(second), charged, "answered from each own record");
    assert_eq!(app.hot_balance(shop.id).await, Some((8, 0)), "charged once");
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (4, 8), "one event per use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumes_share_calls_and_stay_exact() {
    let app = crate::helpers::spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 100).await;
    let (status, _) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(status, 200);

    let before = app.metrics_text().await;
    let results =
        join_all((0..600).map(|_| app.consume(&shop.token, json!({"app_id": "rec-001"})))).await;
    let after = app.metrics_text().await;

    let remaining: HashSet<i64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["tokens_remaining"].as_i64().unwrap())
        .collect();
    assert_eq!(
        remaining.len(),
        549,
        "549 more charges of 2, each its own balance"
    );
    assert_eq!(app.hot_balance(shop.id).await, Some((1000, 0)));
    let (calls, charges) = calls_and_charges(&before, &after);
    assert!(charges >= 600.0, "every consume went through a call");
    assert!(calls < charges, "some calls carried more than one charge");
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (550, 1100));
}

// Several shards in one call (one Redis server).

#[tokio::test]
async fn one_call_answers_the_charges_of_several_shards_each_as_if_it_came_alone() {
    let app = crate::helpers::spawn_app().await;
    if app.state.hot.clustered() {
        return;
    }
    let shops = shops_of_different_shards(&app, 3).await;
    let [a, b, c] = [shops[0].id, shops[1].id, shops[2].id];
    let app = &app;
    let order = |fingerprint| Idempotency {
        key: "order-9",
        fingerprint,
        ttl_secs: 600,
    };
    let keyed = |customer, fingerprint| {
        let mut charge = use_of(app, customer, "rec-001", 3);
        charge.idempotency = Some(order(fingerprint));
        charge
    };

    // The same Idempotency-Key at two shops is two keys; a shop's refusal
    // touches neither the others' charges nor their balances.
    let batch = [
        use_of(app, a, "rec-001", 2),
        use_of(app, b, "rec-001", 1_000_000),
        use_of(app, c, "vto-001", 5),
        keyed(a, "body-a"),
        keyed(b, "body-a"),
        keyed(a, "body-a"),
        keyed(b, "body-b"),
        use_of(app, c, "rec-001", 0),
        use_of(app, c, "rec-001", 4),
        use_of(app, b, "rec-001", 2),
    ];
    let results = app.state.hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        [
            "charged, 9996 left",
            "insufficient, 9998 left",
            "AppNotActive",
            "charged, 9993 left",
            "charged, 9995 left",
            "replayed 3",
            "IdempotencyConflict",
            "error",
            "charged, 9994 left",
            "charged, 9993 left",
        ],
        "each charge answered from its own shop's balance and records"
    );
    assert_eq!(app.hot_balance(a).await, Some((7, 0)));
    assert_eq!(app.hot_balance(b).await, Some((7, 0)));
    assert_eq!(app.hot_balance(c).await, Some((6, 0)));
    app.drain_usage().await;
    assert_eq!(
        app.usage_rows(a).await,
        (3, 7),
        "each event in its shop's stream"
    );
    assert_eq!(app.usage_rows(b).await, (3, 7));
    assert_eq!(app.usage_rows(c).await, (2, 6));
}

#[tokio::test]
async fn one_call_rolls_the_period_of_the_shop_whose_period_ended_and_no_other() {
    let app = crate::helpers::spawn_app().await;
    if app.state.hot.clustered() {
        return;
    }
    let shops = shops_of_different_shards(&app, 2).await;
    let (ended, running) = (shops[0].id, shops[1].id);
    let (account, next_end) = period_just_ended(&app, ended).await;

    let batch = [
        use_of(&app, running, "rec-001", 2),
        use_of(&app, ended, "rec-001", 2),
        use_of(&app, running, "rec-001", 2),
        use_of(&app, ended, "rec-001", 2),
    ];
    let results = app.state.hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        [
            "charged, 9996 left",
            "charged, 9998 left",
            "charged, 9994 left",
            "charged, 9996 left"
        ],
        "the ended period rolled at its shop's first charge; the other shop's did not"
    );
    let period: Vec<Option<i64>> = app
        .redis
        .hmget(&account, vec!["used", "period_end"])
        .await
        .unwrap();
    assert_eq!(period, [Some(4), Some(next_end)]);
    assert_eq!(app.hot_balance(running).await, Some((6, 0)));
}

#[tokio::test]
async fn a_call_of_several_shards_that_fails_mid_way_settles_each_charge_on_its_own() {
    let app = crate::helpers::spawn_app().await;
    if app.state.hot.clustered() {
        return;
    }
    let shops = shops_of_different_shards(&app, 3).await;
    let [a, b, c] = [shops[0].id, shops[1].id, shops[2].id];
    // A customer of b's shard whose account the script fails on after a's
    // charge was made; the call's reply is lost.
    let hot = &app.state.hot;
    let broken = broken_account_in(&app, hot.keys().shard_of(b)).await;

    let batch = [
        use_of(&app, a, "rec-001", 2),
        use_of(&app, broken, "rec-001", 2),
        use_of(&app, c, "rec-001", 2),
    ];
    let results = hot.charge_all(&batch).await.unwrap();

    assert_eq!(
        outcomes(results),
        ["charged, 9996 left", "DeadlinePassed", "DeadlinePassed"],
        "the charge made before the failure is found; the others are fenced"
    );
    // The fenced charge never happens, even if its call reaches Redis again.
    assert_eq!(
        hot.charge(&batch[2]).await.unwrap(),
        ChargeOutcome::DeadlinePassed
    );
    assert_eq!(app.hot_balance(a).await, Some((4, 0)));
    assert_eq!(app.hot_balance(c).await, Some((2, 0)));
    app.drain_usage().await;
    assert_eq!(app.usage_rows(a).await, (2, 4));
    assert_eq!(app.usage_rows(c).await, (1, 2));
}

#[tokio::test]
async fn a_call_of_several_shards_sent_twice_charges_each_use_once() {
    // A resend after a broken connection (the client cannot tell whether
    // the first sending ran) must charge nothing again.
    let app = crate::helpers::spawn_app().await;
    if app.state.hot.clustered() {
        return;
    }
    let shops = shops_of_different_shards(&app, 3).await;
    let [a, b, c] = [shops[0].id, shops[1].id, shops[2].id];
    let mut keyed = use_of(&app, b, "rec-001", 2);
    keyed.idempotency = Some(Idempotency {
        key: "order-10",
        fingerprint: "body-a",
        ttl_secs: 600,
    });
    let batch = [
        use_of(&app, a, "rec-001", 2),
        keyed,
        use_of(&app, c, "rec-001", 2),
        use_of(&app, a, "rec-001", 2),
    ];

    let first = app.state.hot.charge_all(&batch).await.unwrap();
    let second = app.state.hot.charge_all(&batch).await.unwrap();

    let charged = [
        "charged, 9996 left",
        "charged, 9996 left",
        "charged, 9996 left",
        "charged, 9994 left",
    ];
    assert_eq!(outcomes(first), charged);
    assert_eq!(outcomes(second), charged, "answered from each own record");
    assert_eq!(app.hot_balance(a).await, Some((6, 0)), "charged once");
    assert_eq!(app.hot_balance(b).await, Some((4, 0)));
    assert_eq!(app.hot_balance(c).await, Some((4, 0)));
    app.drain_usage().await;
    assert_eq!(app.usage_rows(a).await, (3, 6), "one event per use");
    assert_eq!(app.usage_rows(b).await, (2, 4));
    assert_eq!(app.usage_rows(c).await, (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_consumes_of_many_shops_share_calls_and_stay_exact() {
    let app = crate::helpers::spawn_app().await;
    if app.state.hot.clustered() {
        return;
    }
    // Eight starter shops (1,000 tokens a period), whatever their shards,
    // each with a balance for exactly 100 charges of 2 beyond what it used.
    let mut shops = Vec::new();
    for _ in 0..8 {
        let shop = app.customer_with_apps("starter", &["rec-001"]).await;
        let (status, _) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
        assert_eq!(status, 200);
        let _: i64 = app
            .redis
            .hset(app.state.hot.keys().account(shop.id), ("used", "800"))
            .await
            .unwrap();
        shops.push(shop);
    }

    let before = app.metrics_text().await;
    let results =
        join_all((0..960).map(|i| app.consume(&shops[i % 8].token, json!({"app_id": "rec-001"}))))
            .await;
    let after = app.metrics_text().await;

    for (n, shop) in shops.iter().enumerate() {
        let theirs: Vec<_> = results.iter().skip(n).step_by(8).collect();
        let charged = theirs.iter().filter(|(s, _)| *s == 200).count();
        let refused = theirs.iter().filter(|(s, _)| *s == 402).count();
        assert_eq!(
            (charged, refused),
            (100, 20),
            "shop {n}: its balance, exactly"
        );
        assert_eq!(app.hot_balance(shop.id).await, Some((1000, 0)));
    }
    let (calls, charges) = calls_and_charges(&before, &after);
    assert!(charges >= 960.0, "every consume went through a call");
    assert!(calls < charges, "some calls carried more than one charge");
    app.drain_usage().await;
    for shop in &shops {
        assert_eq!(app.usage_rows(shop.id).await, (101, 202));
    }
}

/// The script calls made and the charges they carried between two reads
/// of /metrics. The recorder is the process's: other tests' consumes count
/// too, and they could only hide calls of one charge, not make them.
fn calls_and_charges(before: &str, after: &str) -> (f64, f64) {
    let delta = |name| metric(after, name) - metric(before, name);
    (
        delta("consume_batch_charges_count"),
        delta("consume_batch_charges_sum"),
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}
