//! Criterion benchmarks of the consume hot path's parts:
//!
//! - `script/consume_round_trip`: one EVALSHA of `lua/consume.lua` against
//!   the real Redis at `TEST_REDIS_URL` (default 127.0.0.1:6379/0), on an
//!   unlimited account, so every call charges and appends an event;
//! - `script/consume_batch/64`: one call charging 64 consumes, as the
//!   coalescer sends them under load; its throughput is charges per second,
//!   so the script's own cost per charge shows without the call's;
//! - `auth/*`: authenticating a request: a JWT seen before (cached verdict),
//!   a JWT seen for the first time (HMAC and claims), and an embed key's
//!   SHA-256;
//! - `request/parse_consume_body`: validating the body of API.md's example.
//!
//! `cargo bench --bench hot_path`; figures in benches/RESULTS.md.

use std::{collections::HashMap, time::Duration};

use connected_apps::{
    auth::{embed_key, JwtKeys},
    config::{Limit, Settings},
    domain::consume::ConsumeRequest,
    hot::{
        account::{AccountState, SubscriptionStatus},
        charge::Charge,
        HotStore,
    },
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fred::prelude::*;
use uuid::Uuid;

const UNREACHED: Limit = Limit {
    per_hour: u32::MAX,
    burst: u32::MAX,
};

const BODY: &str = r#"{"app_id":"vto-001","tokens_consumed":5,"session_id":"sess-abc123","metadata":{"user_agent":"Mozilla/5.0","ip_address":"192.168.1.1","product_id":"frame-001","processing_time_ms":1250}}"#;

fn settings(prefix: &str) -> Settings {
    let vars: HashMap<String, String> = [
        (
            "REDIS_URL",
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
        ),
        ("REDIS_KEY_PREFIX", prefix.to_owned()),
        ("REDIS_TIMEOUT_MS", "1000".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Settings::from_map(&vars).expect("bench settings")
}

fn script_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
    let settings = settings(&prefix);
    let hot = rt.block_on(HotStore::connect(&settings.redis)).unwrap();
    let customer = Uuid::new_v4();
    let state = AccountState {
        allowance: -1,
        used: 0,
        purchased: 0,
        status: SubscriptionStatus::Active,
        grace_until_ms: 0,
        active_apps: vec!["vto-001".into()],
        embed_keys: vec![],
        period: None,
        period_start_ms: 0,
        closes_at_ms: 0,
        alert_at: String::new(),
        alerted: String::new(),
    };
    rt.block_on(hot.load_account(customer, &state)).unwrap();
    let request = ConsumeRequest::parse(BODY.as_bytes()).unwrap();
    let app_id = Uuid::new_v4();

    let charge = || Charge {
        customer,
        app_slug: "vto-001",
        app_id,
        tokens: 5,
        event_id: Uuid::now_v7(),
        embed_key: None,
        idempotency: None,
        session_id: request.session_id.as_deref(),
        metadata: request.metadata.as_deref(),
        // A limit the benchmark never reaches: the limiter's arithmetic
        // and its write run on every charge.
        customer_limit: UNREACHED,
    };

    c.bench_function("script/consume_round_trip", |b| {
        b.to_async(&rt)
            .iter(|| async { hot.charge(&charge()).await.unwrap() })
    });

    let mut batch = c.benchmark_group("script/consume_batch");
    batch.throughput(Throughput::Elements(64));
    batch.bench_function("64", |b| {
        b.to_async(&rt).iter(|| async {
            let charges: Vec<_> = (0..64).map(|_| charge()).collect();
            for outcome in hot.charge_all(&charges).await.unwrap() {
                outcome.unwrap();
            }
        })
    });
    batch.finish();

    rt.block_on(async {
        let redis = Builder::from_config(Config::from_url(settings.redis.url.expose()).unwrap())
            .build()
            .unwrap();
        redis.init().await.unwrap();
        let keys: Vec<String> = redis
            .custom(fred::cmd!("KEYS"), vec![format!("{prefix}:*")])
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis.del(keys).await.unwrap();
        }
    });
}

fn authentication(c: &mut Criterion) {
    let keys = JwtKeys::new(&settings("bench").auth);
    let token = keys.mint(
        Uuid::new_v4(),
        &["tokens:consume"],
        Duration::from_secs(3600),
    );
    keys.verify(&token).unwrap();
    c.bench_function("auth/jwt_seen_before", |b| {
        b.iter(|| keys.verify(&token).unwrap())
    });
    c.bench_function("auth/jwt_first_sight", |b| {
        b.iter_batched(
            || {
                keys.mint(
                    Uuid::new_v4(),
                    &["tokens:consume"],
                    Duration::from_secs(3600),
                )
            },
            |t| keys.verify(&t).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let key = embed_key::generate(true).plaintext;
    c.bench_function("auth/embed_key_sha256", |b| {
        b.iter(|| embed_key::hash(&key))
    });
}

fn parsing(c: &mut Criterion) {
    c.bench_function("request/parse_consume_body", |b| {
        b.iter(|| {
            ConsumeRequest::parse(BODY.as_bytes())
                .unwrap()
                .tokens_consumed
        })
    });
}

criterion_group!(benches, script_round_trip, authentication, parsing);
criterion_main!(benches);
