//! The edges under hostile or careless clients: slow requests, invented
//! methods and paths, and error answers in the contract's shape on every
//! route.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

/// The codes API.md lists, and the two the OpenAPI document adds
/// (`request_timeout`, `unsupported_media_type`).
const CODES: [&str; 23] = [
    "invalid_json",
    "invalid_request",
    "unauthenticated",
    "invalid_token",
    "invalid_api_key",
    "invalid_signature",
    "insufficient_tokens",
    "subscription_inactive",
    "insufficient_scope",
    "app_not_active",
    "app_not_permitted",
    "plan_upgrade_required",
    "origin_not_allowed",
    "not_found",
    "conflict",
    "payload_too_large",
    "validation_failed",
    "rate_limited",
    "unavailable",
    "method_not_allowed",
    "request_timeout",
    "unsupported_media_type",
    "internal_error",
];

async fn connect(app: &TestApp) -> TcpStream {
    let address = app.address.trim_start_matches("http://");
    TcpStream::connect(address).await.unwrap()
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Instant>) {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&received).into(),
                    Some(Instant::now()),
                )
            }
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Err(_) => return (String::from_utf8_lossy(&received).into(), None),
        }
    }
}

#[tokio::test]
async fn a_client_trickling_header_lines_is_cut_off_at_the_header_timeout() {
    let app = spawn_app_with(&[("HTTP_HEADER_TIMEOUT_SECS", "1")]).await;
    let mut stream = connect(&app).await;
    let started = Instant::now();
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: shop\r\n")
        .await
        .unwrap();

    // One header line every 200 ms, for up to 20 s, as a slowloris client
    // would; the server must close the connection long before.
    let mut closed = false;
    for i in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stream
            .write_all(format!("X-Trickle-{i}: still here\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe)).await
        {
            closed = true;
            break;
        }
    }

    assert!(closed, "the connection was held open for 20 s");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let app = spawn_app_with(&[("HTTP_HEADER_TIMEOUT_SECS", "1")]).await;
    let mut stream = connect(&app).await;
    stream
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();

    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed.is_some(), "an idle connection stayed open for 10 s");
}

