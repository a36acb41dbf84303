//! The operator bootstrap.

use serde_json::{json, Value};

use crate::helpers::{detail_fields, spawn_app, Customer, TestApp};

const CUSTOMERS: &str = "/api/v1/admin/customers";

#[tokio::test]
async fn an_operator_creates_a_customer_on_a_plan_who_can_consume_at_once() {
    let app = spawn_app().await;

    let (status, body) = app
        .post_json(
            CUSTOMERS,
            &app.admin_token(),
            json!({"name": "Clear Sight Optics", "email": "owner@clearsight.example", "plan_id": "starter"}),
        )
        .await;

    assert_eq!(status, 201);
    assert_eq!(body["plan_id"], "starter");
    let id: uuid::Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let shop = Customer {
        id,
        token: app.token_for(id, &["apps:activate", "tokens:consume"]),
    };
    app.activate(&shop, "rec-001").await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!(
        (status, body["tokens_remaining"].as_i64()),
        (200, Some(998))
    );
}

#[tokio::test]
async fn a_second_customer_with_the_same_email_is_a_409() {
    let app = spawn_app().await;
    let customer = json!({"name": "Shop", "email": "Same@Shop.example"});
    assert_eq!(
        app.post_json(CUSTOMERS, &app.admin_token(), customer.clone())
            .await
            .0,
        201
    );

    let (status, body) = app.post_json(CUSTOMERS, &app.admin_token(), customer).await;

    assert_eq!(status, 409);
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test]
async fn an_unknown_plan_is_a_404_and_creates_nothing() {
    let app = spawn_app().await;

    let (status, _) = app
        .post_json(
            CUSTOMERS,
            &app.admin_token(),
            json!({"name": "Shop", "email": "a@b.example", "plan_id": "platinum"}),
        )
        .await;

    assert_eq!(status, 404);
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM customers")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn admin_routes_need_the_admin_scope() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;

    let (status, body) = app
        .post_json(
            &format!("{CUSTOMERS}/{}/grants", shop.id),
            &shop.token,
            json!({"tokens": 1000, "reason": "self-service?"}),
        )
        .await;

    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "insufficient_scope");
}

#[tokio::test]
async fn a_grant_to_a_customer_without_a_plan_is_spendable_at_once() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.activate(&shop, "rec-001").await;
    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!((status, body["tokens_remaining"].as_i64()), (402, Some(0)));

    app.grant(shop.id, 3).await;

    let (status, body) = app.consume(&shop.token, json!({"app_id": "rec-001"})).await;
    assert_eq!((status, body["tokens_remaining"].as_i64()), (200, Some(1)));
}

#[tokio::test]
async fn invalid_customer_fields_are_422_with_details() {
    let app = spawn_app().await;

    let (status, body) = app
        .post_json(
            CUSTOMERS,
            &app.admin_token(),
            json!({"name": "", "email": "not-an-email"}),
        )
        .await;

    assert_eq!(status, 422);
    let fields = detail_fields(&body);
    assert_eq!(fields, ["name", "email"]);
}

#[tokio::test]
async fn the_openapi_document_and_probes_are_served() {
    let app = spawn_app().await;

    let spec = app.openapi().await;
    assert!(spec["paths"]["/api/v1/customer/tokens/consume"]["post"].is_object());
    // Every route is documented, the operational ones too.
    for path in ["/health/live", "/health/ready", "/metrics", "/openapi.json"] {
        assert!(
            spec["paths"][path]["get"].is_object(),
            "{path} undocumented"
        );
    }
    assert_eq!(
        app.http
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready: serde_json::Value = app
        .http
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["redis"], "ok");
    assert_eq!(ready["checks"]["postgres"], "ok");
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("http_requests_total"), "{metrics}");
}

/// Posts a grant with an `Idempotency-Key`; returns status, body and
/// whether it was answered as a replay.
async fn keyed_grant(app: &TestApp, shop: &Customer, key: &str, tokens: i64) -> (u16, Value, bool) {
    let response = app
        .http
        .post(app.url(&format!("{CUSTOMERS}/{}/grants", shop.id)))
        .bearer_auth(app.admin_token())
        .header("Idempotency-Key", key)
        .json(&json!({"tokens": tokens, "reason": "goodwill"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, response.json().await.unwrap(), replayed)
}

#[tokio::test]
async fn a_grant_retried_with_its_idempotency_key_credits_once() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.state.accounts.rebuild(shop.id).await.unwrap();

    let (first_status, first, first_replayed) = keyed_grant(&app, &shop, "grant-7", 40).await;
    let retries =
        futures::future::join_all((0..8).map(|_| keyed_grant(&app, &shop, "grant-7", 40))).await;

    assert_eq!((first_status, first_replayed), (201, false), "{first}");
    for (status, body, replayed) in retries {
        assert_eq!((status, replayed), (201, true), "{body}");
        assert_eq!(body["id"], first["id"], "the first grant, answered again");
    }
    assert_eq!(app.hot_balance(shop.id).await.map(|b| b.1), Some(40));
    let (grants, credited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM token_grants), purchased_tokens_credited FROM customers WHERE id = $1",
    )
    .bind(shop.id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((grants, credited), (1, 40));
}

#[tokio::test]
async fn a_grant_key_reused_with_another_body_is_a_409_crediting_nothing() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    app.state.accounts.rebuild(shop.id).await.unwrap();
    keyed_grant(&app, &shop, "grant-8", 40).await;

    let (status, body, _) = keyed_grant(&app, &shop, "grant-8", 400).await;

    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    assert_eq!(app.hot_balance(shop.id).await.map(|b| b.1), Some(40));
    let (_, other, replayed) = keyed_grant(&app, &shop, "grant-9", 400).await;
    assert!(!replayed, "another key is another grant: {other}");
    assert_eq!(app.hot_balance(shop.id).await.map(|b| b.1), Some(440));
}

#[tokio::test]
async fn the_healthcheck_command_answers_by_the_live_probe() {
    use connected_apps::http::health::probe;
    let app = spawn_app().await;
    let port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let wait = std::time::Duration::from_secs(2);

    assert!(probe(port, wait).await.is_ok());
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = closed.local_addr().unwrap().port();
    drop(closed);
    assert!(probe(nobody, wait).await.is_err());
}
