//! What an operator is told when something breaks: error reports in Sentry
//! and traces over OTLP, from the real binary (both are process-wide, so
//! each test runs a process of its own) against local stand-ins.

use std::{process::Stdio, time::Duration};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use wiremock::{
    matchers::{method, path},
    Mock, MockServer, ResponseTemplate,
};

use crate::helpers::{spawn_app, TestApp};

/// The binary serving the API for `app`'s database and Redis keys, with
/// `extra` settings; its address once it listens.
async fn serve(app: &TestApp, extra: &[(&str, &str)]) -> (Child, String) {
    let settings = &app.settings;
    let mut command = Command::new(env!("CARGO_BIN_EXE_connected-apps"));
    command
        .args(["serve", "--roles", "api"])
        .env_clear()
        .env("DATABASE_URL", settings.database.url.expose())
        .env("REDIS_URL", settings.redis.url.expose())
        .env("REDIS_KEY_PREFIX", &app.prefix)
        .env("JWT_SECRET", crate::helpers::JWT_SECRET)
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("PORT", "0")
        .env("MIGRATE_ON_START", "false")
        .env("LOG_LEVEL", "info")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in extra {
        command.env(name, value);
    }
    let mut process = command.spawn().unwrap();
    let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["fields"]["message"] == "serving the API" {
                return event["fields"]["address"].as_str().unwrap().to_owned();
            }
        }
        panic!("the service exited before serving");
    })
    .await
    .expect("the service starts");
    // Keep reading, so the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (process, format!("http://{address}"))
}

/// SIGTERM, and the exit (which flushes reports and spans).
async fn stop(mut process: Child) {
    let pid = process.id().unwrap() as libc::pid_t;
    // SAFETY: kill(2) with a pid of a child this test spawned and waits on.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let exit = tokio::time::timeout(Duration::from_secs(30), process.wait())
        .await
        .expect("the service exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

async fn received_bodies(server: &MockServer, at: &str) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == at)
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

#[tokio::test]
async fn an_internal_error_is_reported_to_sentry_with_its_request_id_and_route_and_no_secrets() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let sentry = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/42/envelope/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({})))
        .mount(&sentry)
        .await;
    let dsn = format!("http://public@{}/42", sentry.address());
    let (process, base) = serve(&app, &[("SENTRY_DSN", &dsn)]).await;
    // A fault no request can cause: the table the alert settings live in
    // has gone.
    sqlx::query("DROP TABLE usage_alert_settings CASCADE")
        .execute(&app.db)
        .await
        .unwrap();

    let answer = app
        .http
        .put(format!("{base}/api/v1/customer/alerts"))
        .bearer_auth(&shop.token)
        .header("x-request-id", "req-sentry-0001")
        .json(&json!({"webhook_url": "http://127.0.0.1:9/hooks/body-marker-7f3a", "thresholds": [50]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 500);
    stop(process).await;

    let envelopes = received_bodies(&sentry, "/api/42/envelope/").await;
    let report = envelopes
        .iter()
        .find(|e| e.contains("internal error"))
        .unwrap_or_else(|| panic!("no error report among {envelopes:?}"));
    let event: Value = report
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|item| item.get("message").is_some())
        .unwrap_or_else(|| panic!("no event in {report}"));
    assert!(event.get("level").is_none_or(|l| l == "error"), "{event}");
    assert_eq!(event["tags"]["request_id"], "req-sentry-0001");
    assert_eq!(event["tags"]["route"], "/api/v1/customer/alerts");
    assert_eq!(event["tags"]["method"], "PUT");
    assert!(
        report.contains("usage_alert_settings"),
        "the cause is reported"
    );
    for secret in [shop.token.as_str(), "body-marker-7f3a"] {
        assert!(!report.contains(secret), "a report carries {secret}");
    }
}

#[tokio::test]
async fn a_request_continues_its_callers_trace_and_its_spans_are_exported_over_otlp() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let endpoint = format!("http://{}", collector.address());
    let (process, base) = serve(&app, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = app
        .http
        .post(format!("{base}/api/v1/customer/tokens/consume"))
        .bearer_auth(&shop.token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"app_id": "vto-001"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    stop(process).await;

    let exports: Vec<Vec<u8>> = collector
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == "/v1/traces")
        .map(|r| r.body)
        .collect();
    assert!(!exports.is_empty(), "no spans were exported");
    let spans = exports.concat();
    // OTLP's protobuf carries the trace id as its 16 raw bytes.
    let id_bytes: Vec<u8> = (0..trace_id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&trace_id[i..i + 2], 16).unwrap())
        .collect();
    assert!(
        spans.windows(16).any(|w| w == id_bytes.as_slice()),
        "the request's spans are not in its caller's trace"
    );
    let text = String::from_utf8_lossy(&spans);
    assert!(text.contains("POST /api/v1/customer/tokens/consume"));
    assert!(text.contains("consume script"));
    assert!(text.contains("connected-apps"), "the service is named");
}
