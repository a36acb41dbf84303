//! The hot state is rebuilt from the ledger when Redis has lost it.

use futures::future::join_all;
use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with, Customer, TestApp};

async fn consume_times(app: &TestApp, shop: &Customer, app_id: &str, times: usize) {
    for _ in 0..times {
        let (status, body) = app.consume(&shop.token, json!({"app_id": app_id})).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_redis_is_flushed_the_balance_is_rebuilt_exactly_from_the_ledger() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 10).await;
    // 1000 allowance + 10 purchased; spend into the purchased tokens.
    let (status, _) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 1004}),
        )
        .await;
    assert_eq!(status, 200);
    app.drain_usage().await;

    app.wipe_redis().await;
    // Many requests race to find the state missing: it is loaded once, and
    // every one of them is charged against the same rebuilt balance.
    let results =
        join_all((0..10).map(|_| app.consume(&shop.token, json!({"app_id": "rec-001"})))).await;

    let charged = results.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(charged, 3, "6 tokens left, 2 each");
    assert_eq!(app.hot_balance(shop.id).await, Some((1000, 0)));
}

#[tokio::test]
async fn a_rebuild_never_overwrites_a_loaded_account() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    assert_eq!(
        app.consume(&shop.token, json!({"app_id": "rec-001"}))
            .await
            .0,
        200
    );

    // Not yet flushed: the ledger knows of no usage. A rebuild now must not
    // replace the live balance with the ledger's stale one.
    app.state.accounts.rebuild(shop.id).await.unwrap();

    assert_eq!(app.hot_balance(shop.id).await, Some((2, 0)));
}

#[tokio::test]
async fn activations_keys_and_grants_survive_a_rebuild() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    app.grant(shop.id, 7).await;
    let (_, key) = app
        .create_embed_key(&shop, json!({"app_permissions": ["vto-001"]}))
        .await;

    app.wipe_redis().await;

    let (status, body) = app.consume(&key, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 200);
    assert_eq!(body["tokens_remaining"], 10000 - 5 + 7);
}

#[tokio::test]
async fn an_account_change_whose_request_is_dropped_midway_still_reaches_both_stores() {
    use connected_apps::{
        hot::account::{AccountChange, Once},
        ledger::customers,
    };
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.state.accounts.rebuild(shop.id).await.unwrap();
    let (reached, reached_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_on, go_on_rx) = tokio::sync::oneshot::channel::<()>();
    let grant = uuid::Uuid::now_v7();

    // The request's future is dropped (its client went away) after the
    // ledger part of the change ran and before Redis and the commit.
    let accounts = app.state.accounts.clone();
    let customer = shop.id;
    let request = tokio::spawn(async move {
        accounts
            .change(customer, move |tx| {
                Box::pin(async move {
                    customers::grant(tx, grant, customer, 7, "dropped request", "operator").await?;
                    let _ = reached.send(());
                    let _ = go_on_rx.await;
                    Ok((
                        (),
                        vec![AccountChange::CreditPurchased {
                            tokens: 7,
                            once: Once::grant(grant),
                        }],
                    ))
                })
            })
            .await
    });
    reached_rx.await.unwrap();
    request.abort();
    let _ = request.await;
    let _ = go_on.send(());

    let mut credited = 0;
    for _ in 0..50 {
        credited = sqlx::query_scalar::<_, i64>(
            "SELECT purchased_tokens_credited FROM customers WHERE id = $1",
        )
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
        if credited == 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(credited, 7, "the ledger committed the grant");
    assert_eq!(
        app.hot_balance(shop.id).await.map(|b| b.1),
        Some(7),
        "and Redis has it"
    );
}

#[tokio::test]
async fn a_lost_account_hash_is_rebuilt_counting_the_charges_still_in_the_stream() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    consume_times(&app, &shop, "vto-001", 4).await;
    app.drain_usage().await;
    // Three more charges wait in the stream, one written but not yet
    // acknowledged (a flusher that died between commit and XACK).
    consume_times(&app, &shop, "vto-001", 1).await;
    let mut flusher = app.flusher().await;
    let batch = flusher.take().await.unwrap();
    flusher.write(&batch).await.unwrap();
    consume_times(&app, &shop, "vto-001", 2).await;

    app.lose_account_hash(shop.id).await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["tokens_remaining"],
        10000 - 8 * 5,
        "every earlier charge counted once"
    );
    assert_eq!(app.hot_balance(shop.id).await, Some((40, 0)));
}

#[tokio::test]
async fn purchased_tokens_spent_by_unflushed_charges_cannot_be_spent_again_after_a_rebuild() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    app.grant(shop.id, 5).await;
    consume_times(&app, &shop, "rec-001", 2).await;

    app.lose_account_hash(shop.id).await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;

    assert_eq!(status, 402, "{body}");
    assert_eq!(body["tokens_remaining"], 1);
}

#[tokio::test]
async fn a_rebuild_waits_with_a_503_while_the_backlog_is_longer_than_it_reads() {
    let app = spawn_app_with(&[("REBUILD_MAX_BACKLOG", "5")]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    consume_times(&app, &shop, "vto-001", 8).await;
    app.lose_account_hash(shop.id).await;

    let (status, body) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(app.hot_balance(shop.id).await, None, "nothing loaded");

    app.drain_usage().await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens_remaining"], 10000 - 9 * 5);
}
