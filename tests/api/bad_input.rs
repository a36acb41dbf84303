//! Bad input gets a clear error in the contract's shape and charges nothing.

use serde_json::{json, Value};

use crate::helpers::{detail_fields, spawn_app, TestApp};

async fn send_raw(app: &TestApp, token: &str, body: Vec<u8>) -> (u16, Value) {
    let response = app
        .http
        .post(app.url("/api/v1/customer/tokens/consume"))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_kind_of_bad_body_is_refused_in_the_contract_shape_and_charges_nothing() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    // Load the hot state, so "charges nothing" is checked against a live balance.
    assert_eq!(
        app.consume(&shop.token, json!({"app_id": "vto-001"}))
            .await
            .0,
        200
    );

    let huge = format!(
        r#"{{"app_id":"vto-001","session_id":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "truncated JSON",
            br#"{"app_id": "vto-001""#.to_vec(),
            400,
            "invalid_json",
        ),
        ("not JSON", b"app_id=vto-001".to_vec(), 400, "invalid_json"),
        (
            "trailing garbage",
            br#"{"app_id": "vto-001"} x"#.to_vec(),
            400,
            "invalid_json",
        ),
        ("empty body", Vec::new(), 400, "invalid_json"),
        ("over 64 KiB", huge.into_bytes(), 413, "payload_too_large"),
        ("a JSON array", b"[1, 2]".to_vec(), 422, "validation_failed"),
        (
            "tokens as a string",
            br#"{"app_id": "vto-001", "tokens_consumed": "5"}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "fractional tokens",
            br#"{"app_id": "vto-001", "tokens_consumed": 5.5}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "zero tokens",
            br#"{"app_id": "vto-001", "tokens_consumed": 0}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "negative tokens",
            br#"{"app_id": "vto-001", "tokens_consumed": -5}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "tokens past i32",
            br#"{"app_id": "vto-001", "tokens_consumed": 4294967296}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "tokens past i64",
            br#"{"app_id": "vto-001", "tokens_consumed": 99999999999999999999}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "no app",
            br#"{"tokens_consumed": 5}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "app as a number",
            br#"{"app_id": 7}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "long session id",
            format!(
                r#"{{"app_id": "vto-001", "session_id": "{}"}}"#,
                "s".repeat(101)
            )
            .into_bytes(),
            422,
            "validation_failed",
        ),
        (
            "metadata not an object",
            br#"{"app_id": "vto-001", "metadata": "x"}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "metadata over 4 KiB",
            format!(
                r#"{{"app_id": "vto-001", "metadata": {{"x": "{}"}}}}"#,
                "m".repeat(4200)
            )
            .into_bytes(),
            422,
            "validation_failed",
        ),
        (
            "bad ip address",
            br#"{"app_id": "vto-001", "metadata": {"ip_address": "999.1.1.1"}}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "NUL in metadata",
            br#"{"app_id": "vto-001", "metadata": {"note": "a\u0000b"}}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "lone high surrogate in metadata",
            br#"{"app_id": "vto-001", "metadata": {"note": "a\ud800b"}}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "lone low surrogate in metadata",
            br#"{"app_id": "vto-001", "metadata": {"note": "\uDC00"}}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "unknown field",
            br#"{"app_id": "vto-001", "tokens": 5}"#.to_vec(),
            422,
            "validation_failed",
        ),
        (
            "unknown app",
            br#"{"app_id": "nope-001"}"#.to_vec(),
            404,
            "not_found",
        ),
    ];
    for (case, body, status, code) in cases {
        let (got, response) = send_raw(&app, &shop.token, body).await;
        assert_eq!(got, status, "{case}: {response}");
        assert_eq!(response["error"]["code"], code, "{case}");
        assert!(response["error"]["message"].is_string(), "{case}");
        if status == 422 {
            assert!(
                response["error"]["details"]
                    .as_array()
                    .is_some_and(|d| !d.is_empty()),
                "{case}"
            );
        }
    }
    assert_eq!(
        app.hot_balance(shop.id).await,
        Some((5, 0)),
        "only the first consume was charged"
    );
}