async fn post_trickled_body(app: &TestApp, token: &str, sent: &[u8], every: Duration) -> String {
    let mut stream = connect(app).await;
    let head = format!(
        "POST /api/v1/customer/tokens/consume HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        sent.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let writer = async {
        for byte in sent {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(every).await;
        }
        stream
    };
    let mut stream = writer.await;
    read_until_closed(&mut stream, Duration::from_secs(15))
        .await
        .0
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_a_408_in_the_contract_shape() {
    let app = spawn_app_with(&[("HTTP_BODY_TIMEOUT_SECS", "1")]).await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let mut stream = connect(&app).await;
    let head = format!(
        "POST /api/v1/customer/tokens/consume HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"app_id\":",
        shop.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();

    let (answer, _) = read_until_closed(&mut stream, Duration::from_secs(10)).await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");
    assert_eq!(app.usage_rows(shop.id).await.0, 0);
}

#[tokio::test]
async fn a_body_trickled_steadily_is_cut_off_at_the_request_timeout() {
    let app = spawn_app_with(&[
        ("HTTP_BODY_TIMEOUT_SECS", "1"),
        ("HTTP_REQUEST_TIMEOUT_SECS", "2"),
    ])
    .await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let started = Instant::now();

    // A byte every 300 ms never trips the 1 s wait for the next piece, but
    // 64 bytes take 19 s.
    let answer =
        post_trickled_body(&app, &shop.token, &[b' '; 64], Duration::from_millis(300)).await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn invented_methods_and_paths_add_no_metric_series() {
    let app = spawn_app().await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..5 {
        let method = Method::from_bytes(format!("FOO{i}{}", &marker[..6]).as_bytes()).unwrap();
        let response = app
            .http
            .request(method, app.url(&format!("/probe-{marker}-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        let response = app
            .http
            .request(
                Method::from_bytes(format!("BAR{i}").as_bytes()).unwrap(),
                app.url("/health/live"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405);
    }

    let metrics = app.metrics_text().await;

    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("http_request"))
        .collect();
    assert!(
        !series
            .iter()
            .any(|l| l.contains(&marker[..6]) || l.contains("BAR")),
        "a client-chosen method or path became a label"
    );
    assert!(series
        .iter()
        .any(|l| l.contains(r#"method="OTHER""#) && l.contains(r#"route="unmatched""#)));
    assert!(series
        .iter()
        .any(|l| l.contains(r#"method="OTHER""#) && l.contains(r#"route="/health/live""#)));
}

/// Checks an error answer is in the contract's shape; returns its code.
async fn contract_error(response: reqwest::Response, what: &str) -> (u16, String) {
    let status = response.status().as_u16();
    // 503 is the contract's "a dependency is down" (Stripe is not reachable
    // from the suite); nothing may be a 500.
    assert!(status < 500 || status == 503, "{what}: a {status}");
    assert!(
        response.headers().contains_key("x-request-id"),
        "{what}: no x-request-id"
    );
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    if status < 400 {
        return (status, String::new());
    }
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {status} as {content_type:?}: {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        CODES.contains(&code.as_str()),
        "{what}: code {code:?} in {text}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {text}"
    );
    (status, code)
}

#[tokio::test]
async fn every_route_answers_bad_requests_with_the_contracts_error_body() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let everything = app.token_for(
        shop.id,
        &[
            "apps:read",
            "apps:activate",
            "tokens:consume",
            "tokens:read",
            "billing:manage",
            "admin",
        ],
    );
    let spec = app.openapi().await;
    // Over the API's 64 KiB and the webhook's 1 MiB.
    let oversized = format!(r#"{{"x":"{}"}}"#, "a".repeat(1100 * 1024));
    let mut probed = 0;
    for (template, operations) in spec["paths"].as_object().unwrap() {
        let path = template
            .replace("{app_id}", "vto-001")
            .replace("{id}", &shop.id.to_string())
            .replace("{key_id}", &uuid::Uuid::now_v7().to_string());
        let url = app.url(&path);
        let methods: Vec<String> = operations.as_object().unwrap().keys().cloned().collect();
        for method in &methods {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let takes_body = operations[method.as_str().to_lowercase()]
                .get("requestBody")
                .is_some();
            let send = |content_type: &'static str, body: String| {
                app.http
                    .request(method.clone(), url.clone())
                    .bearer_auth(&everything)
                    .header("Content-Type", content_type)
                    .body(body)
                    .send()
            };
            let what = format!("{method} {template}");
            // Not /metrics: answered without reading the body, its long
            // answer can be cut by the reset the kernel sends when the
            // server closes a connection with the body unread (a scraper
            // sends no body).
            if template != "/metrics" {
                let (status, _) = contract_error(
                    send("application/json", oversized.clone()).await.unwrap(),
                    &format!("{what} oversized"),
                )
                .await;
                if takes_body {
                    assert_eq!(status, 413, "{what} oversized");
                }
            }
            let (status, code) = contract_error(
                send("text/plain", "{}".into()).await.unwrap(),
                &format!("{what} text/plain"),
            )
            .await;
            if takes_body {
                assert_eq!(
                    (status, code.as_str()),
                    (415, "unsupported_media_type"),
                    "{what}"
                );
            }
            let (status, _) = contract_error(
                send("application/json", r#"{"app_id":"#.into())
                    .await
                    .unwrap(),
                &format!("{what} broken JSON"),
            )
            .await;
            if takes_body && !template.contains("webhooks") {
                assert_eq!(status, 400, "{what} broken JSON");
            }
            probed += 1;
        }
        let unused = ["PUT", "DELETE", "PATCH", "POST", "GET"]
            .into_iter()
            .find(|m| !methods.iter().any(|have| have.eq_ignore_ascii_case(m)))
            .unwrap();
        let response = app
            .http
            .request(Method::from_bytes(unused.as_bytes()).unwrap(), url.clone())
            .bearer_auth(&everything)
            .send()
            .await
            .unwrap();
        let (status, code) = contract_error(response, &format!("{unused} {template}")).await;
        assert_eq!(
            (status, code.as_str()),
            (405, "method_not_allowed"),
            "{unused} {template}"
        );
    }
    assert!(
        probed >= 20,
        "only {probed} operations in the OpenAPI document"
    );
}

#[tokio::test]
async fn a_signed_webhook_over_the_size_limit_is_a_413_in_the_contract_shape() {
    let app = spawn_app().await;
    let body = format!(
        r#"{{"id":"evt_big","object":"event","type":"invoice.paid","created":1,"data":{{"object":{{"pad":"{}"}}}}}}"#,
        "x".repeat(1100 * 1024)
    );
    let signature = connected_apps::auth::stripe_signature::sign(
        &[crate::helpers::WEBHOOK_SECRET],
        body.as_bytes(),
        chrono::Utc::now().timestamp(),
    );

    let (status, answer) = app.deliver_webhook(body, &signature).await;

    assert_eq!(status, 413);
    assert_eq!(answer["error"]["code"], "payload_too_large");
}
