//! How fast the flusher drains a backlog into the ledger.
//!
//! Fills the usage streams with real consumes (the consume script, on 1,000
//! unlimited customers, three apps each, sessions of about five events),
//! then times the flusher's passes until the streams are empty, rows and
//! daily aggregates committed, and checks that the ledger holds exactly
//! the events charged.
//!
//! Then the physical limit, in the same run: the same rows, sessions,
//! visitors and daily aggregates written again by PostgreSQL alone (the
//! ledger's tables emptied, and each filled by one `INSERT … SELECT` from a
//! copy of what the drain wrote, in one transaction: the same tuples,
//! indexes and WAL, with no client, no decoding and no round trips), and
//! the drain's rate as a share of it.
//!
//! `cargo bench --bench drain` drains 1,000,000 events; `-- --events N`,
//! `-- --customers N` and `-- --flushers K` (K flushers side by side, as K
//! processes would) change the run. Under `cargo test` it drains a small backlog once, as a
//! check that the benchmark still works. Uses `TEST_DATABASE_URL`'s server
//! (a database of its own, dropped after) and `TEST_REDIS_URL` (a key
//! prefix of its own, deleted after). Figures in benches/RESULTS.md.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use connected_apps::{
    config::{Limit, Settings},
    hot::{
        account::{AccountState, SubscriptionStatus},
        charge::{Charge, ChargeOutcome},
        HotStore,
    },
    ledger,
    workers::flusher::Flusher,
};
use fred::prelude::*;
use serde_json::value::RawValue;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

const APPS: [&str; 3] = ["vto-001", "rec-001", "fit-001"];
/// Consumes in flight while the backlog is filled.
const FILLERS: usize = 256;

struct Options {
    events: usize,
    customers: usize,
    flushers: usize,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    Options {
        events: value("--events").unwrap_or(if full { 1_000_000 } else { 5_000 }),
        customers: value("--customers").unwrap_or(if full { 1_000 } else { 50 }),
        flushers: value("--flushers").unwrap_or(1),
    }
}

