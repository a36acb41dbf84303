//! Every metric a scenario should move moves. The recorder is one per
//! process and tests run side by side, so counters are compared before and
//! after (they only grow), and the business figures are read from the
//! queries that feed the gauges, for this test's own database.

use serde_json::json;

use crate::{
    helpers::{spawn_app, spawn_app_with, TestApp},
    stripe_semantics::with_standin,
};

/// The value of `name` with every label in `labels`, summed over the
/// series that have them; 0 when none.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

async fn read(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(&app.metrics_text().await, name, labels)
}

#[tokio::test]
async fn a_charge_moves_its_apps_tokens_its_outcome_and_the_script_timing() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("starter", &["rec-001"]).await;
    let tokens = read(&app, "tokens_consumed_total", &[("app_id", "rec-001")]).await;
    let charged = read(&app, "consume_requests_total", &[("outcome", "charged")]).await;
    let timed = read(
        &app,
        "redis_script_duration_seconds_count",
        &[("script", "consume")],
    )
    .await;

    for _ in 0..3 {
        assert_eq!(
            app.consume(&shop.token, json!({"app_id": "rec-001"}))
                .await
                .0,
            200
        );
    }

    assert!(read(&app, "tokens_consumed_total", &[("app_id", "rec-001")]).await >= tokens + 6.0);
    assert!(read(&app, "consume_requests_total", &[("outcome", "charged")]).await >= charged + 3.0);
    assert!(
        read(
            &app,
            "redis_script_duration_seconds_count",
            &[("script", "consume")]
        )
        .await
            >= timed + 3.0
    );
}

#[tokio::test]
async fn activations_count_their_outcome_and_the_first_charge_its_delay() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("starter")).await;
    let app = &app;
    let before = |outcome: &'static str| async move {
        read(app, "activations_total", &[("outcome", outcome)]).await
    };
    let (activated, refused, invalid) = (
        before("activated").await,
        before("refused").await,
        before("invalid").await,
    );
    let firsts = read(app, "time_to_first_consume_seconds_count", &[]).await;

    app.activate(&shop, "rec-001").await;
    let upgrade = app
        .post_json(
            "/api/v1/customer/apps/vto-001/activate",
            &shop.token,
            json!({}),
        )
        .await;
    let bad = app
        .post_json(
            "/api/v1/customer/apps/rec-001/activate",
            &shop.token,
            json!({"configuration": {"placement": "nowhere"}}),
        )
        .await;
    assert_eq!((upgrade.0, bad.0), (403, 422));
    assert_eq!(
        app.consume(&shop.token, json!({"app_id": "rec-001"}))
            .await
            .0,
        200
    );
    app.drain_usage().await;

    assert!(before("activated").await > activated);
    assert!(before("refused").await > refused);
    assert!(before("invalid").await > invalid);
    assert!(read(app, "time_to_first_consume_seconds_count", &[]).await > firsts);
    let first: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT first_used_at FROM customer_apps WHERE customer_id = $1")
            .bind(shop.id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert!(first.is_some(), "the first charge is marked, once");
}

