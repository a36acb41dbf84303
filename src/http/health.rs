//! Probes and metrics: `/health/live`, `/health/ready`, `/metrics`.

use std::time::Duration;

use axum::{extract::State, http::StatusCode, response::IntoResponse, Json};
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::state::Shared;

pub fn router() -> OpenApiRouter<Shared> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics_text))
}

/// The process is up and serving.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "The process serves requests (it may still be waiting on Redis or Postgres)", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub async fn live() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Redis and Postgres both answer within a second.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses((status = 200, description = "Redis and Postgres both answered within a second", body = serde_json::Value,
                example = json!({"status": "ok", "checks": {"redis": "ok", "postgres": "ok"}})),
              (status = 503, description = "One of them did not: take the instance out of the load balancer", body = serde_json::Value,
                example = json!({"status": "unavailable", "checks": {"redis": "ok", "postgres": "unavailable"}}))))]
pub async fn ready(State(state): State<Shared>) -> impl IntoResponse {
    let deadline = Duration::from_secs(1);
    let redis = matches!(
        tokio::time::timeout(deadline, state.hot.ping()).await,
        Ok(Ok(()))
    );
    let postgres = matches!(
        tokio::time::timeout(deadline, sqlx::query("SELECT 1").execute(&state.db)).await,
        Ok(Ok(_))
    );
    let status = if redis && postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(json!({
            "status": word(redis && postgres),
            "checks": {"redis": word(redis), "postgres": word(postgres)}
        })),
    )
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Every metric of the process in Prometheus's text format (see the README's Operating section)", content_type = "text/plain; version=0.0.4", body = String)))]
pub async fn metrics_text(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

/// Asks the service on this machine's `port` whether it is live: a plain
/// HTTP/1.1 `GET /health/live` over loopback, so a container needs no curl
/// for its health check (`connected-apps healthcheck`).
pub async fn probe(port: u16, deadline: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        anyhow::Ok(answer)
    };
    let answer = tokio::time::timeout(deadline, ask)
        .await
        .map_err(|_| anyhow::anyhow!("no answer on port {port} within {deadline:?}"))??;
    let status_line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    if status_line.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "GET /health/live on port {port}: {}",
            String::from_utf8_lossy(status_line).trim()
        )
    }
}
