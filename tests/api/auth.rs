//! Who may consume: JWT negatives and embed-key scoping.

use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{spawn_app, JWT_SECRET};

fn sign(claims: serde_json::Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn claims(sub: Uuid) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    json!({"sub": sub.to_string(), "iss": "varai.com", "aud": "connected-apps",
           "iat": now, "exp": now + 600, "scope": ["tokens:consume"]})
}

#[tokio::test]
async fn a_well_formed_token_is_accepted() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;

    let (status, _) = app
        .consume(
            &sign(claims(shop.id), JWT_SECRET),
            json!({"app_id": "rec-001"}),
        )
        .await;

    assert_eq!(status, 200);
}

#[tokio::test]
async fn bad_tokens_are_401_and_charge_nothing() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let now = chrono::Utc::now().timestamp();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let with = |field: &str, value: serde_json::Value| {
        let mut c = claims(shop.id);
        c[field] = value;
        sign(c, JWT_SECRET)
    };
    let without = |field: &str| {
        let mut c = claims(shop.id);
        c.as_object_mut().unwrap().remove(field);
        sign(c, JWT_SECRET)
    };

    let cases = [
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(claims(shop.id))
            ),
        ),
        (
            "wrong key",
            sign(claims(shop.id), "another-secret-that-is-long-enough-000000"),
        ),
        ("wrong issuer", with("iss", json!("evil.example"))),
        ("wrong audience", with("aud", json!("another-service"))),
        ("expired", with("exp", json!(now - 120))),
        ("not yet valid", with("nbf", json!(now + 600))),
        ("no expiry", without("exp")),
        ("no subject", without("sub")),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (case, token) in cases {
        let (status, body) = app.consume(&token, json!({"app_id": "rec-001"})).await;
        assert_eq!(status, 401, "{case}");
        assert_eq!(body["error"]["code"], "invalid_token", "{case}");
    }
    assert_eq!(
        app.hot_balance(shop.id).await,
        None,
        "nothing was even loaded"
    );
}

#[tokio::test]
async fn a_missing_credential_is_401_unauthenticated() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(app.url("/api/v1/customer/tokens/consume"))
        .json(&json!({"app_id": "rec-001"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
}

#[tokio::test]
async fn a_token_without_the_consume_scope_is_403_insufficient_scope() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let token = app.token_for(shop.id, &["apps:read", "tokens:read"]);

    let (status, body) = app.consume(&token, json!({"app_id": "rec-001"})).await;

    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "insufficient_scope");
}

#[tokio::test]
async fn plan_and_balance_claims_in_a_token_are_ignored() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let mut c = claims(shop.id);
    c["plan"] = json!("enterprise");
    c["tokens_remaining"] = json!(1_000_000);

    let (status, body) = app
        .consume(
            &sign(c, JWT_SECRET),
            json!({"app_id": "rec-001", "tokens_consumed": 1001}),
        )
        .await;

    assert_eq!(status, 402);
    assert_eq!(body["tokens_remaining"], 1000);
}

#[tokio::test]
async fn an_embed_key_charges_its_own_customer_exactly_the_token_cost() {
    let app = spawn_app().await;
    let shop = app
        .customer_with_apps("professional", &["vto-001", "rec-001"])
        .await;
    let (_, key) = app
        .create_embed_key(&shop, json!({"app_permissions": ["vto-001"]}))
        .await;
    assert!(key.starts_with("ak_test_"));

    let (status, body) = app.consume(&key, json!({"app_id": "vto-001"})).await;
    assert_eq!((status, body["tokens_consumed"].as_i64()), (200, Some(5)));

    // As X-API-Key too.
    let response = app
        .http
        .post(app.url("/api/v1/customer/tokens/consume"))
        .header("X-API-Key", &key)
        .json(&json!({"app_id": "vto-001", "tokens_consumed": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let (status, body) = app
        .consume(&key, json!({"app_id": "vto-001", "tokens_consumed": 1}))
        .await;
    assert_eq!(status, 422, "a browser cannot choose the amount");
    assert_eq!(body["error"]["details"][0]["field"], "tokens_consumed");

    let (status, body) = app.consume(&key, json!({"app_id": "rec-001"})).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "app_not_permitted");

    assert_eq!(app.hot_balance(shop.id).await, Some((10, 0)));
}

#[tokio::test]
async fn an_embed_key_cannot_reach_the_other_endpoints() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (_, key) = app
        .create_embed_key(&shop, json!({"app_permissions": ["vto-001"]}))
        .await;

    let response = app
        .http
        .get(app.url("/api/v1/customer/api-keys"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_revoked_key_is_refused_at_once() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (key_id, key) = app
        .create_embed_key(&shop, json!({"app_permissions": ["vto-001"]}))
        .await;
    assert_eq!(app.consume(&key, json!({"app_id": "vto-001"})).await.0, 200);

    let path = format!("/api/v1/customer/api-keys/{key_id}");
    assert_eq!(app.delete_json(&path, &shop.token).await.0, 200);

    let (status, body) = app.consume(&key, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(app.hot_balance(shop.id).await, Some((5, 0)));

    // Still refused after the hot state is rebuilt from the ledger.
    app.wipe_redis().await;
    assert_eq!(app.consume(&key, json!({"app_id": "vto-001"})).await.0, 401);
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let expires = (chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339();
    let (_, key) = app
        .create_embed_key(
            &shop,
            json!({"app_permissions": ["vto-001"], "expires_at": expires}),
        )
        .await;
    assert_eq!(app.consume(&key, json!({"app_id": "vto-001"})).await.0, 200);

    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (status, body) = app.consume(&key, json!({"app_id": "vto-001"})).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn a_made_up_key_is_401_invalid_api_key() {
    let app = spawn_app().await;

    let (status, body) = app
        .consume(
            "ak_live_thisKeyWasNeverIssuedByTheService00000000000",
            json!({"app_id": "vto-001"}),
        )
        .await;

    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn a_browser_on_an_origin_the_key_does_not_allow_is_403() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (_, key) = app
        .create_embed_key(
            &shop,
            json!({"app_permissions": ["vto-001"], "allowed_origins": ["https://shop.example"]}),
        )
        .await;
    let from = |origin: &'static str| {
        app.http
            .post(app.url("/api/v1/customer/tokens/consume"))
            .header("X-API-Key", &key)
            .header("Origin", origin)
            .json(&json!({"app_id": "vto-001"}))
            .send()
    };

    assert_eq!(from("https://shop.example").await.unwrap().status(), 200);
    let refused = from("https://evil.example").await.unwrap();
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "origin_not_allowed");
    assert_eq!(app.hot_balance(shop.id).await, Some((5, 0)));
}

#[tokio::test]
async fn key_listings_never_show_the_secret() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (_, key) = app
        .create_embed_key(
            &shop,
            json!({"app_permissions": ["vto-001"], "name": "storefront"}),
        )
        .await;

    let listing = app
        .http
        .get(app.url("/api/v1/customer/api-keys"))
        .bearer_auth(&shop.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(!listing.contains(&key));
    assert!(listing.contains(&key[..12]));
    assert!(listing.contains("storefront"));
}
