//! The flusher's recovery: whatever fails, the ledger ends up holding each
//! charged event once, and aggregates and balances equal the sums over
//! the rows.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::helpers::{postgres_server_url, spawn_app, spawn_app_with, Customer, TestApp};

#[tokio::test]
async fn a_crash_between_commit_and_acknowledge_changes_nothing_when_the_entries_are_claimed() {
    let app = spawn_app().await;
    let shop = app
        .customer_with_apps("professional", &["vto-001", "rec-001"])
        .await;
    let mut charged = app.consume_many(&shop, "vto-001", 60, 8).await;
    charged.extend(app.consume_many(&shop, "rec-001", 40, 8).await);

    // A flusher commits its batch and dies before XACK.
    let mut doomed = app.flusher_named("doomed", 30_000).await;
    let batch = doomed.take().await.unwrap();
    let written = doomed.write(&batch).await.unwrap();
    assert_eq!(written.inserted, 100);
    drop(doomed);
    assert_eq!(
        app.pending_entries().await,
        100,
        "committed but not acknowledged"
    );

    // Another flusher takes the dead one's entries over and writes them again.
    let mut survivor = app.flusher_named("survivor", 0).await;
    assert_eq!(survivor.claim_abandoned().await.unwrap(), 100);
    while survivor.step().await.unwrap() > 0 {}

    assert_eq!(app.pending_entries().await, 0);
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn two_flushers_racing_over_one_backlog_persist_each_event_once() {
    let app = spawn_app_with(&[("FLUSH_BATCH_SIZE", "50")]).await;
    let shops = [
        app.customer_with_apps("professional", &["vto-001"]).await,
        app.customer_with_apps("professional", &["vto-001"]).await,
    ];
    let mut charged = HashSet::new();
    for shop in &shops {
        charged.extend(app.consume_many(shop, "vto-001", 300, 16).await);
    }

    // Both claim whatever the other holds (idle 0), so they keep writing
    // the same entries at the same time.
    let race = |name: &'static str| {
        let app = &app;
        async move {
            let mut flusher = app.flusher_named(name, 0).await;
            let mut idle_passes = 0;
            while idle_passes < 3 {
                flusher.claim_abandoned().await.unwrap();
                match flusher.step().await {
                    Ok(0) => idle_passes += 1,
                    Ok(_) => idle_passes = 0,
                    // A deadlock between the two aborts one transaction;
                    // its entries stay pending and are retried.
                    Err(_) => idle_passes = 0,
                }
            }
        }
    };
    tokio::join!(race("left"), race("right"));

    assert_eq!(app.pending_entries().await, 0);
    app.assert_ledger_exact(&charged).await;
}

/// Appends an event to the customer's shard stream as the consume script
/// writes one; returns its event id.
async fn append_event(app: &TestApp, shop: &Customer, details: serde_json::Value) -> uuid::Uuid {
    append_raw_event(app, shop, &details.to_string()).await;
    details["e"].as_str().unwrap().parse().unwrap()
}

