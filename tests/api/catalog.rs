//! The catalog: listing with filters and pages, and operators adding and
//! disabling apps.

use serde_json::{json, Value};

use crate::helpers::{detail_fields, spawn_app, spawn_app_with, TestApp};

async fn list(app: &TestApp, token: &str, query: &str) -> (u16, Value) {
    app.get_json(&format!("/api/v1/apps{query}"), token).await
}

fn ids(body: &Value) -> Vec<&str> {
    body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn the_catalog_lists_the_shipped_apps_by_name_without_beta_ones() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;

    let (status, body) = list(&app, &shop.token, "").await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["pagination"],
        json!({"page": 1, "per_page": 20, "total": 9, "total_pages": 1})
    );
    assert!(
        !ids(&body).contains(&"mirror-001"),
        "beta apps need ENABLE_BETA_APPS"
    );
    let names: Vec<&str> = body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let try_on = body["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "vto-001")
        .unwrap();
    assert_eq!(try_on["token_cost"], 5);
    assert_eq!(try_on["pricing_tier"], "professional");
    assert_eq!(
        try_on["configuration_schema"]["widget_placement"]["type"],
        "select"
    );
}

#[tokio::test]
async fn filters_search_and_pages_narrow_the_listing() {
    let app = spawn_app_with(&[("ENABLE_BETA_APPS", "true")]).await;
    let shop = app.create_customer(None).await;

    let (_, starter) = list(&app, &shop.token, "?pricing_tier=starter").await;
    assert!(ids(&starter).contains(&"rec-001"));
    assert!(starter["apps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["pricing_tier"] == "starter"));
    let (_, search) = list(&app, &shop.token, "?q=TRY-ON").await;
    assert!(ids(&search).contains(&"vto-001"), "case-insensitive");
    for found in search["apps"].as_array().unwrap() {
        let text = format!("{} {}", found["name"], found["description"]).to_lowercase();
        assert!(text.contains("try-on"), "name or description: {text}");
    }
    let (_, beta) = list(&app, &shop.token, "?status=beta").await;
    assert_eq!(ids(&beta), ["mirror-001"]);
    let (_, vision) = list(&app, &shop.token, "?category=ai_vision&per_page=100").await;
    assert!(vision["apps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["category"] == "ai_vision"));

    let (_, third) = list(&app, &shop.token, "?per_page=4&page=3").await;
    assert_eq!(
        third["pagination"],
        json!({"page": 3, "per_page": 4, "total": 10, "total_pages": 3})
    );
    assert_eq!(ids(&third).len(), 2);
    let (_, past_the_end) = list(&app, &shop.token, "?per_page=4&page=4").await;
    assert_eq!(ids(&past_the_end).len(), 0);
}

#[tokio::test]
async fn page_bounds_are_checked_and_reading_needs_apps_read() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    for (query, field) in [
        ("?per_page=0", "per_page"),
        ("?per_page=101", "per_page"),
        ("?page=0", "page"),
        ("?page=two", "page"),
    ] {
        let (status, body) = list(&app, &shop.token, query).await;
        assert_eq!(status, 422, "{query}");
        assert_eq!(body["error"]["details"][0]["field"], field);
    }
    let consume_only = app.token_for(shop.id, &["tokens:consume"]);
    let (status, _) = list(&app, &consume_only, "").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn an_operator_adds_an_app_that_merchants_then_see_and_activate() {
    let app = spawn_app().await;
    let admin = app.admin_token();
    let new_app = json!({
        "id": "tint-002", "name": "Lens Tint Preview", "description": "Shows lens tints on a selfie",
        "category": "ai_vision", "token_cost": 3, "pricing_tier": "starter",
        "configuration_schema": {"units": {"type": "select", "options": ["mm", "in"], "default": "mm"}},
        "features": ["Tint preview"]
    });

    let (status, created) = app
        .post_json("/api/v1/admin/apps", &admin, new_app.clone())
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["id"], "tint-002");
    let (status, again) = app.post_json("/api/v1/admin/apps", &admin, new_app).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (409, Some("conflict"))
    );

    let shop = app.customer_with_apps("starter", &["tint-002"]).await;
    let (status, body) = app
        .consume(&shop.token, json!({"app_id": "tint-002"}))
        .await;
    assert_eq!((status, body["tokens_consumed"].as_i64()), (200, Some(3)));
    let (_, listed) = list(&app, &shop.token, "?q=tint preview").await;
    assert_eq!(ids(&listed), ["tint-002"]);
}

#[tokio::test]
async fn a_malformed_app_is_422_per_field() {
    let app = spawn_app().await;
    let (status, body) = app
        .post_json(
            "/api/v1/admin/apps",
            &app.admin_token(),
            json!({"id": "Bad Id", "name": "", "category": "x", "token_cost": 0, "status": "gone",
                   "configuration_schema": {"size": {"type": "select"}, "colour": {"type": "colour"}}}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    let fields = detail_fields(&body);
    assert_eq!(
        fields,
        [
            "id",
            "name",
            "token_cost",
            "status",
            "configuration_schema.colour.type",
            "configuration_schema.size.options"
        ]
    );
}

#[tokio::test]
async fn a_disabled_app_is_refused_at_once_by_every_replica_and_leaves_the_listing() {
    let app = spawn_app().await;
    let replica = app.replica().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let consume_on_replica =
        || replica.consume(&app.http, &shop.token, json!({"app_id": "vto-001"}));
    assert_eq!(consume_on_replica().await.0, 200);

    let (status, _) = app
        .patch_json(
            "/api/v1/admin/apps/vto-001",
            &app.admin_token(),
            json!({"status": "disabled"}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body) = consume_on_replica().await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("app_not_active")),
        "{body}"
    );
    let (_, listed) = list(&app, &shop.token, "?per_page=100").await;
    assert!(!ids(&listed).contains(&"vto-001"));

    let (status, _) = app
        .patch_json(
            "/api/v1/admin/apps/vto-001",
            &app.admin_token(),
            json!({"status": "available"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(consume_on_replica().await.0, 200);
    app.drain_usage().await;
    assert_eq!(
        app.usage_rows(shop.id).await,
        (2, 10),
        "the refused consume charged nothing"
    );
}
