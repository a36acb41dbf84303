//! The operator bootstrap.

use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test]
async fn an_operator_creates_a_customer_on_a_plan_who_can_consume_at_once() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(app.url("/api/v1/admin/customers"))
        .bearer_auth(app.admin_token())
        .json(&json!({"name": "Clear Sight Optics", "email": "owner@clearsight.example", "plan_id": "starter"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["plan_id"], "starter");
    let id: uuid::Uuid = body["id"].as_str().unwrap().parse().unwrap();
    let token = app.token_for(id, &["apps:activate", "tokens:consume"]);
    let shop = crate::helpers::Customer { id, token };
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
    let create = || {
        app.http
            .post(app.url("/api/v1/admin/customers"))
            .bearer_auth(app.admin_token())
            .json(&json!({"name": "Shop", "email": "Same@Shop.example"}))
            .send()
    };
    assert_eq!(create().await.unwrap().status(), 201);

    let response = create().await.unwrap();

    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "conflict");
}

#[tokio::test]
async fn an_unknown_plan_is_a_404_and_creates_nothing() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(app.url("/api/v1/admin/customers"))
        .bearer_auth(app.admin_token())
        .json(&json!({"name": "Shop", "email": "a@b.example", "plan_id": "platinum"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 404);
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

    let response = app
        .http
        .post(app.url(&format!("/api/v1/admin/customers/{}/grants", shop.id)))
        .bearer_auth(&shop.token)
        .json(&json!({"tokens": 1000, "reason": "self-service?"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
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

    let response = app
        .http
        .post(app.url("/api/v1/admin/customers"))
        .bearer_auth(app.admin_token())
        .json(&json!({"name": "", "email": "not-an-email"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    let fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["name", "email"]);
}

#[tokio::test]
async fn the_openapi_document_and_probes_are_served() {
    let app = spawn_app().await;

    let spec: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/api/v1/customer/tokens/consume"]["post"].is_object());
    assert_eq!(
        app.http
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ready: Value = app
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
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("http_requests_total"), "{metrics}");
}
