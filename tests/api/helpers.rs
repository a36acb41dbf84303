//! A real instance per test: its own Postgres database and Redis key
//! prefix, served on a free port, dropped when the test ends.

use std::{collections::HashMap, sync::Arc, time::Duration};

use connected_apps::{
    config::{Roles, Settings},
    startup::Application,
    state::AppState,
    workers::flusher::Flusher,
};
use fred::prelude::*;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn postgres_server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Deletes every key matching `pattern` (test keyspaces are small, so
/// KEYS is fine here). Errors are ignored: this is clean-up.
pub async fn delete_keys(redis: &Client, pattern: &str) {
    let keys: Vec<String> = redis
        .custom(fred::cmd!("KEYS"), vec![pattern.to_owned()])
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis.del(keys).await;
    }
}

pub const JWT_SECRET: &str = "test-secret-for-the-suite-0123456789abcdef";

pub struct TestApp {
    pub address: String,
    pub http: reqwest::Client,
    pub db: PgPool,
    pub state: Arc<AppState>,
    pub settings: Settings,
    pub redis: Client,
    pub prefix: String,
    db_name: String,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Variables every test instance gets; `extra` overrides them.
fn settings_for(db_name: &str, prefix: &str, extra: &[(&str, &str)]) -> Settings {
    let server = postgres_server_url();
    let base = server
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or(server);
    let mut vars: HashMap<String, String> = [
        ("DATABASE_URL", format!("{base}/{db_name}")),
        ("REDIS_URL", redis_url()),
        ("REDIS_KEY_PREFIX", prefix.to_owned()),
        ("USAGE_STREAM_SHARDS", "4".into()),
        ("JWT_SECRET", JWT_SECRET.into()),
        ("BIND_ADDRESS", "127.0.0.1".into()),
        ("PORT", "0".into()),
        ("DATABASE_MAX_CONNECTIONS", "10".into()),
        ("FLUSHER_CONSUMER", "test-flusher".into()),
        ("LOG_LEVEL", "warn".into()),
        // Tests run many instances at once on a debug build; a slow answer
        // is not what they test (the deadline test sets its own).
        ("REDIS_TIMEOUT_MS", "3000".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    Settings::from_map(&vars).expect("test settings are valid")
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Spawns the API role with extra environment variables.
pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let id = Uuid::new_v4().simple().to_string();
    let db_name = format!("test_{id}");
    let prefix = format!("t{}", &id[..12]);
    let settings = settings_for(&db_name, &prefix, extra);
    connected_apps::ledger::create_database_if_missing(settings.database.url.expose())
        .await
        .expect("create test database");

    let app = Application::build(settings.clone(), Roles::API_ONLY)
        .await
        .expect("build the app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let redis = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    redis.init().await.expect("redis for the test");
    TestApp {
        address,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
        db: state.db.clone(),
        state,
        settings,
        redis,
        prefix,
        db_name,
        shutdown,
        server: Some(server),
    }
}

pub struct Customer {
    pub id: Uuid,
    pub token: String,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// POSTs a JSON body with a bearer credential; returns status and body.
    pub async fn post_json(&self, path: &str, credential: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(credential)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn admin_token(&self) -> String {
        self.state
            .jwt
            .mint(Uuid::now_v7(), &["admin"], Duration::from_secs(600))
    }

    pub fn token_for(&self, customer: Uuid, scopes: &[&str]) -> String {
        self.state
            .jwt
            .mint(customer, scopes, Duration::from_secs(600))
    }

    /// Creates a customer through the operator API, optionally on a plan.
    pub async fn create_customer(&self, plan: Option<&str>) -> Customer {
        let mut body =
            json!({"name": "Eyewear Shop", "email": format!("{}@shop.example", Uuid::new_v4())});
        if let Some(plan) = plan {
            body["plan_id"] = json!(plan);
        }
        let (status, created) = self
            .post_json("/api/v1/admin/customers", &self.admin_token(), body)
            .await;
        assert_eq!(status, 201, "{created}");
        let id: Uuid = created["id"].as_str().unwrap().parse().unwrap();
        let token = self.token_for(
            id,
            &[
                "apps:read",
                "apps:activate",
                "tokens:consume",
                "tokens:read",
                "billing:manage",
            ],
        );
        Customer { id, token }
    }

    /// A customer on `plan` with `apps` activated.
    pub async fn customer_with_apps(&self, plan: &str, apps: &[&str]) -> Customer {
        let customer = self.create_customer(Some(plan)).await;
        for app in apps {
            self.activate(&customer, app).await;
        }
        customer
    }

    pub async fn activate(&self, customer: &Customer, app: &str) {
        let path = format!("/api/v1/customer/apps/{app}/activate");
        let (status, body) = self.post_json(&path, &customer.token, json!({})).await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn grant(&self, customer: Uuid, tokens: i64) {
        let path = format!("/api/v1/admin/customers/{customer}/grants");
        let body = json!({"tokens": tokens, "reason": "test credit"});
        let (status, body) = self.post_json(&path, &self.admin_token(), body).await;
        assert_eq!(status, 201, "{body}");
    }

    pub async fn post_consume(&self, credential: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/customer/tokens/consume"))
            .bearer_auth(credential)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Consumes and returns status and body.
    pub async fn consume(&self, credential: &str, body: Value) -> (u16, Value) {
        self.post_json("/api/v1/customer/tokens/consume", credential, body)
            .await
    }

    pub async fn create_embed_key(&self, customer: &Customer, body: Value) -> (Uuid, String) {
        let (status, created) = self
            .post_json("/api/v1/customer/api-keys", &customer.token, body)
            .await;
        assert_eq!(status, 201, "{created}");
        (
            created["id"].as_str().unwrap().parse().unwrap(),
            created["key"].as_str().unwrap().to_owned(),
        )
    }

    /// The live balance as the hot store holds it: (allowance used, purchased left).
    pub async fn hot_balance(&self, customer: Uuid) -> Option<(i64, i64)> {
        let key = self.state.hot.keys().account(customer);
        let fields: Vec<Option<i64>> = self
            .redis
            .hmget(key, vec!["used", "purchased"])
            .await
            .unwrap();
        Some((fields[0]?, fields[1]?))
    }

    /// Deletes every Redis key of this instance, as a Redis restart without
    /// persistence would.
    pub async fn wipe_redis(&self) {
        delete_keys(&self.redis, &self.state.hot.keys().pattern()).await;
    }

    pub async fn flusher(&self) -> Flusher {
        Flusher::connect(
            &self.settings.redis,
            self.db.clone(),
            self.settings.flusher.clone(),
        )
        .await
        .expect("flusher connects")
    }

    /// Persists every usage event in the streams.
    pub async fn drain_usage(&self) -> usize {
        let mut flusher = self.flusher().await;
        let mut total = 0;
        loop {
            let n = flusher.step().await.expect("flush step");
            if n == 0 {
                return total;
            }
            total += n;
        }
    }

    pub async fn usage_rows(&self, customer: Uuid) -> (i64, i64) {
        sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(tokens_consumed), 0)::BIGINT FROM token_usage WHERE customer_id = $1")
            .bind(customer)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        let db_name = self.db_name.clone();
        let pattern = format!("{}:*", self.prefix);
        // Drop is synchronous; clean up on a thread with its own runtime and
        // wait for it, so no test leaves a database or keys behind.
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&postgres_server_url()).await {
                    let _ = sqlx::query(&format!(
                        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
                    ))
                    .execute(&mut conn)
                    .await;
                }
                let redis = Builder::from_config(Config::from_url(&redis_url()).unwrap())
                    .build()
                    .unwrap();
                if redis.init().await.is_ok() {
                    delete_keys(&redis, &pattern).await;
                    let _ = redis.quit().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}