/// Appends an event whose details are `details`, as written.
async fn append_raw_event(app: &TestApp, shop: &Customer, details: &str) {
    let keys = app.state.hot.keys();
    let _: String = app
        .redis
        .xadd(
            keys.usage_stream(keys.shard_of(shop.id)),
            false,
            None,
            "*",
            vec![
                ("d", details.to_owned()),
                ("t", "5".into()),
                ("p", "0".into()),
                ("ts", chrono::Utc::now().timestamp_millis().to_string()),
            ],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn only_an_entry_that_cannot_be_decoded_is_dead_lettered_after_k_deliveries() {
    let app = spawn_app_with(&[("FLUSH_MAX_DELIVERIES", "3")]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let vto = app.state.catalog.get("vto-001").unwrap().row.id;
    let mut charged = app.consume_many(&shop, "vto-001", 20, 4).await;
    let keys = app.state.hot.keys();
    let stream = keys.usage_stream(keys.shard_of(shop.id));
    // One entry that does not decode, and one that decodes but that
    // Postgres refuses as sent (a session id longer than the column).
    let _: String = app
        .redis
        .xadd(stream, false, None, "*", vec![("d", "not json")])
        .await
        .unwrap();
    let too_long = append_event(
        &app,
        &shop,
        json!({"e": uuid::Uuid::now_v7(), "c": shop.id, "a": vto,
               "s": "s".repeat(101), "k": null, "m": null}),
    )
    .await;
    charged.insert(too_long);
    charged.extend(app.consume_many(&shop, "vto-001", 20, 4).await);

    let mut flusher = app.flusher().await;
    flusher.step().await.unwrap();
    app.assert_ledger_exact(&charged).await;
    assert_eq!(
        app.pending_entries().await,
        1,
        "the undecodable entry waits for a retry"
    );
    while flusher.step().await.unwrap() > 0 {}

    assert_eq!(app.pending_entries().await, 0);
    let dead: Vec<(String, Vec<(String, String)>)> = app
        .redis
        .xrange(
            keys.dead_letter_stream(keys.shard_of(shop.id)),
            "-",
            "+",
            None,
        )
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let field = |name: &str| {
        dead[0]
            .1
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(field("deliveries").as_deref(), Some("3"));
    assert_eq!(field("d").as_deref(), Some("not json"));
    assert!(field("reason").is_some_and(|r| !r.is_empty()));
    assert!(field("source_id").is_some());
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("flusher_dead_letters_total"));
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn an_event_postgres_refuses_as_sent_is_stored_at_once_with_its_details_set_aside() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let vto = app.state.catalog.get("vto-001").unwrap().row.id;
    let mut charged = app.consume_many(&shop, "vto-001", 10, 4).await;
    // Written as the consume script wrote them before it checked metadata:
    // a number jsonb cannot hold, and a known field of the wrong type.
    let overflowing = uuid::Uuid::now_v7();
    append_raw_event(
        &app,
        &shop,
        &format!(
            r#"{{"e":"{overflowing}","c":"{}","a":"{vto}","s":"sess-1","k":null,"m":{{"x":1e200000}}}}"#,
            shop.id
        ),
    )
    .await;
    let mistyped = append_event(
        &app,
        &shop,
        json!({"e": uuid::Uuid::now_v7(), "c": shop.id, "a": vto, "s": null, "k": null,
               "m": {"ip_address": 5}}),
    )
    .await;
    charged.extend([overflowing, mistyped]);
    charged.extend(app.consume_many(&shop, "vto-001", 10, 4).await);

    let mut flusher = app.flusher().await;
    flusher.step().await.unwrap();

    assert_eq!(
        app.pending_entries().await,
        0,
        "stored on their first delivery"
    );
    app.assert_ledger_exact(&charged).await;
    let aside: Vec<(uuid::Uuid, Vec<u8>, String)> =
        sqlx::query_as("SELECT event_id, details, reason FROM usage_set_aside ORDER BY event_id")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(aside.len(), 2);
    let overflow = aside.iter().find(|(id, _, _)| *id == overflowing).unwrap();
    assert!(String::from_utf8_lossy(&overflow.1).contains("1e200000"));
    assert!(overflow.2.contains("numeric"), "{}", overflow.2);
    let stored: (serde_json::Value, Option<String>) =
        sqlx::query_as("SELECT metadata, session_id FROM token_usage WHERE id = $1")
            .bind(overflowing)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, (json!({}), None));
    let dead: Vec<(String, Vec<(String, String)>)> = app
        .redis
        .xrange(
            app.state
                .hot
                .keys()
                .dead_letter_stream(app.state.hot.keys().shard_of(shop.id)),
            "-",
            "+",
            None,
        )
        .await
        .unwrap();
    assert!(dead.is_empty());
}

#[tokio::test]
async fn postgres_killed_mid_batch_then_down_then_back_loses_and_doubles_nothing() {
    let app = spawn_app_with(&[("FLUSH_BATCH_SIZE", "40")]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let mut charged = app.consume_many(&shop, "vto-001", 800, 16).await;
    let database = app
        .settings
        .database
        .url
        .expose()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let mut admin = PgConnection::connect(&postgres_server_url()).await.unwrap();

    // The flusher's connections are killed again and again while it works.
    let mut flusher = app.flusher().await;
    let mut failures = 0;
    let mut admin_for_killer = PgConnection::connect(&postgres_server_url()).await.unwrap();
    let killer_database = database.clone();
    let killer = tokio::spawn(async move {
        for _ in 0..40 {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'connected-apps'",
            )
            .bind(&killer_database)
            .execute(&mut admin_for_killer)
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(7)).await;
        }
    });
    while !killer.is_finished() {
        if flusher.step().await.is_err() {
            failures += 1;
        }
    }
    assert!(failures > 0, "some batches were cut off mid-way");

    // Postgres refuses every connection: consumes go on, Redis holds them.
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut admin)
        .await
        .unwrap();
    let during_outage = app.consume_many(&shop, "vto-001", 50, 8).await;
    assert_eq!(during_outage.len(), 50, "consumes need no Postgres");
    charged.extend(during_outage);
    assert!(flusher.step().await.is_err(), "the flusher cannot write");

    // Postgres is back: the flusher drains everything.
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let mut idle = 0;
    while idle < 2 {
        match flusher.step().await {
            Ok(0) => idle += 1,
            Ok(_) => idle = 0,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    assert_eq!(app.pending_entries().await, 0);
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn sigterm_with_a_batch_in_flight_commits_and_acknowledges_it_before_exit() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("enterprise", &["vto-001"]).await;
    let charged = app.consume_many(&shop, "vto-001", 3000, 32).await;

    // A flusher process of its own, with small batches so one is in flight
    // when the signal comes.
    let settings = &app.settings;
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_connected-apps"))
        .args(["serve", "--roles", "flusher"])
        .env_clear()
        .env("DATABASE_URL", settings.database.url.expose())
        .env("REDIS_URL", settings.redis.url.expose())
        .env("REDIS_KEY_PREFIX", &app.prefix)
        .env(
            "USAGE_STREAM_SHARDS",
            settings.redis.stream_shards.to_string(),
        )
        .env("JWT_SECRET", crate::helpers::JWT_SECRET)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("MIGRATE_ON_START", "false")
        .env("FLUSH_BATCH_SIZE", "100")
        .env("FLUSHER_WORKERS", "1")
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_usage")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if rows > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Signalled from here, not by the `kill` program, which a minimal
    // system lacks.
    let pid = process.id().unwrap() as libc::pid_t;
    // SAFETY: kill(2) with a pid of a child this test spawned and waits on.
    let signalled = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(signalled, 0, "{}", std::io::Error::last_os_error());
    let exit = tokio::time::timeout(Duration::from_secs(30), process.wait())
        .await
        .expect("the flusher exits after SIGTERM")
        .unwrap();

    assert!(exit.success(), "{exit:?}");
    assert_eq!(
        app.pending_entries().await,
        0,
        "the batch in flight was committed and acknowledged"
    );
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM token_usage")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(
        (rows as usize) < charged.len(),
        "stopped before the end of the backlog"
    );

    app.drain_usage().await;
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn the_backlog_is_measured_per_shard_and_trimming_keeps_what_is_not_flushed() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let first = app.consume_many(&shop, "vto-001", 30, 4).await;
    let mut flusher = app.flusher().await;
    let shard = usize::from(app.state.hot.keys().shard_of(shop.id));

    let backlog = flusher.observe().await.unwrap();
    assert_eq!(backlog[shard].undelivered, 30);
    assert_eq!(backlog[shard].pending, 0);
    assert!(backlog[shard].oldest_unflushed_ms < 60_000);

    // Half delivered and not acknowledged, then trimmed: nothing unflushed goes.
    let mut half = app.flusher_named("half", 30_000).await;
    let batch = half.take().await.unwrap();
    assert_eq!(batch.len(), 30);
    let second = app.consume_many(&shop, "vto-001", 10, 4).await;
    flusher.trim().await.unwrap();
    let backlog = flusher.observe().await.unwrap();
    assert_eq!(
        (
            backlog[shard].entries,
            backlog[shard].pending,
            backlog[shard].undelivered
        ),
        (40, 30, 10)
    );

    // Flushed and acknowledged, then trimmed: the stream keeps at most the
    // last delivered entry.
    let written = half.write(&batch).await.unwrap();
    half.acknowledge(&batch, &written).await.unwrap();
    while flusher.step().await.unwrap() > 0 {}
    flusher.trim().await.unwrap();
    let backlog = flusher.observe().await.unwrap();
    assert!(backlog[shard].entries <= 1, "{backlog:?}");
    assert_eq!((backlog[shard].pending, backlog[shard].undelivered), (0, 0));
    assert_eq!(backlog[shard].oldest_unflushed_ms, 0);

    let charged: HashSet<_> = first.union(&second).copied().collect();
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn an_unlimited_plan_persists_usage_past_two_to_the_thirty_one_tokens_in_a_period() {
    let app = spawn_app_with(&[("FLUSH_MAX_DELIVERIES", "1")]).await;
    let shop = app.customer_with_apps("enterprise", &["vto-001"]).await;
    let mut charged = HashSet::new();
    for _ in 0..3 {
        let (status, body) = app
            .consume(
                &shop.token,
                json!({"app_id": "vto-001", "tokens_consumed": i32::MAX}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        charged.insert(body["event_id"].as_str().unwrap().parse().unwrap());
    }

    app.drain_usage().await;

    assert_eq!(app.pending_entries().await, 0);
    assert_eq!(
        app.usage_rows(shop.id).await,
        (3, 3 * i64::from(i32::MAX)),
        "every row persisted, none dead-lettered"
    );
    let (period, day): (i64, i64) = sqlx::query_as(
        "SELECT b.tokens_used, d.tokens_consumed FROM customer_billing b \
         JOIN usage_analytics_daily d ON d.customer_id = b.customer_id WHERE b.customer_id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (period, day),
        (3 * i64::from(i32::MAX), 3 * i64::from(i32::MAX))
    );
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn after_redis_lost_its_data_the_running_flusher_makes_its_group_again_counts_what_was_lost_and_flushes_on(
) {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let mut charged = app.consume_many(&shop, "vto-001", 10, 4).await;
    let mut flusher = app.flusher().await;
    while flusher.step().await.unwrap() > 0 {}

    // Three charges the flusher measures as waiting, then Redis restarts
    // empty before they are flushed: they are gone with the stream.
    app.consume_many(&shop, "vto-001", 3, 3).await;
    flusher.observe().await.unwrap();
    let lost_before = counter(
        &app.metrics_text().await,
        "usage_events_possibly_lost_total",
    );
    app.wipe_redis().await;

    // The next consumes rebuild the balance from the ledger and write a
    // new stream, which has no consumer group.
    charged.extend(app.consume_many(&shop, "vto-001", 5, 4).await);
    assert_eq!(charged.len(), 15);

    // The same flusher, running all along, reads them, and says how many
    // charges the loss took (other tests may add to the same counter).
    assert_eq!(flusher.step().await.unwrap(), 5);
    app.assert_ledger_exact(&charged).await;
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("usage_stream_groups_lost_total"));
    assert!(counter(&metrics, "usage_events_possibly_lost_total") >= lost_before + 3.0);
}

/// A counter's value in Prometheus's text format; 0 when absent.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}
