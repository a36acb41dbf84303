//! Merchants' webhooks as Svix and Stripe run theirs: they never reach
//! the service's own network (checked when saved and again when sent),
//! their secret rotates with an overlap, every attempt is kept, an event
//! can be resent and a test event sent, and an endpoint that only fails
//! is disabled until its URL is saved again.

use connected_apps::auth::stripe_signature;
use serde_json::{json, Value};
use wiremock::{matchers::method, Mock, MockServer, Request, ResponseTemplate};

use crate::{
    alerts::{alert_to, crossings, deliveries, put_alerts, receiver_failing, spend, verified},
    helpers::{spawn_app_with, Customer, TestApp},
};

/// Addresses no webhook may reach, one of each range, with the range.
const INTERNAL: [(&str, &str); 22] = [
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.8.1", "private"),
    ("192.168.1.20", "private"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("fc00::5", "unique-local"),
    ("fd00:ec2::254", "unique-local"),
    ("100.64.0.7", "CGNAT"),
    ("224.0.0.251", "multicast"),
    ("ff02::fb", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:127.0.0.1", "IPv6 form"),
    ("::ffff:10.0.0.5", "IPv6 form"),
    ("::ffff:169.254.169.254", "IPv6 form"),
    ("64:ff9b::a9fe:a9fe", "IPv6 form"),
    ("2002:a00:5::1", "IPv6 form"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "benchmarking"),
];

/// Names that mean the cluster or the cloud whatever they resolve to.
const INTERNAL_NAMES: [&str; 6] = [
    "metadata.google.internal",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "postgres.db.svc.cluster.local",
    "redis",
    "localhost",
];

/// A production instance: https only, loopback refused like the rest.
async fn production(extra: &[(&str, &str)]) -> TestApp {
    let mut vars = vec![
        ("APP_ENV", "production"),
        (
            "DATA_ENCRYPTION_KEYS",
            "suite:c3VpdGUtb25seS1rZXktdGhpcnR5LXR3by1ieXRlcyE=",
        ),
    ];
    vars.extend_from_slice(extra);
    spawn_app_with(&vars).await
}

/// `addr` as a URL's host.
fn host(addr: &str) -> String {
    if addr.contains(':') {
        format!("[{addr}]")
    } else {
        addr.to_owned()
    }
}

/// The `webhook_url` refusal's message, or `None` when it was saved.
async fn refusal(app: &TestApp, shop: &Customer, url: &str) -> Option<String> {
    let (status, body) = put_alerts(app, shop, json!({ "webhook_url": url })).await;
    match status {
        200 => None,
        422 => {
            assert_eq!(
                body["error"]["details"][0]["field"], "webhook_url",
                "{body}"
            );
            Some(
                body["error"]["details"][0]["message"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        }
        other => panic!("{url}: {other} {body}"),
    }
}

/// Sends a test event; returns its outcome.
async fn test_event(app: &TestApp, shop: &Customer) -> Value {
    let (status, body) = app
        .post_json("/api/v1/customer/alerts/test", &shop.token, json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn attempts(app: &TestApp, shop: &Customer, event: &Value) -> Vec<Value> {
    let path = format!(
        "/api/v1/customer/alerts/events/{}/attempts",
        event["id"].as_str().unwrap()
    );
    let (status, body) = app.get_json(&path, &shop.token).await;
    assert_eq!(status, 200, "{body}");
    body["attempts"].as_array().unwrap().clone()
}

async fn resend(app: &TestApp, shop: &Customer, event: &Value) -> (u16, Value) {
    let path = format!(
        "/api/v1/customer/alerts/events/{}/resend",
        event["id"].as_str().unwrap()
    );
    app.post_json(&path, &shop.token, json!({})).await
}

async fn receiver_answering(status: u16) -> MockServer {
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_body_string("thanks"))
        .mount(&receiver)
        .await;
    receiver
}

/// Runs the delivery worker until it has nothing due.
async fn deliver_due(app: &TestApp) {
    let worker = deliveries(app);
    while worker.step().await.unwrap() > 0 {}
}

#[tokio::test]
async fn in_production_every_internal_address_and_name_is_refused_when_saved() {
    let app = production(&[]).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;

    for (address, range) in INTERNAL {
        let literal = refusal(&app, &shop, &format!("https://{}/hooks", host(address))).await;
        assert!(literal.is_some(), "{address} ({range}) was saved");
        let name = format!("{}.hooks.example", address.replace([':', '.'], "-"));
        app.resolver.answer(&name, &[address]);
        let resolved = refusal(&app, &shop, &format!("https://{name}/hooks")).await;
        assert!(
            resolved.as_deref().is_some_and(|m| m.contains(address)),
            "{name} resolving to {address} ({range}): {resolved:?}"
        );
    }
    for name in INTERNAL_NAMES {
        app.resolver.answer(name, &["93.184.216.34"]);
        let refused = refusal(&app, &shop, &format!("https://{name}/hooks")).await;
        assert!(refused.is_some(), "{name} was saved");
    }
    // One internal address among public ones is enough to refuse a name.
    app.resolver
        .answer("mixed.hooks.example", &["93.184.216.34", "10.1.2.3"]);
    assert!(refusal(&app, &shop, "https://mixed.hooks.example/")
        .await
        .is_some());
    assert!(
        refusal(&app, &shop, "https://unknown.hooks.example/")
            .await
            .is_some(),
        "a name that does not resolve"
    );
    assert!(
        refusal(&app, &shop, "http://127.0.0.1:8080/")
            .await
            .is_some(),
        "plain http to loopback, in production"
    );

    assert_eq!(
        refusal(&app, &shop, "https://shop.example/hooks").await,
        None
    );
    assert_eq!(
        refusal(&app, &shop, "https://93.184.216.34/hooks").await,
        None
    );
    assert_eq!(
        refusal(&app, &shop, "https://[2606:4700::6810:85e5]/hooks").await,
        None
    );
}

#[tokio::test]
async fn in_production_every_internal_address_is_refused_when_sent_and_the_outcome_says_why() {
    let app = production(&[]).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.resolver
        .answer("hooks.shop.example", &["93.184.216.34"]);
    alert_to(&app, &shop, "https://hooks.shop.example/usage").await;

    for (address, range) in INTERNAL {
        // Public when saved; DNS now answers an internal address.
        app.resolver.answer("hooks.shop.example", &[address]);
        let sent = test_event(&app, &shop).await;
        assert_eq!(sent["delivered"], false, "{address} ({range})");
        assert_eq!(
            sent["http_status"],
            Value::Null,
            "nothing was connected to: {sent}"
        );
        let error = sent["error"].as_str().unwrap();
        assert!(
            error.starts_with("refused: ") && error.contains(address),
            "{address}: {error}"
        );

        // A literal address written behind the API's back is checked too.
        sqlx::query("UPDATE usage_alert_settings SET webhook_url = $2 WHERE customer_id = $1")
            .bind(shop.id)
            .bind(format!("https://{}/usage", host(address)))
            .execute(&app.db)
            .await
            .unwrap();
        let sent = test_event(&app, &shop).await;
        assert!(
            sent["error"].as_str().unwrap().starts_with("refused: "),
            "{address}: {sent}"
        );
        sqlx::query("UPDATE usage_alert_settings SET webhook_url = 'https://hooks.shop.example/usage' WHERE customer_id = $1")
            .bind(shop.id)
            .execute(&app.db)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_operators_allow_list_opens_its_ranges_for_on_premises_receivers() {
    let app = production(&[("ALERT_WEBHOOK_ALLOW_CIDRS", "10.20.0.0/16, fd00:20::/32")]).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;

    assert_eq!(refusal(&app, &shop, "https://10.20.3.4/hooks").await, None);
    assert_eq!(
        refusal(&app, &shop, "https://[fd00:20::4]/hooks").await,
        None
    );
    assert!(refusal(&app, &shop, "https://10.21.3.4/hooks")
        .await
        .is_some());
}

#[tokio::test]
async fn a_name_that_points_inside_when_the_crossing_is_sent_is_refused_and_retried() {
    let app = spawn_app_with(&[("USAGE_ALERT_RETRY_BASE_MS", "60000")]).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.resolver
        .answer("hooks.shop.example", &["93.184.216.34"]);
    alert_to(&app, &shop, "https://hooks.shop.example/usage").await;
    assert_eq!(spend(&app, &shop, 850).await, 200);
    app.drain_usage().await;

    // DNS rebinding: public when saved, the metadata service when sent.
    // (The retry is a minute away: one attempt, however slow the pass.)
    app.resolver
        .answer("hooks.shop.example", &["169.254.169.254"]);
    deliver_due(&app).await;

    let event = &crossings(&app, &shop).await[0];
    assert_eq!(
        event["delivery"], "pending",
        "a refused send is a failed attempt: {event}"
    );
    let tried = attempts(&app, &shop, event).await;
    assert_eq!(tried.len(), 1);
    assert_eq!(tried[0]["http_status"], Value::Null);
    let error = tried[0]["error"].as_str().unwrap();
    assert!(
        error.contains("169.254.169.254") && error.contains("link-local"),
        "{error}"
    );
    assert!(tried[0]["next_attempt_at"].is_string(), "{}", tried[0]);
}

#[tokio::test]
async fn a_name_that_resolves_to_an_allowed_address_is_delivered_there() {
    let app = spawn_app_with(&[]).await;
    let receiver = receiver_answering(204).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    // Outside production loopback is allowed: the name's only address is
    // the receiver's, and the client connects to that address.
    app.resolver.answer("local.shop.example", &["127.0.0.1"]);
    let port = receiver.address().port();
    let secret = alert_to(
        &app,
        &shop,
        &format!("http://local.shop.example:{port}/usage"),
    )
    .await;
    let refused = refusal(&app, &shop, "http://shop.example/usage").await;
    assert!(refused.is_some(), "plain http to a public name");
    assert_eq!(spend(&app, &shop, 850).await, 200);
    app.drain_usage().await;

    deliver_due(&app).await;

    let sent = receiver.received_requests().await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(verified(&sent[0], &secret)["data"]["threshold"], 80);
    assert_eq!(crossings(&app, &shop).await[0]["delivery"], "delivered");
}

#[tokio::test]
async fn every_attempt_at_a_failing_then_recovering_receiver_is_listed_with_its_answer() {
    let app = spawn_app_with(&[("USAGE_ALERT_RETRY_BASE_MS", "20")]).await;
    let receiver = receiver_failing(2).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    alert_to(&app, &shop, &receiver.uri()).await;
    assert_eq!(spend(&app, &shop, 850).await, 200);
    app.drain_usage().await;

    let worker = deliveries(&app);
    while crossings(&app, &shop).await[0]["delivery"] == "pending" {
        worker.step().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let event = &crossings(&app, &shop).await[0];
    assert_eq!(event["delivery"], "delivered");
    assert_eq!(event["attempts"], 3);
    assert_eq!(event["last_error"], Value::Null);
    let tried = attempts(&app, &shop, event).await;
    let statuses: Vec<&Value> = tried.iter().map(|a| &a["http_status"]).collect();
    assert_eq!(statuses, [&json!(500), &json!(500), &json!(200)]);
    assert_eq!(tried[0]["error"], "answered 500 Internal Server Error");
    assert!(tried[0]["next_attempt_at"].is_string() && tried[1]["next_attempt_at"].is_string());
    assert_eq!(tried[2]["next_attempt_at"], Value::Null);
    assert!(tried
        .iter()
        .all(|a| a["trigger"] == "scheduled" && a["latency_ms"].is_i64()));
    assert!(tried
        .iter()
        .all(|a| a["url"] == format!("{}/", receiver.uri())));

    let stranger = app.customer_with_apps("starter", &["rec-001"]).await;
    let path = format!(
        "/api/v1/customer/alerts/events/{}/attempts",
        event["id"].as_str().unwrap()
    );
    assert_eq!(
        app.get_json(&path, &stranger.token).await.0,
        404,
        "another merchant's event"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("usage_alert_attempt_duration_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_delivered_event_is_resent_with_its_id_and_the_resend_is_in_its_attempts() {
    let app = spawn_app_with(&[("USAGE_ALERT_RETRY_BASE_MS", "60000")]).await;
    let receiver = receiver_failing(1).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let secret = alert_to(&app, &shop, &receiver.uri()).await;
    assert_eq!(spend(&app, &shop, 850).await, 200);
    app.drain_usage().await;
    deliver_due(&app).await;
    let event = crossings(&app, &shop).await[0].clone();
    assert_eq!(event["delivery"], "pending", "its retry is a minute away");

    let (status, refused) = resend(&app, &shop, &event).await;
    assert_eq!(status, 409, "the worker still has it: {refused}");
    sqlx::query(
        "UPDATE usage_alerts SET delivery = 'failed', next_attempt_at = NULL WHERE id = $1",
    )
    .bind(uuid::Uuid::parse_str(event["id"].as_str().unwrap()).unwrap())
    .execute(&app.db)
    .await
    .unwrap();

    let (status, outcome) = resend(&app, &shop, &event).await;

    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["delivered"], true);
    assert_eq!(outcome["http_status"], 200);
    assert_eq!(outcome["response_excerpt"], Value::Null);
    let sent = receiver.received_requests().await.unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(
        verified(&sent[1], &secret)["id"],
        event["id"],
        "the same id: receivers drop repeats"
    );
    assert_eq!(crossings(&app, &shop).await[0]["delivery"], "delivered");
    let tried = attempts(&app, &shop, &event).await;
    assert_eq!(tried.len(), 2);
    assert_eq!(tried[1]["trigger"], "resend");
    let (status, _) = resend(&app, &shop, &event).await;
    assert_eq!(status, 200, "a delivered event is resent too");
    assert_eq!(receiver.received_requests().await.unwrap().len(), 3);
    let missing = json!({"id": uuid::Uuid::new_v4().to_string()});
    assert_eq!(resend(&app, &shop, &missing).await.0, 404);
    let stranger = app.customer_with_apps("starter", &["rec-001"]).await;
    assert_eq!(resend(&app, &stranger, &event).await.0, 404);
}

#[tokio::test]
async fn a_test_event_is_signed_sent_to_the_current_url_and_answered_with_its_outcome() {
    let app = spawn_app_with(&[]).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let (status, _) = app
        .post_json("/api/v1/customer/alerts/test", &shop.token, json!({}))
        .await;
    assert_eq!(status, 409, "no URL yet");
    let receiver = receiver_answering(202).await;
    let secret = alert_to(&app, &shop, &format!("{}/hooks", receiver.uri())).await;

    let outcome = test_event(&app, &shop).await;

    assert_eq!(outcome["delivered"], true);
    assert_eq!(outcome["http_status"], 202);
    assert_eq!(outcome["response_excerpt"], "thanks");
    let sent = receiver.received_requests().await.unwrap();
    let body = verified(&sent[0], &secret);
    assert_eq!(body["type"], "usage.test");
    assert_eq!(body["id"], outcome["id"]);
    assert_eq!(body["data"]["customer_id"], shop.id.to_string());
    assert!(
        crossings(&app, &shop).await.is_empty(),
        "nothing is recorded"
    );

    let failing = receiver_answering(503).await;
    put_alerts(&app, &shop, json!({"webhook_url": failing.uri()})).await;
    let outcome = test_event(&app, &shop).await;
    assert_eq!(outcome["delivered"], false);
    assert_eq!(outcome["error"], "answered 503 Service Unavailable");
    let reader = app.token_for(shop.id, &["tokens:read"]);
    let (status, _) = app
        .post_json("/api/v1/customer/alerts/test", &reader, json!({}))
        .await;
    assert_eq!(status, 403, "sending needs billing:manage");
}

/// Whether the delivery's signature verifies with `secret`.
fn signed_with(request: &Request, secret: &str) -> bool {
    let header = request.headers["connected-apps-signature"]
        .to_str()
        .unwrap();
    stripe_signature::verify(
        &[secret.as_bytes()],
        header,
        &request.body,
        chrono::Utc::now().timestamp(),
    )
    .is_ok()
}

#[tokio::test]
async fn a_rotated_secret_signs_beside_the_old_one_for_the_overlap_then_alone() {
    let app = spawn_app_with(&[]).await;
    let receiver = receiver_answering(200).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let (status, _) = app
        .post_json(
            "/api/v1/customer/alerts/rotate-secret",
            &shop.token,
            json!({}),
        )
        .await;
    assert_eq!(status, 409, "no secret before the first URL");
    let old = alert_to(&app, &shop, &receiver.uri()).await;
    put_alerts(&app, &shop, json!({"thresholds": [50, 80]})).await;

    let (status, rotated) = app
        .post_json(
            "/api/v1/customer/alerts/rotate-secret",
            &shop.token,
            json!({}),
        )
        .await;

    assert_eq!(status, 200, "{rotated}");
    let new = rotated["signing_secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("whsec_") && new != old);
    assert_eq!(
        rotated["signing_secret_hint"],
        format!("…{}", &new[new.len() - 4..])
    );
    let overlap_ends: chrono::DateTime<chrono::Utc> = rotated["previous_secret_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let hours = (overlap_ends - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((23.9..=24.0).contains(&hours), "{hours} h");
    let (_, settings) = app.get_json("/api/v1/customer/alerts", &shop.token).await;
    assert!(settings.get("signing_secret").is_none(), "shown once");

    // Within the overlap: a receiver still on the old secret verifies,
    // one already on the new secret too.
    assert_eq!(spend(&app, &shop, 550).await, 200);
    app.drain_usage().await;
    deliver_due(&app).await;
    let sent = receiver.received_requests().await.unwrap();
    let header = sent[0].headers["connected-apps-signature"]
        .to_str()
        .unwrap();
    assert_eq!(header.matches("v1=").count(), 2, "{header}");
    assert!(signed_with(&sent[0], &old) && signed_with(&sent[0], &new));

    // The overlap ends (a day passes): the new secret alone.
    sqlx::query("UPDATE usage_alert_settings SET previous_secret_expires_at = NOW() - INTERVAL '1 second' WHERE customer_id = $1")
        .bind(shop.id)
        .execute(&app.db)
        .await
        .unwrap();
    assert_eq!(spend(&app, &shop, 300).await, 200);
    app.drain_usage().await;
    deliver_due(&app).await;
    let sent = receiver.received_requests().await.unwrap();
    assert_eq!(sent.len(), 2);
    assert!(
        !signed_with(&sent[1], &old),
        "the old secret no longer signs"
    );
    assert!(signed_with(&sent[1], &new));
    let (_, settings) = app.get_json("/api/v1/customer/alerts", &shop.token).await;
    assert_eq!(settings["previous_secret_expires_at"], Value::Null);
}

#[tokio::test]
async fn an_endpoint_failing_for_a_day_is_disabled_until_its_url_is_saved_again() {
    let app = spawn_app_with(&[("USAGE_ALERT_RETRY_BASE_MS", "20")]).await;
    let down = receiver_answering(500).await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    alert_to(&app, &shop, &down.uri()).await;
    put_alerts(&app, &shop, json!({"thresholds": [50, 80]})).await;
    assert_eq!(spend(&app, &shop, 550).await, 200);
    app.drain_usage().await;
    deliver_due(&app).await;
    // It has been failing for a day.
    sqlx::query("UPDATE usage_alert_settings SET failing_since = NOW() - INTERVAL '25 hours' WHERE customer_id = $1")
        .bind(shop.id)
        .execute(&app.db)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    deliver_due(&app).await;

    let (_, listed) = app
        .get_json("/api/v1/customer/alerts/events", &shop.token)
        .await;
    assert_eq!(listed["endpoint_status"], "disabled", "{listed}");
    let reason = listed["disabled_reason"].as_str().unwrap();
    assert!(reason.contains("answered 500"), "{reason}");
    assert_eq!(
        listed["events"][0]["delivery"], "disabled",
        "held, not failed"
    );
    let (_, settings) = app.get_json("/api/v1/customer/alerts", &shop.token).await;
    assert_eq!(settings["endpoint_status"], "disabled");
    deliveries(&app).count_disabled().await.unwrap();
    assert!(app
        .metrics_text()
        .await
        .contains("usage_alert_endpoints_disabled"));

    // Crossings go on being recorded, and held.
    assert_eq!(spend(&app, &shop, 300).await, 200);
    app.drain_usage().await;
    let events = crossings(&app, &shop).await;
    assert_eq!(events.len(), 2);
    assert!(
        events.iter().all(|e| e["delivery"] == "disabled"),
        "{events:?}"
    );
    let sent_while_disabled = down.received_requests().await.unwrap().len();
    deliver_due(&app).await;
    assert_eq!(
        down.received_requests().await.unwrap().len(),
        sent_while_disabled
    );

    // The merchant fixes the receiver and saves the URL: enabled again,
    // and what was held is resent.
    let up = receiver_answering(200).await;
    put_alerts(&app, &shop, json!({"webhook_url": up.uri()})).await;
    let (_, settings) = app.get_json("/api/v1/customer/alerts", &shop.token).await;
    assert_eq!(settings["endpoint_status"], "enabled");
    assert_eq!(settings["disabled_reason"], Value::Null);
    for event in &events {
        let (status, outcome) = resend(&app, &shop, event).await;
        assert_eq!(
            (status, &outcome["delivered"]),
            (200, &json!(true)),
            "{outcome}"
        );
    }
    assert!(crossings(&app, &shop)
        .await
        .iter()
        .all(|e| e["delivery"] == "delivered"));
}