#[tokio::test]
async fn webhooks_count_each_event_by_type_and_outcome_and_refused_signatures_apart() {
    let app = spawn_app().await;
    let shop = app.create_customer(None).await;
    let labels = [("type", "payment_intent.succeeded"), ("outcome", "applied")];
    let applied = read(&app, "stripe_webhook_events_total", &labels).await;
    let unverified = [("type", "unverified"), ("outcome", "invalid")];
    let refused = read(&app, "stripe_webhook_events_total", &unverified).await;

    let (status, _) = app
        .stripe_event(
            "evt_metric",
            "payment_intent.succeeded",
            chrono::Utc::now().timestamp(),
            json!({"id": "pi_metric", "object": "payment_intent", "amount": 100, "amount_received": 100,
                   "status": "succeeded", "metadata": {"customer_id": shop.id.to_string(), "tokens": "50"}}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = app.deliver_webhook("{}".into(), "t=1,v1=00").await;
    assert_eq!(status, 401);

    assert!(read(&app, "stripe_webhook_events_total", &labels).await > applied);
    assert!(read(&app, "stripe_webhook_events_total", &unverified).await > refused);
}

#[tokio::test]
async fn stripe_calls_count_by_operation_and_outcome() {
    let (app, _stripe) = with_standin().await;
    let shop = app.create_customer(None).await;
    let created = [("operation", "create_customer"), ("outcome", "ok")];
    let declined = [("operation", "subscribe"), ("outcome", "refused")];
    let (c0, d0) = (
        read(&app, "billing_sync_total", &created).await,
        read(&app, "billing_sync_total", &declined).await,
    );

    let body = json!({"plan_id": "starter", "payment_method_id": "pm_card_chargeDeclined"});
    let (status, _) = app
        .post_json("/api/v1/customer/billing/subscribe", &shop.token, body)
        .await;

    assert_eq!(status, 422);
    assert!(read(&app, "billing_sync_total", &created).await > c0);
    assert!(read(&app, "billing_sync_total", &declined).await > d0);
}

#[tokio::test]
async fn the_business_gauges_are_read_from_the_ledger() {
    use connected_apps::ledger::reports;
    let app = spawn_app_with(&[("ROLES", "api")]).await;
    let starter = app.customer_with_apps("starter", &["rec-001"]).await;
    app.customer_with_apps("professional", &["rec-001", "vto-001"])
        .await;
    assert_eq!(
        app.consume(
            &starter.token,
            json!({"app_id": "rec-001", "tokens_consumed": 850})
        )
        .await
        .0,
        200
    );
    app.drain_usage().await;
    let mut conn = app.db.acquire().await.unwrap();

    assert_eq!(reports::mrr_cents(&mut conn).await.unwrap(), 2900 + 19900);
    let by_plan = reports::active_customers_by_plan(&mut conn).await.unwrap();
    assert!(
        by_plan.contains(&("starter".into(), 1)) && by_plan.contains(&("enterprise".into(), 0))
    );
    let by_app = reports::activations_by_app(&mut conn).await.unwrap();
    assert!(by_app.contains(&("rec-001".into(), "active".into(), 2)));
    assert!(by_app.contains(&("vto-001".into(), "paused".into(), 0)));
    let ratios = reports::period_usage_ratios(&mut conn, &[0.1, 0.5, 0.9, 1.0])
        .await
        .unwrap();
    assert!(
        ratios.contains(&(0.9, 1)),
        "the starter at 85 %: {ratios:?}"
    );
    assert!(
        ratios.contains(&(0.1, 1)),
        "the professional at 0 %: {ratios:?}"
    );

    let scheduler = connected_apps::workers::scheduler::Scheduler::new(
        app.db.clone(),
        app.state.hot.clone(),
        app.state.subscriptions.clone(),
        3,
        400,
        Default::default(),
    );
    assert!(scheduler.refresh_gauges().await.unwrap());
    let text = app.metrics_text().await;
    for name in [
        "billing_mrr_cents",
        "customers_active",
        "app_activations",
        "period_usage_ratio_bucket",
    ] {
        assert!(text.contains(name), "{name} is exported");
    }
}

/// Every counter the code increments, read from the sources.
fn counters_in_the_code() -> Vec<String> {
    let mut names = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let code = std::fs::read_to_string(&path).unwrap();
                for (at, _) in code.match_indices("counter!(") {
                    let rest = code[at + "counter!(".len()..].trim_start();
                    if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                        names.push(name.to_owned());
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn every_counter_is_exported_from_the_start_for_its_known_labels() {
    // Their labels are open (a route, an app): they appear when counted.
    const OPEN: [&str; 2] = ["http_requests_total", "tokens_consumed_total"];
    let app = spawn_app().await;

    let text = app.metrics_text().await;

    let names = counters_in_the_code();
    assert!(names.len() > 20, "{names:?}");
    for name in names.iter().filter(|n| !OPEN.contains(&n.as_str())) {
        let exported = text
            .lines()
            .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
        assert!(exported, "{name} is not exported until first counted");
    }
    for operation in connected_apps::stripe::OPERATIONS {
        for outcome in ["ok", "refused", "error"] {
            let series =
                format!(r#"billing_sync_total{{operation="{operation}",outcome="{outcome}"}}"#);
            assert!(text.contains(&series), "{series}");
        }
    }
    for outcome in ["delivered", "retried", "failed"] {
        assert!(text.contains(&format!(
            r#"usage_alert_deliveries_total{{outcome="{outcome}"}}"#
        )));
    }
}
