//! Rate limits: per customer and route group, per embed key, and inside
//! the consume script, on Redis's clock. A limited request is never
//! charged and never moves a limiter.

use std::{collections::HashSet, time::Duration};

use fred::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{redis_url, spawn_app_with, TestApp};

fn header(response: &reqwest::Response, name: &str) -> Option<u64> {
    response.headers().get(name)?.to_str().ok()?.parse().ok()
}

/// Consumes with `credential` (a JWT or an embed key); returns the
/// response, its body unread.
async fn consume(app: &TestApp, credential: &str, body: Value) -> reqwest::Response {
    app.post_consume(credential, body).await
}

/// Consumes vto-001 with an `Idempotency-Key`.
async fn consume_once(app: &TestApp, credential: &str, key: &str) -> reqwest::Response {
    app.http
        .post(app.url("/api/v1/customer/tokens/consume"))
        .bearer_auth(credential)
        .header("Idempotency-Key", key)
        .json(&json!({"app_id": "vto-001"}))
        .send()
        .await
        .unwrap()
}

async fn event_id(response: reqwest::Response) -> Uuid {
    let body: Value = response.json().await.unwrap();
    body["event_id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_embed_key_at_ten_times_its_rate_for_ten_seconds_gets_its_burst_and_ten_seconds_of_rate_and_a_neighbour_is_not_limited(
) {
    let app = spawn_app_with(&[]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let neighbour = app.customer_with_apps("professional", &["vto-001"]).await;
    // 1800 an hour is one every 2 s, and a burst of 18 (36 s of rate).
    let (_, leaked) = app
        .create_embed_key(
            &shop,
            json!({"app_permissions": ["vto-001"], "rate_limit": 1800}),
        )
        .await;
    let (_, theirs) = app
        .create_embed_key(
            &neighbour,
            json!({"app_permissions": ["vto-001"], "rate_limit": 1800}),
        )
        .await;
    let (burst, per_second, seconds) = (18, 0.5, 10.0);

    // Ten times the rate: five a second for ten seconds, while the
    // neighbour uses its own key at a tenth of its rate.
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    let (mut charged, mut neighbour_charged) = (HashSet::new(), HashSet::new());
    let mut limited = 0;
    for tick in 0..50 {
        ticks.tick().await;
        let response = consume(&app, &leaked, json!({"app_id": "vto-001"})).await;
        match response.status().as_u16() {
            200 => {
                charged.insert(event_id(response).await);
            }
            429 => {
                limited += 1;
                assert_eq!(header(&response, "ratelimit-limit"), Some(burst));
                assert_eq!(header(&response, "ratelimit-remaining"), Some(0));
                assert!(header(&response, "retry-after").is_some_and(|s| (1..=2).contains(&s)));
                assert!(header(&response, "ratelimit-reset").is_some_and(|s| s <= 36));
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited");
                assert!(body["error"]["retry_after"].as_u64().is_some());
            }
            other => panic!("unexpected {other}: {}", response.text().await.unwrap()),
        }
        if tick % 20 == 0 {
            let response = consume(&app, &theirs, json!({"app_id": "vto-001"})).await;
            assert_eq!(response.status(), 200, "the neighbour is never limited");
            neighbour_charged.insert(event_id(response).await);
        }
    }

    let most = burst as usize + (per_second * seconds) as usize + 1;
    assert!(
        charged.len() <= most,
        "{} allowed, at most {most}",
        charged.len()
    );
    assert!(charged.len() >= burst as usize, "{} allowed", charged.len());
    assert_eq!(charged.len() + limited, 50);
    // Only the allowed requests were charged, exactly once each.
    app.drain_usage().await;
    charged.extend(neighbour_charged);
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn the_customer_consume_limit_counts_every_caller_refuses_past_the_burst_and_charges_nothing()
{
    let app = spawn_app_with(&[
        ("RATE_LIMIT_CONSUME_PER_HOUR", "3600"),
        ("RATE_LIMIT_CONSUME_BURST", "5"),
    ])
    .await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (_, key) = app
        .create_embed_key(
            &shop,
            json!({"app_permissions": ["vto-001"], "rate_limit": 100000}),
        )
        .await;

    // The backend and the widget share the customer's burst of five.
    let first = consume_once(&app, &shop.token, "order-1").await;
    assert_eq!(first.status(), 200);
    let mut charged = HashSet::from([event_id(first).await]);
    for credential in [&shop.token, &shop.token, &key, &key] {
        let response = consume(&app, credential, json!({"app_id": "vto-001"})).await;
        assert_eq!(response.status(), 200);
        charged.insert(event_id(response).await);
    }
    let before = app.hot_balance(shop.id).await;

    let limited = consume(&app, &key, json!({"app_id": "vto-001"})).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "ratelimit-limit"), Some(5));
    assert_eq!(header(&limited, "retry-after"), Some(1));
    let limited = consume(&app, &shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(app.hot_balance(shop.id).await, before, "nothing charged");

    // A retry of a charged request still gets its answer: replays are free.
    let replay = consume_once(&app, &shop.token, "order-1").await;
    assert_eq!(replay.status(), 200);

    // One interval later (1 s at 3600 an hour), one more is allowed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let response = consume(&app, &shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(response.status(), 200);
    charged.insert(event_id(response).await);
    let response = consume(&app, &shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(response.status(), 429);

    app.drain_usage().await;
    app.assert_ledger_exact(&charged).await;
    // The recorder is shared by every test of this process: the series
    // exists; its count includes other tests' refusals.
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"consume_requests_total{outcome="rate_limited"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn each_route_group_has_its_own_limit_per_customer_with_headers_on_every_answer() {
    let app = spawn_app_with(&[
        ("RATE_LIMIT_APPS_PER_HOUR", "3"),
        ("RATE_LIMIT_ACTIVATE_PER_HOUR", "2"),
        ("RATE_LIMIT_BILLING_PER_HOUR", "1"),
    ])
    .await;
    let shop = app.create_customer(Some("enterprise")).await;
    let neighbour = app.create_customer(Some("enterprise")).await;

    for remaining in [2, 1, 0] {
        let response = app
            .http
            .get(app.url("/api/v1/apps"))
            .bearer_auth(&shop.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "ratelimit-limit"), Some(3));
        assert_eq!(header(&response, "ratelimit-remaining"), Some(remaining));
    }
    let (status, body) = app.get_json("/api/v1/apps", &shop.token).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // Another customer, and another group, are not affected.
    let (status, _) = app.get_json("/api/v1/apps", &neighbour.token).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_json("/api/v1/customer/apps", &shop.token).await;
    assert_eq!(status, 200);

    // Activation: two an hour; the third is refused and activates nothing.
    for slug in ["vto-001", "rec-001"] {
        app.activate(&shop, slug).await;
    }
    let (status, _) = app
        .post_json(
            "/api/v1/customer/apps/fit-001/activate",
            &shop.token,
            json!({}),
        )
        .await;
    assert_eq!(status, 429);
    let (_, mine) = app.get_json("/api/v1/customer/apps", &shop.token).await;
    let slugs: Vec<&str> = mine["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(slugs.len(), 2, "{mine}");

    // Billing: one an hour, every billing route counted together.
    let (status, _) = app
        .get_json("/api/v1/customer/billing/plans", &shop.token)
        .await;
    assert_eq!(status, 200);
    let (status, _) = app
        .get_json("/api/v1/customer/billing/subscription", &shop.token)
        .await;
    assert_eq!(status, 429);
    assert!(!slugs.contains(&"fit-001"), "{mine}");
}

#[tokio::test]
async fn the_route_group_limiters_live_in_api_rate_limit_redis_url() {
    // Another database of the test server; a cluster has only one, so
    // then a server of its own (TEST_LIMITER_REDIS_URL).
    let limiter_url = match std::env::var("TEST_LIMITER_REDIS_URL") {
        Ok(url) => url,
        Err(_) => format!("{}/2", redis_url().rsplit_once('/').unwrap().0),
    };
    let app = spawn_app_with(&[
        ("API_RATE_LIMIT_REDIS_URL", &limiter_url),
        ("RATE_LIMIT_APPS_PER_HOUR", "1"),
    ])
    .await;
    let shop = app.create_customer(Some("enterprise")).await;
    let limiter_db = Builder::from_config(Config::from_url(&limiter_url).unwrap())
        .build()
        .unwrap();
    limiter_db.init().await.unwrap();
    let key = app
        .state
        .limiter
        .key(connected_apps::hot::rate_limit::RouteGroup::Apps, shop.id);

    let (status, _) = app.get_json("/api/v1/apps", &shop.token).await;
    assert_eq!(status, 200);
    let (status, _) = app.get_json("/api/v1/apps", &shop.token).await;
    assert_eq!(status, 429);

    assert_eq!(limiter_db.exists::<u32, _>(&key).await.unwrap(), 1);
    assert_eq!(app.redis.exists::<u32, _>(&key).await.unwrap(), 0);
    let _: u32 = limiter_db.del(&key).await.unwrap();
}

#[tokio::test]
async fn cors_grants_only_the_configured_origins_and_lets_a_widget_read_the_limit_headers() {
    let app = spawn_app_with(&[
        (
            "CORS_ORIGINS",
            "https://shop.example, https://admin.shop.example",
        ),
        ("RATE_LIMIT_CONSUME_PER_HOUR", "3600"),
        ("RATE_LIMIT_CONSUME_BURST", "1"),
    ])
    .await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let preflight = |origin: &'static str| {
        app.http
            .request(
                reqwest::Method::OPTIONS,
                app.url("/api/v1/customer/tokens/consume"),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "x-api-key, content-type")
            .send()
    };

    let allowed = preflight("https://shop.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let refused = preflight("https://elsewhere.example").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    let send = || {
        app.http
            .post(app.url("/api/v1/customer/tokens/consume"))
            .bearer_auth(&shop.token)
            .header("Origin", "https://shop.example")
            .json(&json!({"app_id": "vto-001"}))
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    let limited = send().await.unwrap();
    assert_eq!(limited.status(), 429);
    let exposed = limited.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in [
        "retry-after",
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
    ] {
        assert!(exposed.contains(name), "{exposed}");
    }
}