#[tokio::test]
async fn a_422_lists_one_detail_per_invalid_field() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let (status, body) = app
        .consume(
            &shop.token,
            json!({"app_id": "vto-001", "tokens_consumed": 0, "session_id": "", "metadata": {"processing_time_ms": -1}}),
        )
        .await;

    assert_eq!(status, 422);
    let fields = detail_fields(&body);
    assert_eq!(
        fields,
        [
            "tokens_consumed",
            "session_id",
            "metadata.processing_time_ms"
        ]
    );
}

#[tokio::test]
async fn an_overlong_idempotency_key_is_a_400() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let response = app
        .http
        .post(app.url("/api/v1/customer/tokens/consume"))
        .bearer_auth(&shop.token)
        .header("Idempotency-Key", "k".repeat(256))
        .json(&json!({"app_id": "vto-001"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_nul_character_is_refused_by_field_across_the_api_and_writes_nothing() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("professional")).await;
    let admin = app.admin_token();
    let cases = [
        (
            "/api/v1/admin/customers",
            admin.as_str(),
            json!({"name": "Optics\u{0}", "email": "nul@shop.example"}),
            "name",
        ),
        (
            "/api/v1/customer/api-keys",
            shop.token.as_str(),
            json!({"name": "k\u{0}", "app_permissions": ["vto-001"],
                   "allowed_origins": ["https://shop.example"]}),
            "name",
        ),
        (
            "/api/v1/customer/api-keys",
            shop.token.as_str(),
            json!({"app_permissions": ["vto-001"], "allowed_origins": ["https://a.example\u{0}"]}),
            "allowed_origins[0]",
        ),
        (
            "/api/v1/customer/apps/vto-001/activate",
            shop.token.as_str(),
            json!({"configuration": {"style_customization": {"button_text": "Try\u{0}"}}}),
            "configuration.style_customization.button_text",
        ),
        (
            "/api/v1/customer/billing/subscribe",
            shop.token.as_str(),
            json!({"plan_id": "starter\u{0}", "payment_method_id": "pm_card_visa"}),
            "plan_id",
        ),
    ];
    for (path, credential, body, field) in cases {
        let (status, response) = app.post_json(path, credential, body).await;
        assert_eq!(status, 422, "{path}: {response}");
        assert_eq!(detail_fields(&response), [field], "{path}");
    }

    // In a path or a query, where no body names it.
    let (status, response) = app
        .post_json(
            "/api/v1/customer/apps/vto%00/activate",
            &shop.token,
            json!({}),
        )
        .await;
    assert!([400, 404].contains(&status), "{status}: {response}");
    let (status, response) = app
        .patch_json(
            "/api/v1/admin/apps/vto%00",
            &admin,
            json!({"status": "disabled"}),
        )
        .await;
    assert!([400, 404].contains(&status), "{status}: {response}");
    let (status, response) = app.get_json("/api/v1/apps?q=frame%00", &shop.token).await;
    assert_eq!(status, 200, "a search for it finds nothing: {response}");
    assert_eq!(response["apps"], json!([]));

    let written: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM customers), (SELECT COUNT(*) FROM embed_api_keys), \
                (SELECT COUNT(*) FROM customer_apps)",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(written, (1, 0, 0));
}

#[tokio::test]
async fn an_array_where_an_object_belongs_is_refused_not_read_as_every_field_absent() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let before = app.get_json("/api/v1/customer/alerts", &shop.token).await.1;

    // Serde fills a struct from an array positionally: `[null, null]` would
    // be a change of nothing, answered 200.
    for (method, path) in [
        ("PATCH", "/api/v1/customer/apps/vto-001"),
        ("PUT", "/api/v1/customer/alerts"),
        ("POST", "/api/v1/customer/api-keys"),
        ("POST", "/api/v1/customer/tokens/consume"),
    ] {
        let response = app
            .http
            .request(method.parse().unwrap(), app.url(path))
            .bearer_auth(&shop.token)
            .header("Content-Type", "application/json")
            .body("[null, null]")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "validation_failed",
            "{method} {path}"
        );
        assert_eq!(detail_fields(&body), ["body"], "{method} {path}");
    }
    assert_eq!(
        app.get_json("/api/v1/customer/alerts", &shop.token).await.1,
        before
    );
    let (_, keys) = app.get_json("/api/v1/customer/api-keys", &shop.token).await;
    assert_eq!(keys["api_keys"].as_array().map(Vec::len), Some(0), "{keys}");
}
