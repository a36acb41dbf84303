//! Merchants' usage alerts: a crossing found by the consume that makes
//! it, once per customer, period and threshold; recorded by the flusher;
//! delivered signed, and retried with the same id.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use connected_apps::{auth::stripe_signature, workers::alerts::AlertDeliveries};
use futures::future::join_all;
use serde_json::{json, Value};
use wiremock::{matchers::method, Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::{spawn_app, spawn_app_with, Customer, TestApp};

pub(crate) async fn spend(app: &TestApp, shop: &Customer, tokens: i64) -> u16 {
    app.consume(
        &shop.token,
        json!({"app_id": "rec-001", "tokens_consumed": tokens}),
    )
    .await
    .0
}

/// Sets the shop's webhook to `url`; returns the signing secret.
pub(crate) async fn alert_to(app: &TestApp, shop: &Customer, url: &str) -> String {
    let (status, body) = put_alerts(app, shop, json!({"webhook_url": url})).await;
    assert_eq!(status, 200, "{body}");
    body["signing_secret"].as_str().unwrap().to_owned()
}

pub(crate) async fn put_alerts(app: &TestApp, shop: &Customer, body: Value) -> (u16, Value) {
    let response = app
        .http
        .put(app.url("/api/v1/customer/alerts"))
        .bearer_auth(&shop.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

pub(crate) async fn crossings(app: &TestApp, shop: &Customer) -> Vec<Value> {
    let (status, body) = app
        .get_json("/api/v1/customer/alerts/events", &shop.token)
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().unwrap().clone()
}

pub(crate) fn deliveries(app: &TestApp) -> AlertDeliveries {
    AlertDeliveries::new(
        app.db.clone(),
        app.state.egress.clone(),
        app.state.sealer.clone(),
        app.settings.usage_alert_retry_base,
        app.settings.webhooks.disable_after,
    )
}

/// Checks a delivery's signature as a merchant would; returns its body.
pub(crate) fn verified(request: &Request, secret: &str) -> Value {
    let signature = request.headers["connected-apps-signature"]
        .to_str()
        .unwrap();
    stripe_signature::verify(
        &[secret.as_bytes()],
        signature,
        &request.body,
        chrono::Utc::now().timestamp(),
    )
    .expect("the delivery is signed with the merchant's secret");
    serde_json::from_slice(&request.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_consumes_racing_across_the_80_percent_line_make_one_crossing_and_one_delivery()
{
    let app = spawn_app().await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&receiver)
        .await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let secret = alert_to(&app, &shop, &format!("{}/hooks/usage", receiver.uri())).await;
    assert_eq!(spend(&app, &shop, 700).await, 200);

    let answers = join_all((0..200).map(|_| spend(&app, &shop, 1))).await;

    assert!(answers.iter().all(|s| *s == 200));
    app.drain_usage().await;
    let events = crossings(&app, &shop).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["threshold"], 80);
    assert_eq!(events[0]["tokens_total"], 1000);
    let used = events[0]["tokens_used"].as_i64().unwrap();
    assert!(
        (800..=802).contains(&used),
        "usage after the crossing consume: {used}"
    );
    assert_eq!(events[0]["delivery"], "pending");

    assert_eq!(deliveries(&app).step().await.unwrap(), 1);
    assert_eq!(deliveries(&app).step().await.unwrap(), 0, "delivered once");
    let sent = receiver.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    let body = verified(&sent[0], &secret);
    assert_eq!(body["id"], events[0]["id"]);
    assert_eq!(body["type"], "usage.threshold_crossed");
    assert_eq!(body["data"]["threshold"], 80);
    assert_eq!(body["data"]["customer_id"], shop.id.to_string());
    assert_eq!(crossings(&app, &shop).await[0]["delivery"], "delivered");
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"usage_alerts_total{threshold="80"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"usage_alert_deliveries_total{outcome="delivered"}"#));
}

/// Answers 500 `failures` times, then 200.
struct FailingThenOk {
    failures: usize,
    seen: AtomicUsize,
}

impl Respond for FailingThenOk {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        if self.seen.fetch_add(1, Ordering::SeqCst) < self.failures {
            ResponseTemplate::new(500)
        } else {
            ResponseTemplate::new(200)
        }
    }
}

/// A receiver that answers 500 `failures` times, then 200.
pub(crate) async fn receiver_failing(failures: usize) -> MockServer {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(FailingThenOk {
            failures,
            seen: AtomicUsize::new(0),
        })
        .mount(&receiver)
        .await;
    receiver
}

#[tokio::test]
async fn a_receiver_that_fails_twice_then_succeeds_gets_three_attempts_with_the_same_id() {
    let app = spawn_app_with(&[("USAGE_ALERT_RETRY_BASE_MS", "20")]).await;
    let receiver = receiver_failing(2).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let secret = alert_to(&app, &shop, &receiver.uri()).await;
    assert_eq!(spend(&app, &shop, 850).await, 200);
    app.drain_usage().await;

    let worker = deliveries(&app);
    for _ in 0..100 {
        worker.step().await.unwrap();
        if crossings(&app, &shop).await[0]["delivery"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let sent = receiver.received_requests().await.unwrap();
    assert_eq!(sent.len(), 3);
    let ids: Vec<Value> = sent
        .iter()
        .map(|r| verified(r, &secret)["id"].clone())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(crossings(&app, &shop).await[0]["delivery"], "delivered");
}

#[tokio::test]
async fn a_new_period_arms_the_thresholds_again_and_a_purchase_does_not() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    assert_eq!(spend(&app, &shop, 1000).await, 200);
    app.grant(shop.id, 100).await;
    assert_eq!(spend(&app, &shop, 50).await, 200, "drawn from the purchase");
    app.drain_usage().await;
    let first: Vec<i64> = crossings(&app, &shop)
        .await
        .iter()
        .map(|e| e["threshold"].as_i64().unwrap())
        .collect();
    assert_eq!(
        first,
        [100, 80],
        "one consume may cross several; the purchase re-arms none"
    );

    // The period ended a second ago, after the charges above (a second
    // old by then); the consume script starts the next.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    sqlx::query(
        "UPDATE customer_billing SET billing_anchor = NOW() - INTERVAL '1 month' - INTERVAL '1 second', \
             billing_cycle_start = NOW() - INTERVAL '1 month' - INTERVAL '1 second', \
             billing_cycle_end = NOW() - INTERVAL '1 second' WHERE customer_id = $1",
    )
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();
    app.wipe_redis().await;
    assert_eq!(spend(&app, &shop, 810).await, 200);
    app.drain_usage().await;

    let events = crossings(&app, &shop).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0]["threshold"], 80);
    assert_ne!(events[0]["period_start"], events[1]["period_start"]);
}

