//! The hot balances checked against the ledger (domain/usage_drift.rs):
//! silent while consumes and the flusher run, whatever state the events
//! are in, and loud about a balance that differs.

use connected_apps::domain::usage_drift::UsageDrift;
use fred::interfaces::HashesInterface;

use crate::helpers::{spawn_app_with, TestApp};

fn check(app: &TestApp) -> UsageDrift {
    UsageDrift::new(app.db.clone(), app.state.hot.clone())
}

#[tokio::test]
async fn charges_in_every_state_between_redis_and_the_ledger_show_no_drift() {
    let app = spawn_app_with(&[("FLUSH_BATCH_SIZE", "40")]).await;
    let shops = [
        app.customer_with_apps("professional", &["vto-001"]).await,
        app.customer_with_apps("professional", &["vto-001"]).await,
    ];
    for shop in &shops {
        app.consume_many(shop, "vto-001", 60, 8).await;
    }
    // Some events written and acknowledged, some written and not yet
    // acknowledged (in the ledger and still pending in the stream), the
    // rest not read by any flusher.
    let mut flusher = app.flusher().await;
    flusher.step().await.unwrap();
    let mut unacknowledged = app.flusher_named("slow", 60_000).await;
    let batch = unacknowledged.take().await.unwrap();
    unacknowledged.write(&batch).await.unwrap();

    let report = check(&app).check().await.unwrap();
    assert!(report.ran);
    assert_eq!(report.checked, 2);
    assert_eq!(report.drifted, []);

    // And while consumes go on: a customer charged during its shard's read
    // is left for the next pass, never reported.
    let checks = async {
        let mut reports = Vec::new();
        for _ in 0..5 {
            reports.push(check(&app).check().await.unwrap());
        }
        reports
    };
    let (_, reports) = tokio::join!(app.consume_many(&shops[0], "vto-001", 200, 8), checks);
    for report in reports {
        assert_eq!(report.drifted, [], "{report:?}");
    }
}

#[tokio::test]
async fn a_balance_that_differs_from_the_ledger_is_reported_and_left_as_it_is() {
    let app = spawn_app_with(&[]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let other = app.customer_with_apps("professional", &["vto-001"]).await;
    app.consume_many(&shop, "vto-001", 20, 4).await;
    app.consume_many(&other, "vto-001", 20, 4).await;
    app.drain_usage().await;
    let (used, _) = app.hot_balance(shop.id).await.unwrap();

    // Seven tokens charged in Redis that never reached the stream.
    let _: i64 = app
        .redis
        .hincrby(app.state.hot.keys().account(shop.id), "used", 7)
        .await
        .unwrap();
    let report = check(&app).check().await.unwrap();

    assert_eq!(report.checked, 2);
    assert_eq!(report.drifted, [(shop.id, used + 7, used)]);
    assert_eq!(
        app.hot_balance(shop.id).await.unwrap().0,
        used + 7,
        "reported, not repaired"
    );
    assert!(app.metrics_text().await.contains("ledger_drift_customers"));
}
