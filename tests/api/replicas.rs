//! Two API processes of one deployment: what one changes, the other's very
//! next consume obeys, whatever it holds in memory; and a rolling restart
//! of both under load loses nothing a client retries.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::helpers::{spawn_app, Replica, TestApp};

/// A consume of vto-001 through `replica`, with a JWT or an embed key.
async fn consume_on(app: &TestApp, replica: &Replica, credential: &str) -> (u16, Value) {
    replica
        .consume(&app.http, credential, json!({"app_id": "vto-001"}))
        .await
}

#[tokio::test]
async fn a_key_revoked_on_one_process_is_refused_by_the_other_at_once() {
    let app = spawn_app().await;
    let replica = app.replica().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let (key_id, key) = app
        .create_embed_key(&shop, json!({"app_permissions": ["vto-001"]}))
        .await;
    // The replica has seen the key and holds it in its cache.
    assert_eq!(consume_on(&app, &replica, &key).await.0, 200);

    let path = format!("/api/v1/customer/api-keys/{key_id}");
    assert_eq!(app.delete_json(&path, &shop.token).await.0, 200);

    let (status, body) = consume_on(&app, &replica, &key).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(app.hot_balance(shop.id).await, Some((5, 0)), "charged once");
}

#[tokio::test]
async fn consumes_racing_a_deactivation_are_each_charged_once_or_refused() {
    let app = spawn_app().await;
    let replica = app.replica().await;
    let shop = app.customer_with_apps("enterprise", &["vto-001"]).await;
    let token = shop.token.clone();

    // Consumes on the replica while the first process deactivates the app.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let racing = {
        let answered = answered.clone();
        let (http, url, token) = (
            app.http.clone(),
            replica.url("/api/v1/customer/tokens/consume"),
            token.clone(),
        );
        tokio::spawn(async move {
            let mut charged = HashSet::new();
            let mut refused = 0;
            let mut in_flight = tokio::task::JoinSet::new();
            for _ in 0..1000 {
                let (http, url, token) = (http.clone(), url.clone(), token.clone());
                in_flight.spawn(async move {
                    let response = http
                        .post(url)
                        .bearer_auth(token)
                        .json(&json!({"app_id": "vto-001"}))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap();
                    (status, body)
                });
                if in_flight.len() >= 16 {
                    let (status, body) = in_flight.join_next().await.unwrap().unwrap();
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match status {
                        200 => {
                            charged.insert(body["event_id"].as_str().unwrap().parse().unwrap());
                        }
                        403 => refused += 1,
                        other => panic!("unexpected {other}: {body}"),
                    }
                }
            }
            while let Some(done) = in_flight.join_next().await {
                let (status, body) = done.unwrap();
                match status {
                    200 => {
                        charged.insert(body["event_id"].as_str().unwrap().parse().unwrap());
                    }
                    403 => refused += 1,
                    other => panic!("unexpected {other}: {body}"),
                }
            }
            (charged, refused)
        })
    };
    // Deactivate once some have been charged and most are still to come.
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let (status, _) = app
        .post_json(
            "/api/v1/customer/apps/vto-001/deactivate",
            &token,
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    // From the moment the deactivation has answered, every consume is refused.
    let (status, body) = consume_on(&app, &replica, &token).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("app_not_active"))
    );

    let (charged, refused): (HashSet<uuid::Uuid>, usize) = racing.await.unwrap();
    assert_eq!(charged.len() + refused, 1000);
    assert!(
        !charged.is_empty() && refused > 0,
        "the deactivation landed mid-way"
    );
    app.drain_usage().await;
    app.assert_ledger_exact(&charged).await;
}

#[tokio::test]
async fn configuration_values_cannot_break_out_of_the_embed_code() {
    let app = spawn_app().await;
    let shop = app.create_customer(Some("professional")).await;
    for attack in [
        r#""><script>alert(1)</script>"#,
        "' onload='alert(1)",
        "</script><img src=x onerror=alert(1)>",
        "&quot; data-x=&quot;",
    ] {
        let (status, body) = app
            .post_json(
                "/api/v1/customer/apps/vto-001/activate",
                &shop.token,
                json!({"configuration": {"style_customization": {"button_text": attack, "button_color": attack}}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let code = body["embed_code"].as_str().unwrap();
        assert_eq!(code.matches("<script").count(), 1, "{code}");
        assert_eq!(code.matches("</script>").count(), 1, "{code}");
        assert_eq!(
            code.matches('"').count(),
            8,
            "only the attribute delimiters: {code}"
        );
        assert!(!code.contains('\'') && !code.contains("<img"), "{code}");
        assert_eq!(
            body["configuration"]["style_customization"]["button_text"], attack,
            "the value itself is kept as given"
        );
    }
}

/// A well-behaved client: each consume under its own Idempotency-Key,
/// sent to whichever process is listed, and sent again (same key, same
/// body) on a refused connection or a 503 until it is answered.
async fn consume_until_answered(
    http: &reqwest::Client,
    processes: &std::sync::RwLock<Vec<String>>,
    token: &str,
    key: &str,
) -> (u16, Value) {
    for attempt in 0.. {
        let address = {
            let listed = processes.read().unwrap();
            listed[attempt % listed.len()].clone()
        };
        let sent = http
            .post(format!("{address}/api/v1/customer/tokens/consume"))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&json!({"app_id": "vto-001", "session_id": key}))
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status().as_u16();
            if status != 503 {
                return (status, response.json().await.unwrap_or(Value::Null));
            }
        }
        assert!(attempt < 500, "{key} was never answered");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_loses_no_consume_a_client_retries() {
    let app = spawn_app().await;
    let shop = app.customer_with_apps("professional", &["vto-001"]).await;
    let mut first = Some(app.replica().await);
    let mut second = Some(app.replica().await);
    let processes = std::sync::RwLock::new(vec![
        first.as_ref().unwrap().address.clone(),
        second.as_ref().unwrap().address.clone(),
    ]);

    let clients = (0..6).map(|client| {
        let (http, processes, token) = (&app.http, &processes, &shop.token);
        async move {
            let mut answers = Vec::new();
            for i in 0..60 {
                let key = format!("order-{client}-{i}");
                answers.push(consume_until_answered(http, processes, token, &key).await);
            }
            answers
        }
    });
    // Each process in turn is stopped (its requests in flight finish),
    // started again on a new port, and listed in its place.
    let restarts = async {
        for (place, process) in [(0, &mut first), (1, &mut second)] {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            drop(process.take());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let restarted = app.replica().await;
            processes.write().unwrap()[place] = restarted.address.clone();
            *process = Some(restarted);
        }
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(clients), restarts);

    let answers: Vec<(u16, Value)> = answers.into_iter().flatten().collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "every consume answered 200"
    );
    let charged: HashSet<uuid::Uuid> = answers
        .iter()
        .map(|(_, body)| body["event_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(charged.len(), 360, "one charge per key");
    app.drain_usage().await;
    app.assert_ledger_exact(&charged).await;
    assert_eq!(app.usage_rows(shop.id).await.0, 360);
}
