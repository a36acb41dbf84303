//! Activation: configuration checked against the app's schema, and pausing,
//! resuming and reconfiguring through PATCH.

use serde_json::{json, Value};

use crate::helpers::{detail_fields, spawn_app, spawn_app_with, Customer, TestApp};

async fn patch(app: &TestApp, shop: &Customer, slug: &str, body: Value) -> (u16, Value) {
    app.patch_json(&format!("/api/v1/customer/apps/{slug}"), &shop.token, body)
        .await
}

#[tokio::test]
async fn an_activation_takes_the_schema_defaults_for_what_it_leaves_out() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("professional")).await;

    let (status, body) = app
        .post_json(
            "/api/v1/customer/apps/vto-001/activate",
            &shop.token,
            json!({"configuration": {"style_customization": {"button_text": "Try It On"}}}),
        )
        .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["configuration"]["widget_placement"], "product_page");
    assert_eq!(
        body["configuration"]["style_customization"],
        json!({"button_color": "#007bff", "button_text": "Try It On"})
    );
}

#[tokio::test]
async fn an_activation_without_a_body_or_with_null_takes_every_default() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("professional")).await;

    for (slug, body) in [("vto-001", ""), ("rec-001", "null")] {
        let response = app
            .http
            .post(app.url(&format!("/api/v1/customer/apps/{slug}/activate")))
            .bearer_auth(&shop.token)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{slug} with {body:?}");
        let activation: Value = response.json().await.unwrap();
        assert_eq!(activation["app"]["status"], "active");
    }
}

#[tokio::test]
async fn a_configuration_that_does_not_fit_the_schema_is_422_per_field_and_activates_nothing() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("professional")).await;

    let (status, body) = app
        .post_json(
            "/api/v1/customer/apps/vto-001/activate",
            &shop.token,
            json!({"configuration": {"widget_placement": "footer", "colour": "red",
                                     "style_customization": {"button_color": 7}}}),
        )
        .await;

    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "validation_failed");
    let fields = detail_fields(&body);
    assert_eq!(
        fields,
        [
            "configuration.colour",
            "configuration.style_customization.button_color",
            "configuration.widget_placement"
        ]
    );
    let (_, consumed) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(consumed["error"]["code"], "app_not_active");
}

#[tokio::test]
async fn pausing_refuses_the_next_consume_and_resuming_accepts_it_again() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let (status, paused) = patch(&app, &shop, "vto-001", json!({"status": "paused"})).await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["app"]["status"], "paused");
    let (status, refused) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("app_not_active"))
    );

    let (status, resumed) = patch(&app, &shop, "vto-001", json!({"status": "active"})).await;
    assert_eq!(status, 200, "{resumed}");
    let (status, _) = app.consume(&shop.token, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 200);

    // Only the refused request was not charged.
    app.drain_usage().await;
    assert_eq!(app.usage_rows(shop.id).await, (1, 5));
}

#[tokio::test]
async fn reconfiguring_validates_and_regenerates_the_embed_code() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;

    let (status, body) = patch(
        &app,
        &shop,
        "vto-001",
        json!({"configuration": {"widget_placement": "cart_page"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["configuration"]["widget_placement"], "cart_page");
    assert_eq!(
        body["app"]["status"], "active",
        "the status is left as it was"
    );
    assert!(body["embed_code"].as_str().unwrap().contains("cart_page"));

    let (status, body) = patch(
        &app,
        &shop,
        "vto-001",
        json!({"configuration": {"widget_placement": "footer"}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = patch(&app, &shop, "vto-001", json!({"status": "deleted"})).await;
    assert_eq!(status, 422, "{body}");
}

#[tokio::test]
async fn only_an_active_or_paused_activation_can_be_patched() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (status, _) = app
        .post_json(
            "/api/v1/customer/apps/vto-001/deactivate",
            &shop.token,
            json!({}),
        )
        .await;
    assert_eq!(status, 200);

    let (status, body) = patch(&app, &shop, "vto-001", json!({"status": "active"})).await;
    assert_eq!(
        status, 404,
        "deactivated: activate it again instead ({body})"
    );
    let (status, _) = patch(&app, &shop, "rec-001", json!({"status": "paused"})).await;
    assert_eq!(status, 404, "never activated");
    let (status, _) = patch(&app, &shop, "no-such-app", json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_beta_app_hidden_from_the_catalog_cannot_be_activated_either() {
    let hidden = spawn_app().await;
    let shop = hidden.create_customer(Some("enterprise")).await;

    let (status, body) = hidden
        .post_json(
            "/api/v1/customer/apps/mirror-001/activate",
            &shop.token,
            json!({}),
        )
        .await;

    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (_, listed) = hidden.get_json("/api/v1/customer/apps", &shop.token).await;
    assert_eq!(listed["apps"], json!([]), "nothing was activated");

    let offered = spawn_app_with(&[("ENABLE_BETA_APPS", "true")]).await;
    let shop = offered.create_customer(Some("enterprise")).await;
    let (status, body) = offered
        .post_json(
            "/api/v1/customer/apps/mirror-001/activate",
            &shop.token,
            json!({}),
        )
        .await;
    assert_eq!(
        status, 200,
        "with ENABLE_BETA_APPS the beta app activates: {body}"
    );
}
