//! `GET /api/v1/customer/tokens/usage`: the live period from Redis, the
//! rest from the daily aggregates.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::helpers::{spawn_app, TestApp};

async fn usage(app: &TestApp, token: &str, query: &str) -> (u16, Value) {
    app.get_json(&format!("/api/v1/customer/tokens/usage{query}"), token)
        .await
}

#[tokio::test]
async fn the_report_shows_the_live_period_and_usage_per_app_and_day() {
    let app = spawn_app().await;
    let shop = app
        .customer_with_apps("professional", &["vto-001", "rec-001"])
        .await;
    // vto-001 costs 5, rec-001 costs 2; sessions s1 and s2 on vto, s3 on rec.
    for (app_id, session) in [
        ("vto-001", "s1"),
        ("vto-001", "s1"),
        ("vto-001", "s2"),
        ("rec-001", "s3"),
    ] {
        let (status, body) = app
            .consume(
                &shop.token,
                json!({"app_id": app_id, "session_id": session}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    app.drain_usage().await;

    let (status, report) = usage(&app, &shop.token, "").await;

    assert_eq!(status, 200, "{report}");
    let (start, end): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT billing_cycle_start, billing_cycle_end FROM customer_billing WHERE customer_id = $1",
        )
        .bind(shop.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let period = &report["current_period"];
    assert_eq!(period["tokens_used"], 17);
    assert_eq!(period["tokens_remaining"], 10_000 - 17);
    assert_eq!(period["tokens_total"], 10_000);
    assert_eq!(
        period["start_date"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        start
    );
    assert_eq!(
        period["end_date"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        end - chrono::Duration::seconds(1),
        "the period's last second"
    );
    assert_eq!(
        report["usage_by_app"],
        json!([
            {"app_id": "rec-001", "app_name": "Eyewear Recommendations", "tokens_consumed": 2,
             "sessions": 1, "avg_tokens_per_session": 2.0},
            {"app_id": "vto-001", "app_name": "Virtual Try-On", "tokens_consumed": 15,
             "sessions": 2, "avg_tokens_per_session": 7.5},
        ])
    );
    let days = report["daily_usage"].as_array().unwrap();
    let expected_days =
        ((end - chrono::Duration::milliseconds(1)).date_naive() - start.date_naive()).num_days()
            + 1;
    assert_eq!(days.len() as i64, expected_days, "every day of the period");
    let today = chrono::Utc::now().date_naive().to_string();
    let total: i64 = days.iter().map(|d| d["tokens"].as_i64().unwrap()).sum();
    assert_eq!(total, 17);
    assert!(days
        .iter()
        .any(|d| d["date"] == today.as_str() && d["tokens"] == 17));
    assert!(
        days.iter().all(|d| d.get("apps").is_none()),
        "without breakdown=app the body is the specification's"
    );

    // For a chart stacked by app, each day also by app, summing to the day.
    let (status, by_app) = usage(&app, &shop.token, "?breakdown=app").await;
    assert_eq!(status, 200, "{by_app}");
    for day in by_app["daily_usage"].as_array().unwrap() {
        let apps = day["apps"].as_object().expect("every day has its apps");
        let sum: i64 = apps.values().map(|t| t.as_i64().unwrap()).sum();
        assert_eq!(day["tokens"].as_i64().unwrap(), sum, "{day}");
        if day["date"] == today.as_str() {
            assert_eq!(day["apps"], json!({"rec-001": 2, "vto-001": 15}));
        }
    }
}

#[tokio::test]
async fn the_period_is_live_while_the_aggregates_catch_up() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.consume(&shop.token, json!({"app_id": "rec-001"})).await;

    let (status, report) = usage(&app, &shop.token, "").await;

    assert_eq!(status, 200);
    assert_eq!(
        report["current_period"]["tokens_used"], 2,
        "from Redis, at once"
    );
    assert_eq!(report["usage_by_app"], json!([]), "not yet flushed");
}

#[tokio::test]
async fn purchased_tokens_count_in_the_total_and_unlimited_plans_say_minus_one() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    app.grant(shop.id, 50).await;
    let unlimited = app.customer_with_apps("enterprise", &["rec-001"]).await;
    app.consume(&unlimited.token, json!({"app_id": "rec-001"}))
        .await;

    let (_, report) = usage(&app, &shop.token, "").await;
    let (_, unlimited_report) = usage(&app, &unlimited.token, "").await;

    assert_eq!(
        report["current_period"],
        json!({"start_date": report["current_period"]["start_date"],
               "end_date": report["current_period"]["end_date"],
               "tokens_used": 0, "tokens_remaining": 1050, "tokens_total": 1050})
    );
    assert_eq!(unlimited_report["current_period"]["tokens_used"], 2);
    assert_eq!(unlimited_report["current_period"]["tokens_remaining"], -1);
    assert_eq!(unlimited_report["current_period"]["tokens_total"], -1);
}

#[tokio::test]
async fn a_year_of_daily_rows_is_summed_over_the_asked_range() {
    let app = spawn_app().await;
    let shop = app
        .customer_with_apps("professional", &["vto-001", "rec-001"])
        .await;
    // A year of aggregates for two apps: 10 tokens and 2 sessions a day each.
    sqlx::query(
        "INSERT INTO usage_analytics_daily (customer_id, app_id, date, tokens_consumed, events_count, sessions_count) \
         SELECT $1, a.id, d::date, 10, 2, 2 FROM apps a, generate_series('2025-01-01'::date, '2025-12-31'::date, '1 day') d \
         WHERE a.slug IN ('vto-001', 'rec-001')",
    )
    .bind(shop.id)
    .execute(&app.db)
    .await
    .unwrap();

    let (status, year) = usage(&app, &shop.token, "?from=2025-01-01&to=2025-12-31").await;
    let (_, march) = usage(&app, &shop.token, "?from=2025-03-01&to=2025-03-31").await;

    assert_eq!(status, 200);
    assert_eq!(year["daily_usage"].as_array().unwrap().len(), 365);
    assert_eq!(
        year["daily_usage"][0],
        json!({"date": "2025-01-01", "tokens": 20})
    );
    for app_usage in year["usage_by_app"].as_array().unwrap() {
        assert_eq!(app_usage["tokens_consumed"], 3650);
        assert_eq!(app_usage["sessions"], 730);
        assert_eq!(app_usage["avg_tokens_per_session"], 5.0);
    }
    assert_eq!(march["daily_usage"].as_array().unwrap().len(), 31);
    assert_eq!(march["usage_by_app"][0]["tokens_consumed"], 310);
}

#[tokio::test]
async fn a_bad_range_is_422_naming_the_field() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("starter")).await;

    for (query, field) in [
        ("?from=yesterday", "from"),
        ("?to=2025-02-30", "to"),
        ("?from=2025-03-01&to=2025-02-01", "from"),
        ("?from=2024-01-01&to=2025-01-02", "to"),
        ("?breakdown=session", "breakdown"),
    ] {
        let (status, body) = usage(&app, &shop.token, query).await;
        assert_eq!(status, 422, "{query}: {body}");
        assert_eq!(body["error"]["code"], "validation_failed");
        assert_eq!(body["error"]["details"][0]["field"], field, "{query}");
    }
}

#[tokio::test]
async fn reading_usage_needs_the_tokens_read_scope_and_an_existing_customer() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("starter")).await;
    let consume_only = app.token_for(shop.id, &["tokens:consume"]);
    let stranger = app.token_for(Uuid::new_v4(), &["tokens:read"]);

    let (status, body) = usage(&app, &consume_only, "").await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "insufficient_scope");
    let (status, _) = usage(&app, &stranger, "").await;
    assert_eq!(status, 404);
}