fn settings(database: &str, prefix: &str) -> Settings {
    let server = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into());
    let base = server.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap();
    let vars: HashMap<String, String> = [
        ("DATABASE_URL", format!("{base}/{database}")),
        (
            "REDIS_URL",
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
        ),
        ("REDIS_KEY_PREFIX", prefix.to_owned()),
        ("REDIS_TIMEOUT_MS", "5000".to_owned()),
        (
            "FLUSH_BATCH_SIZE",
            std::env::var("FLUSH_BATCH_SIZE").unwrap_or_else(|_| "8000".into()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Settings::from_map(&vars).expect("bench settings")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options();
    let tag = &Uuid::new_v4().simple().to_string()[..12];
    let database = format!("bench_drain_{tag}");
    let settings = settings(&database, &format!("bench{tag}"));
    let url = settings.database.url.expose().to_owned();
    ledger::create_database_if_missing(&url).await?;
    let result = run(&options, &settings).await;
    clean_up(&settings, &database).await;
    result
}

async fn run(options: &Options, settings: &Settings) -> anyhow::Result<()> {
    let db = ledger::pool(&settings.database)?;
    ledger::migrate(&db, 1).await?;
    let hot = Arc::new(HotStore::connect(&settings.redis).await?);

    // Customers on the unlimited plan, each with three apps active.
    let apps: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT slug, id FROM apps WHERE slug = ANY($1)")
            .bind(&APPS[..])
            .fetch_all(&db)
            .await?;
    let mut customers = Vec::with_capacity(options.customers);
    for i in 0..options.customers {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO customers (id, name, email) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(format!("Shop {i}"))
            .bind(format!("shop{i}@example.com"))
            .execute(&db)
            .await?;
        sqlx::query(
            "INSERT INTO customer_billing (customer_id, plan_id, billing_cycle_start, billing_cycle_end, status) \
             VALUES ($1, 'enterprise', NOW() - INTERVAL '1 day', NOW() + INTERVAL '30 days', 'active')",
        )
        .bind(id)
        .execute(&db)
        .await?;
        for (_, app) in &apps {
            sqlx::query("INSERT INTO customer_apps (customer_id, app_id) VALUES ($1, $2)")
                .bind(id)
                .bind(app)
                .execute(&db)
                .await?;
        }
        let state = AccountState {
            allowance: -1,
            used: 0,
            purchased: 0,
            status: SubscriptionStatus::Active,
            grace_until_ms: 0,
            active_apps: apps.iter().map(|(slug, _)| slug.clone()).collect(),
            embed_keys: vec![],
            period: None,
            period_start_ms: 0,
            closes_at_ms: 0,
            alert_at: String::new(),
            alerted: String::new(),
        };
        hot.load_account(id, &state).await?;
        customers.push(id);
    }
    let customers = Arc::new(customers);
    let apps = Arc::new(apps);

    // Fill the backlog through the consume script.
    let started = Instant::now();
    let mut fillers = tokio::task::JoinSet::new();
    for filler in 0..FILLERS {
        let (hot, customers, apps) = (hot.clone(), customers.clone(), apps.clone());
        let count = options.events / FILLERS + usize::from(filler < options.events % FILLERS);
        fillers.spawn(async move {
            let mut charged = 0;
            for n in 0..count {
                let i = filler * 7919 + n;
                // A session is one shopper on one shop's app.
                let shop = filler * 7919 + n / 5;
                let session = format!("sess-{}-{}", filler, n / 5);
                let metadata = format!(
                    r#"{{"visitor_id":"visitor-{}-{}","processing_time_ms":{},"ip_address":"10.0.{}.{}","user_agent":"Mozilla/5.0","product_id":"frame-{}"}}"#,
                    filler,
                    n / 5,
                    200 + i % 1500,
                    i % 250,
                    n % 250,
                    i % 97
                );
                let metadata = RawValue::from_string(metadata).unwrap();
                let (slug, app_id) = &apps[shop % apps.len()];
                let charge = Charge {
                    customer: customers[shop % customers.len()],
                    app_slug: slug,
                    app_id: *app_id,
                    tokens: 1 + (i % 5) as i64,
                    event_id: Uuid::now_v7(),
                    embed_key: None,
                    idempotency: None,
                    session_id: Some(&session),
                    metadata: Some(&metadata),
                    customer_limit: Limit::NONE,
                };
                let outcome = hot.charge(&charge).await.expect("charge");
                assert!(matches!(outcome, ChargeOutcome::Charged { .. }), "{outcome:?}");
                charged += charge.tokens;
            }
            charged
        });
    }
    let mut charged = 0;
    while let Some(done) = fillers.join_next().await {
        charged += done?;
    }
    let filled = started.elapsed();
    println!(
        "filled {} events in {:.2?} ({:.0}/s through the consume script)",
        options.events,
        filled,
        options.events as f64 / filled.as_secs_f64()
    );

    // Drain.
    let started = Instant::now();
    let mut flushers = tokio::task::JoinSet::new();
    for k in 0..options.flushers {
        let mut flusher_settings = settings.flusher.clone();
        flusher_settings.consumer_name = format!("bench-flusher-{k}");
        let mut flusher = Flusher::connect(
            &settings.redis,
            ledger::pool(&settings.database)?,
            flusher_settings,
        )
        .await?;
        flushers.spawn(async move {
            let mut drained = 0;
            loop {
                match flusher.step().await {
                    Ok(0) => return drained,
                    Ok(n) => drained += n,
                    Err(e) => {
                        eprintln!("flush failed, retrying: {e:#}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    let mut drained = 0;
    while let Some(done) = flushers.join_next().await {
        drained += done?;
    }
    let took = started.elapsed();
    println!(
        "drained {drained} events with {} flusher(s) in {:.2?}: {:.0} events/s, rows and aggregates committed",
        options.flushers,
        took,
        drained as f64 / took.as_secs_f64()
    );

    // The ledger holds exactly what was charged.
    let (rows, tokens): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(tokens_consumed), 0)::int8 FROM token_usage")
            .fetch_one(&db)
            .await?;
    let (events, daily_tokens): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(events_count), 0)::int8, COALESCE(SUM(tokens_consumed), 0)::int8 FROM usage_analytics_daily",
    )
    .fetch_one(&db)
    .await?;
    assert_eq!(rows as usize, options.events, "one row per event");
    assert_eq!(tokens, charged, "every token charged is in the ledger");
    assert_eq!(
        (events, daily_tokens),
        (rows, tokens),
        "aggregates match the rows"
    );
    let days: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM usage_analytics_daily")
        .fetch_one(&db)
        .await?;
    println!(
        "checked at {}: {rows} rows, {tokens} tokens, aggregates equal ({days} distinct customer, app and day)",
        Utc::now()
    );

    let limit = server_side_insert(&db).await?;
    println!(
        "the same rows, sessions, visitors and aggregates inserted by PostgreSQL alone in {limit:.2?}: {:.0} events/s; the drain reached {:.2} of it",
        rows as f64 / limit.as_secs_f64(),
        limit.as_secs_f64() / took.as_secs_f64()
    );
    db.close().await;
    Ok(())
}

/// How long PostgreSQL alone takes to write what the drain wrote: the rows,
/// the sessions and visitors seen, and the daily aggregates, copied aside,
/// the ledger's tables emptied, then each filled again by one `INSERT …
/// SELECT` in one transaction, after a checkpoint so neither run inherits
/// the other's dirty pages.
async fn server_side_insert(db: &sqlx::PgPool) -> anyhow::Result<Duration> {
    let mut conn = db.acquire().await?;
    for statement in [
        "CREATE TABLE bench_rows AS SELECT * FROM token_usage",
        "CREATE TABLE bench_distinct AS SELECT * FROM usage_daily_distinct",
        "CREATE TABLE bench_daily AS SELECT * FROM usage_analytics_daily",
        "TRUNCATE token_usage, usage_daily_distinct, usage_analytics_daily",
        "VACUUM ANALYZE bench_rows",
        "CHECKPOINT",
    ] {
        sqlx::query(statement).execute(&mut *conn).await?;
    }
    let started = Instant::now();
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    for statement in [
        "INSERT INTO token_usage SELECT * FROM bench_rows ON CONFLICT (id, created_at) DO NOTHING",
        "INSERT INTO usage_daily_distinct SELECT * FROM bench_distinct ON CONFLICT DO NOTHING",
        "INSERT INTO usage_analytics_daily SELECT * FROM bench_daily \
         ON CONFLICT (customer_id, app_id, date) DO UPDATE SET \
         tokens_consumed = usage_analytics_daily.tokens_consumed + EXCLUDED.tokens_consumed",
    ] {
        sqlx::query(statement).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(started.elapsed())
}

async fn clean_up(settings: &Settings, database: &str) {
    if let Ok(redis) =
        Builder::from_config(Config::from_url(settings.redis.url.expose()).expect("redis url"))
            .build()
    {
        if redis.init().await.is_ok() {
            let keys: Vec<String> = redis
                .custom(
                    fred::cmd!("KEYS"),
                    vec![format!("{}:*", settings.redis.key_prefix)],
                )
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis.del(keys).await;
            }
        }
    }
    let url = settings.database.url.expose();
    let admin = url.rsplit_once('/').map(|(b, _)| format!("{b}/postgres"));
    if let Some(admin) = admin {
        if let Ok(mut conn) = PgConnection::connect(&admin).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
            ))
            .execute(&mut conn)
            .await;
        }
    }
}
