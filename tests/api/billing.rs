//! Billing periods: the rollover, racing consumes at the boundary, late,
//! repeated and run by two replicas at once.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Months, Utc};
use connected_apps::domain::billing::Periods;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, Customer, TestApp};

/// A plan of 50 tokens a period: ten uses of vto-001 (5 tokens each).
async fn tiny_plan(app: &TestApp) {
    sqlx::query(
        "INSERT INTO billing_plans (id, name, tokens_per_month, price_cents, tier) \
         VALUES ('tiny', 'Tiny', 50, 100, 'professional') ON CONFLICT DO NOTHING",
    )
    .execute(&app.db)
    .await
    .unwrap();
}

/// A customer on the tiny plan whose current period ends at `end`.
async fn customer_with_period_ending(app: &TestApp, end: DateTime<Utc>) -> Customer {
    tiny_plan(app).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let start = end - Months::new(1);
    sqlx::query(
        "UPDATE customer_billing SET plan_id = 'tiny', billing_cycle_start = $2, \
         billing_cycle_end = $3, billing_anchor = $2 WHERE customer_id = $1",
    )
    .bind(shop.id)
    .bind(start)
    .bind(end)
    .execute(&app.db)
    .await
    .unwrap();
    shop
}

/// Consumes once; the event id and its charge time when charged.
async fn consume(app: &TestApp, shop: &Customer) -> Option<Uuid> {
    let (status, body): (u16, Value) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    match status {
        200 => Some(body["event_id"].as_str().unwrap().parse().unwrap()),
        402 => None,
        other => panic!("unexpected {other}: {body}"),
    }
}

async fn allowance_used_per_side(
    app: &TestApp,
    customer: Uuid,
    boundary: DateTime<Utc>,
) -> (i64, i64) {
    sqlx::query_as(
        "SELECT COALESCE(SUM(tokens_consumed) FILTER (WHERE created_at < $2), 0)::int8, \
                COALESCE(SUM(tokens_consumed) FILTER (WHERE created_at >= $2), 0)::int8 \
         FROM token_usage WHERE customer_id = $1",
    )
    .bind(customer)
    .bind(boundary)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rollover_racing_consumes_at_the_boundary_counts_each_in_one_period_and_grants_once() {
    let app = Arc::new(spawn_app().await);
    // Millisecond precision, as the hot state keeps it.
    let boundary = DateTime::from_timestamp_millis(Utc::now().timestamp_millis() + 2_000).unwrap();
    let shop = Arc::new(customer_with_period_ending(&app, boundary).await);

    // The old period's allowance, spent before the boundary.
    let mut charged = HashSet::new();
    for _ in 0..10 {
        charged.insert(consume(&app, &shop).await.expect("within the allowance"));
    }
    assert_eq!(consume(&app, &shop).await, None, "the allowance is spent");

    // Across the boundary: eight callers consuming flat out, and three
    // replicas' rollovers, repeated, racing them.
    let stop_at = Instant::now() + Duration::from_millis(3_500);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (app, shop) = (app.clone(), shop.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < stop_at {
                mine.extend(consume(&app, &shop).await);
            }
            mine
        });
    }
    let mut rollovers = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let (app, customer) = (app.clone(), shop.id);
        rollovers.spawn(async move {
            let periods = Periods::new(app.db.clone(), app.state.hot.clone(), Default::default());
            let mut moved = 0;
            while Instant::now() < stop_at {
                if periods.roll(customer, Utc::now()).await.unwrap() {
                    moved += 1;
                }
                tokio::time::sleep(Duration::from_millis(37)).await;
            }
            moved
        });
    }
    while let Some(done) = tasks.join_next().await {
        charged.extend(done.unwrap());
    }
    let mut moved = 0;
    while let Some(done) = rollovers.join_next().await {
        moved += done.unwrap();
    }

    assert_eq!(moved, 1, "the ledger's period moved once");
    assert_eq!(
        charged.len(),
        20,
        "ten uses in each period, no more, no fewer"
    );
    app.drain_usage().await;
    app.assert_ledger_exact(&charged).await;
    assert_eq!(
        allowance_used_per_side(&app, shop.id, boundary).await,
        (50, 50),
        "each consume counted in exactly one period, by its time"
    );
    let (start, used): (DateTime<Utc>, i64) = sqlx::query_as(
        "SELECT billing_cycle_start, tokens_used FROM customer_billing WHERE customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((start, used), (boundary, 50));
}

#[tokio::test]
async fn a_late_rollover_refuses_nothing_the_new_period_allows_and_never_resets_it_again() {
    let app = spawn_app().await;
    let boundary = DateTime::from_timestamp_millis(Utc::now().timestamp_millis() + 1_000).unwrap();
    let shop = customer_with_period_ending(&app, boundary).await;
    for _ in 0..10 {
        consume(&app, &shop).await.expect("within the allowance");
    }
    tokio::time::sleep_until((Instant::now() + Duration::from_millis(1_100)).into()).await;

    // No rollover has run: the new period's allowance is there all the same.
    for _ in 0..4 {
        consume(&app, &shop)
            .await
            .expect("the new period allows it");
    }
    // The rollover, late and twice, and by two replicas at once: usage in
    // the new period stands.
    let periods = Periods::new(app.db.clone(), app.state.hot.clone(), Default::default());
    let (a, b) = tokio::join!(
        periods.roll_ended(Utc::now()),
        periods.roll_ended(Utc::now())
    );
    assert_eq!(a.unwrap() + b.unwrap(), 1);
    assert_eq!(periods.roll_ended(Utc::now()).await.unwrap(), 0);
    for _ in 0..6 {
        consume(&app, &shop)
            .await
            .expect("the rest of the new allowance");
    }
    assert_eq!(consume(&app, &shop).await, None, "granted once, not twice");
    let (_, body) = app
        .get_json("/api/v1/customer/tokens/usage", &shop.token)
        .await;
    assert_eq!(body["current_period"]["tokens_used"], 50, "{body}");
}
