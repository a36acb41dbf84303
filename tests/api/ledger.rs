//! The ledger: migrations, the seeded catalog, partitions, and the first flusher.

use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn migrations_seed_ten_apps_three_plans_and_the_coming_partitions() {
    let app = spawn_app().await;

    let apps: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apps")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let plans: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT id, tokens_per_month, price_cents FROM billing_plans ORDER BY price_cents",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let partitions: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'token_usage'::regclass",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();

    assert_eq!(apps, 10);
    assert_eq!(
        plans,
        [
            ("starter".into(), 1000, 2900),
            ("professional".into(), 10000, 19900),
            ("enterprise".into(), -1, 99900)
        ]
    );
    assert_eq!(partitions, 4, "this month and three ahead");
}

#[tokio::test]
async fn the_flusher_writes_each_event_once_with_its_details() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 5).await;
    let (_, first) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 999, "session_id": "sess-1",
                   "metadata": {"ip_address": "2001:db8::1", "user_agent": "Mozilla/5.0", "visitor_id": "v-1"}}),
        )
        .await;
    assert_eq!(
        app.consume(&shop.token, json!({"app_id": "rec-001"}))
            .await
            .0,
        200
    );

    assert_eq!(app.drain_usage().await, 2);
    assert_eq!(app.drain_usage().await, 0, "nothing is delivered twice");

    let (session, ip, agent, purchased): (Option<String>, Option<String>, Option<String>, i32) = sqlx::query_as(
        "SELECT session_id, host(ip_address), user_agent, purchased_tokens_consumed FROM token_usage WHERE id = $1",
    )
    .bind(first["event_id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(session.as_deref(), Some("sess-1"));
    assert_eq!(ip.as_deref(), Some("2001:db8::1"));
    assert_eq!(agent.as_deref(), Some("Mozilla/5.0"));
    assert_eq!(purchased, 0);

    let (used, billing_used): (i64, i64) = sqlx::query_as(
        "SELECT c.purchased_tokens_used, b.tokens_used FROM customers c JOIN customer_billing b ON b.customer_id = c.id WHERE c.id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (used, billing_used),
        (1, 1000),
        "999 + 2 = the 1000 allowance and 1 purchased token"
    );
    assert_eq!(app.usage_rows(shop.id).await, (2, 1001));
}

#[tokio::test]
async fn a_redelivered_batch_changes_nothing() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    for _ in 0..3 {
        assert_eq!(
            app.consume(&shop.token, json!({"app_id": "rec-001"}))
                .await
                .0,
            200
        );
    }
    app.drain_usage().await;
    let before: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM token_usage), (SELECT tokens_used FROM customer_billing WHERE customer_id = $1)",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();

    // Replay the persisted events as if XACK had been lost after the commit.
    let streams = app.state.hot.keys().usage_streams();
    for stream in streams {
        let _: fred::types::Value = fred::interfaces::KeysInterface::del(&app.redis, stream)
            .await
            .unwrap();
    }
    let rows: Vec<(
        uuid::Uuid,
        uuid::Uuid,
        uuid::Uuid,
        i32,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT id, customer_id, app_id, tokens_consumed, created_at FROM token_usage",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    let stream = app
        .state
        .hot
        .keys()
        .usage_stream(app.state.hot.keys().shard_of(shop.id));
    for (id, customer, app_id, tokens, at) in rows {
        let details = serde_json::json!({"e": id, "c": customer, "a": app_id, "s": null, "k": null, "m": null});
        let fields = vec![
            ("d", details.to_string()),
            ("t", tokens.to_string()),
            ("p", "0".into()),
            ("ts", at.timestamp_millis().to_string()),
        ];
        let _: String =
            fred::interfaces::StreamsInterface::xadd(&app.redis, stream, false, None, "*", fields)
                .await
                .unwrap();
    }
    let mut flusher = app.flusher().await;
    flusher.ensure_groups().await.unwrap();
    while flusher.step().await.unwrap() > 0 {}

    let after: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM token_usage), (SELECT tokens_used FROM customer_billing WHERE customer_id = $1)",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(before, after);
    assert_eq!(after, (3, 6));
}

#[tokio::test]
async fn retention_drops_raw_usage_months_past_the_period_and_keeps_the_aggregates() {
    use chrono::{NaiveDate, TimeZone, Utc};
    use connected_apps::{ledger::partitions, workers::scheduler::Scheduler};

    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let old_month = NaiveDate::from_ymd_opt(2024, 1, 1).unwrap();
    partitions::ensure_month(&app.db, old_month).await.unwrap();
    sqlx::query(
        "INSERT INTO token_usage (id, customer_id, app_id, tokens_consumed, created_at) \
         SELECT $1, $2, id, 2, '2024-01-15T12:00:00Z' FROM apps WHERE slug = 'rec-001'",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_analytics_daily (customer_id, app_id, date, tokens_consumed, events_count) \
         SELECT $1, id, '2024-01-15', 2, 1 FROM apps WHERE slug = 'rec-001'",
    )
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();
    let partitions_now = || async {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent IN ('token_usage'::regclass, 'usage_daily_distinct'::regclass) ORDER BY 1",
        )
        .fetch_all(&app.db)
        .await
        .unwrap();
        names
    };
    let before = partitions_now().await;

    // A month goes once its last day is more than 400 days old: on
    // 2025-03-06 the cut-off is 2024-01-31, still inside January; on
    // 2025-03-07 it is 2024-02-01.
    let scheduler = Scheduler::new(
        app.db.clone(),
        app.state.hot.clone(),
        app.state.subscriptions.clone(),
        3,
        400,
        Default::default(),
    );
    let kept = scheduler
        .apply_retention(Utc.with_ymd_and_hms(2025, 3, 6, 3, 0, 0).unwrap())
        .await
        .unwrap();
    let dropped = scheduler
        .apply_retention(Utc.with_ymd_and_hms(2025, 3, 7, 3, 0, 0).unwrap())
        .await
        .unwrap();

    assert_eq!(
        kept,
        Vec::<String>::new(),
        "January 2024 is not yet wholly past retention"
    );
    assert_eq!(
        dropped,
        ["token_usage_y2024m01", "usage_daily_distinct_y2024m01"]
    );
    let after = partitions_now().await;
    assert_eq!(
        after.len(),
        before.len() - 2,
        "only the old month went: {after:?}"
    );
    let aggregates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_analytics_daily")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(aggregates, 1, "aggregates are kept");
}

#[tokio::test]
async fn migrations_refuse_a_database_that_is_not_utf8() {
    use sqlx::Connection;
    let name = format!("test_ascii_{}", uuid::Uuid::new_v4().simple());
    let server = crate::helpers::postgres_server_url();
    let mut admin = sqlx::PgConnection::connect(&server).await.unwrap();
    sqlx::query(&format!(
        "CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();

    let refused = connected_apps::ledger::migrate(&pool, 1).await;

    pool.close().await;
    sqlx::query(&format!("DROP DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .unwrap();
    let message = refused
        .expect_err("a SQL_ASCII ledger is refused")
        .to_string();
    assert!(message.contains("UTF8"), "{message}");
}
