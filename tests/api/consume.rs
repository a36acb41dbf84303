//! The consume endpoint's contract.

use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn consume_charges_the_apps_token_cost_and_reports_the_balance() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let response = app
        .post_consume(
            &shop.token,
            json!({"app_id": "vto-001", "tokens_consumed": 5, "session_id": "sess-abc123",
                   "metadata": {"user_agent": "Mozilla/5.0", "ip_address": "192.168.1.1",
                                "product_id": "frame-001", "processing_time_ms": 1250}}),
        )
        .await;

    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["app_id"], "vto-001");
    assert_eq!(body["tokens_consumed"], 5);
    assert_eq!(body["tokens_remaining"], 9995);
    let event_id: uuid::Uuid = body["event_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(event_id.get_version_num(), 7);
}

#[tokio::test]
async fn tokens_consumed_defaults_to_the_apps_token_cost() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;

    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;

    assert_eq!(status, 200);
    assert_eq!(body["tokens_consumed"], 2);
    assert_eq!(body["tokens_remaining"], 998);
}

#[tokio::test]
async fn consume_returns_402_when_the_balance_is_short_and_charges_nothing() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let (status, _) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 997}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 4}),
        )
        .await;

    assert_eq!(status, 402);
    assert_eq!(body["error"]["code"], "insufficient_tokens");
    assert_eq!(body["tokens_remaining"], 3);
    assert_eq!(app.hot_balance(shop.id).await, Some((997, 0)));
    let (status, body) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 3}),
        )
        .await;
    assert_eq!((status, body["tokens_remaining"].as_i64()), (200, Some(0)));
}

#[tokio::test]
async fn purchased_tokens_are_drawn_after_the_periods_allowance() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 50).await;

    let (status, body) = app
        .consume(
            &shop.token,
            json!({"app_id": "rec-001", "tokens_consumed": 1020}),
        )
        .await;

    assert_eq!(status, 200);
    assert_eq!(body["tokens_remaining"], 30);
    assert_eq!(app.hot_balance(shop.id).await, Some((1000, 30)));
}

#[tokio::test]
async fn an_unlimited_plan_is_metered_but_never_refused() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("enterprise", &["vto-001"]).await;

    let (status, body) = app
        .consume(
            &shop.token,
            json!({"app_id": "vto-001", "tokens_consumed": 5_000_000}),
        )
        .await;

    assert_eq!(status, 200);
    assert_eq!(body["tokens_remaining"], -1);
    assert_eq!(app.hot_balance(shop.id).await, Some((5_000_000, 0)));
}

#[tokio::test]
async fn an_app_that_is_not_activated_is_a_403_app_not_active() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;

    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "app_not_active");
}

#[tokio::test]
async fn a_deactivated_app_stops_consuming_at_once() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    assert_eq!(
        app.consume(&shop.token, json!({"app_id": "vto-001"}))
            .await
            .0,
        200
    );

    let response = app
        .http
        .post(app.url("/api/v1/customer/apps/vto-001/deactivate"))
        .bearer_auth(&shop.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let (status, body) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "app_not_active");
}

#[tokio::test]
async fn an_unknown_app_is_a_404() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let (status, body) = app
        .consume(&shop.token, json!({"app_id": "nope-999"}))
        .await;

    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
}

#[tokio::test]
async fn a_canceled_subscription_is_a_402_subscription_inactive() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    sqlx::query("UPDATE customer_billing SET status = 'canceled' WHERE customer_id = $1")
        .bind(shop.id)
        .execute(&app.db)
        .await
        .unwrap();
    app.wipe_redis().await;

    let (status, body) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;

    assert_eq!(status, 402);
    assert_eq!(body["error"]["code"], "subscription_inactive");
}

#[tokio::test]
async fn past_due_consumes_within_the_grace_period_and_not_after() {
    let app = spawn_app().await;
    let recent = app.customer_with_apps("professional", &["vto-001"]).await;
    let lapsed = app.customer_with_apps("professional", &["vto-001"]).await;
    for (customer, since) in [(recent.id, "1 hour"), (lapsed.id, "73 hours")] {
        sqlx::query(&format!(
            "UPDATE customer_billing SET status = 'past_due', past_due_since = NOW() - INTERVAL '{since}' WHERE customer_id = $1"
        ))
        .bind(customer)
        .execute(&app.db)
        .await
        .unwrap();
    }
    app.wipe_redis().await;

    assert_eq!(
        app.consume(&recent.token, json!({"app_id": "vto-001"}))
            .await
            .0,
        200
    );
    let (status, body) = app
        .consume(&lapsed.token, json!({"app_id": "vto-001"}))
        .await;
    assert_eq!(status, 402);
    assert_eq!(body["error"]["code"], "subscription_inactive");
}

#[tokio::test]
async fn a_customer_that_does_not_exist_is_a_404_and_nothing_is_loaded() {
    let app = spawn_app().await;
    let ghost = uuid::Uuid::now_v7();
    let token = app.token_for(ghost, &["tokens:consume"]);

    let (status, body) = app.consume(&token, json!({"app_id": "vto-001"})).await;

    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(app.hot_balance(ghost).await, None);
}

#[tokio::test]
async fn an_idempotent_retry_replays_the_first_answer_and_charges_once() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let send = || {
        app.http
            .post(app.url("/api/v1/customer/tokens/consume"))
            .bearer_auth(&shop.token)
            .header("Idempotency-Key", "order-42")
            .json(&json!({"app_id": "rec-001"}))
            .send()
    };

    let first = send().await.unwrap();
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: serde_json::Value = first.json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: serde_json::Value = second.json().await.unwrap();

    assert_eq!(first, second);
    assert_eq!(app.hot_balance(shop.id).await, Some((2, 0)));
}

#[tokio::test]
async fn an_idempotency_key_reused_with_another_body_is_a_409() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let send = |tokens: i64| {
        app.http
            .post(app.url("/api/v1/customer/tokens/consume"))
            .bearer_auth(&shop.token)
            .header("Idempotency-Key", "order-43")
            .json(&json!({"app_id": "rec-001", "tokens_consumed": tokens}))
            .send()
    };
    assert_eq!(send(2).await.unwrap().status(), 200);

    let response = send(3).await.unwrap();

    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(app.hot_balance(shop.id).await, Some((2, 0)));
}

#[tokio::test]
async fn redis_that_does_not_answer_gives_a_503_within_the_deadline() {
    // A server that accepts connections and never answers: Redis hung.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let app = crate::helpers::spawn_app_with(&[
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}")),
        ("REDIS_TIMEOUT_MS", "200"),
    ])
    .await;
    let token = app.token_for(uuid::Uuid::now_v7(), &["tokens:consume"]);

    let started = std::time::Instant::now();
    let (status, body) = app.consume(&token, json!({"app_id": "vto-001"})).await;

    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "unavailable");
    // A generous bound, to catch a hang rather than to time the service.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_in_the_contract_shape() {
    let app = spawn_app().await;

    let missing = app
        .http
        .get(app.url("/api/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    let wrong = app
        .http
        .get(app.url("/api/v1/customer/tokens/consume"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 405);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}