#[tokio::test]
async fn an_unlimited_plan_never_alerts() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("enterprise", &["rec-001"]).await;

    assert_eq!(spend(&app, &shop, 5_000_000).await, 200);
    app.drain_usage().await;

    assert!(crossings(&app, &shop).await.is_empty());
}

#[tokio::test]
async fn with_usage_alerts_off_nothing_is_recorded_or_sent() {
    let app = spawn_app_with(&[("ENABLE_USAGE_ALERTS", "false")]).await;
    let receiver = MockServer::start().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    alert_to(&app, &shop, &receiver.uri()).await;

    assert_eq!(spend(&app, &shop, 1000).await, 200);
    app.drain_usage().await;

    assert!(crossings(&app, &shop).await.is_empty());
    assert_eq!(deliveries(&app).step().await.unwrap(), 0);
    assert!(receiver.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn without_a_url_crossings_are_recorded_and_marked_none() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;

    assert_eq!(spend(&app, &shop, 900).await, 200);
    app.drain_usage().await;

    let events = crossings(&app, &shop).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["delivery"], "none");
}

#[tokio::test]
async fn settings_start_at_the_defaults_and_bad_values_are_refused_by_field() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let (status, body) = app.get_json("/api/v1/customer/alerts", &shop.token).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"webhook_url": null, "thresholds": [80, 100], "enabled": true, "signing_secret_hint": null,
               "previous_secret_expires_at": null, "endpoint_status": "enabled", "disabled_reason": null,
               "disabled_at": null})
    );

    for (change, field) in [
        (json!({"thresholds": []}), "thresholds"),
        (json!({"thresholds": [50, 50]}), "thresholds"),
        (json!({"thresholds": [0]}), "thresholds"),
        (json!({"thresholds": [101]}), "thresholds"),
        (
            json!({"thresholds": [10, 20, 30, 40, 50, 60]}),
            "thresholds",
        ),
        (
            json!({"webhook_url": "http://shop.example/hook"}),
            "webhook_url",
        ),
        (
            json!({"webhook_url": "ftp://shop.example/hook"}),
            "webhook_url",
        ),
        (json!({"webhook_url": "not a url"}), "webhook_url"),
    ] {
        let (status, body) = put_alerts(&app, &shop, change.clone()).await;
        assert_eq!(status, 422, "{change}: {body}");
        assert_eq!(body["error"]["details"][0]["field"], field, "{change}");
    }

    let (_, first) = put_alerts(
        &app,
        &shop,
        json!({"webhook_url": "https://shop.example/a", "thresholds": [90, 50]}),
    )
    .await;
    let secret = first["signing_secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(first["thresholds"], json!([50, 90]));
    let (_, second) = put_alerts(
        &app,
        &shop,
        json!({"webhook_url": "https://shop.example/b"}),
    )
    .await;
    assert!(
        second.get("signing_secret").is_none(),
        "shown once: {second}"
    );
    assert_eq!(
        second["signing_secret_hint"],
        format!("…{}", &secret[secret.len() - 4..]),
        "a new URL keeps the secret"
    );
    let reader = app.token_for(shop.id, &["tokens:read"]);
    let refused = app
        .http
        .put(app.url("/api/v1/customer/alerts"))
        .bearer_auth(&reader)
        .json(&json!({"enabled": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403, "changing them needs billing:manage");
}

#[tokio::test]
async fn thresholds_changed_apply_to_the_very_next_consume() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    assert_eq!(spend(&app, &shop, 100).await, 200);

    let (status, _) = put_alerts(&app, &shop, json!({"thresholds": [20]})).await;
    assert_eq!(status, 200);
    assert_eq!(spend(&app, &shop, 150).await, 200);
    app.drain_usage().await;

    let events = crossings(&app, &shop).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["threshold"], 20);
}
