//! A real instance per test: its own Postgres database and Redis key
//! prefix, served on a free port, dropped when the test ends.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use connected_apps::{
    config::{Roles, Settings},
    egress::{BoxFuture, Resolve},
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
/// KEYS is fine here). Errors are ignored: this is clean-up. In a cluster
/// each primary holds its own slots: every one is scanned, and keys are
/// deleted one by one (one DEL of keys in several slots is refused).
pub async fn delete_keys(redis: &Client, pattern: &str) {
    if redis.is_clustered() {
        use futures::StreamExt;
        let keys: Vec<Key> = redis
            .scan_cluster_buffered(pattern, Some(1000), None)
            .filter_map(|key| async move { key.ok() })
            .collect()
            .await;
        for key in keys {
            let _: Result<i64, _> = redis.del(key).await;
        }
        return;
    }
    let keys: Vec<String> = redis
        .custom(fred::cmd!("KEYS"), vec![pattern.to_owned()])
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis.del(keys).await;
    }
}

/// The names a test instance resolves (webhook URLs): no test asks DNS.
/// Every name is unknown until a test answers it, but `shop.example`,
/// which stands for a merchant's public server.
pub struct StubResolver {
    answers: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl StubResolver {
    fn new() -> Self {
        let answers = HashMap::from([("shop.example".to_owned(), vec![PUBLIC_ADDRESS])]);
        Self {
            answers: Mutex::new(answers),
        }
    }

    /// From now on `name` resolves to `addresses` (DNS changing its
    /// answer, or a record set for the first time).
    pub fn answer(&self, name: &str, addresses: &[&str]) {
        let addresses = addresses.iter().map(|a| a.parse().unwrap()).collect();
        self.answers
            .lock()
            .unwrap()
            .insert(name.to_owned(), addresses);
    }
}

/// A public address (example.com's): allowed, and never connected to.
pub const PUBLIC_ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(93, 184, 216, 34));

impl Resolve for StubResolver {
    fn lookup(&self, host: &str) -> BoxFuture<std::io::Result<Vec<IpAddr>>> {
        let answer = self.answers.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            answer.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such host (stub resolver)")
            })
        })
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
    /// What webhook URLs' names resolve to.
    pub resolver: Arc<StubResolver>,
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
        // Limits far above what any test sends, so only the rate-limit
        // tests, which set their own, meet one; the limiters still run.
        ("RATE_LIMIT_CONSUME_PER_HOUR", "1000000000".into()),
        ("RATE_LIMIT_CONSUME_BURST", "1000000".into()),
        ("RATE_LIMIT_APPS_PER_HOUR", "1000000".into()),
        ("RATE_LIMIT_ACTIVATE_PER_HOUR", "1000000".into()),
        ("RATE_LIMIT_BILLING_PER_HOUR", "1000000".into()),
        ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
        // No test reaches Stripe: one that needs it starts a stand-in;
        // the rest find nothing listening on loopback's discard port.
        ("STRIPE_API_BASE", "http://127.0.0.1:9/".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    Settings::from_map(&vars).expect("test settings are valid")
}

/// The webhook secret test instances verify Stripe's deliveries with.
pub const WEBHOOK_SECRET: &str = "whsec_test_0123456789";

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

    let resolver = Arc::new(StubResolver::new());
    let app = Application::build_with_resolver(settings.clone(), Roles::API_ONLY, resolver.clone())
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
        resolver,
        db_name,
        shutdown,
        server: Some(server),
    }
}

/// A second instance of the same deployment: same database, same Redis
/// keys, its own port and memory (catalog, caches). Stopped when dropped;
/// the database belongs to the first instance.
pub struct Replica {
    pub address: String,
    shutdown: CancellationToken,
}

impl Replica {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// Consumes through this replica with a bearer credential (a JWT or an
    /// embed key).
    pub async fn consume(
        &self,
        http: &reqwest::Client,
        credential: &str,
        body: Value,
    ) -> (u16, Value) {
        answer(
            http.post(self.url("/api/v1/customer/tokens/consume"))
                .bearer_auth(credential)
                .json(&body),
        )
        .await
    }
}

/// Sends a request; returns its status and JSON body (null when none).
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `field` of each entry of a 422 body's `details`, in order.
pub fn detail_fields(body: &Value) -> Vec<&str> {
    body["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect()
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Clone)]
pub struct Customer {
    pub id: Uuid,
    pub token: String,
}

impl TestApp {
    /// Starts another API process of this deployment.
    pub async fn replica(&self) -> Replica {
        let app = Application::build_with_resolver(
            self.settings.clone(),
            Roles::API_ONLY,
            self.resolver.clone(),
        )
        .await
        .expect("build the replica");
        let address = format!("http://127.0.0.1:{}", app.port());
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Replica { address, shutdown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// POSTs a JSON body with a bearer credential; returns status and body.
    pub async fn post_json(&self, path: &str, credential: &str, body: Value) -> (u16, Value) {
        answer(
            self.http
                .post(self.url(path))
                .bearer_auth(credential)
                .json(&body),
        )
        .await
    }

    /// PATCHes a JSON body with a bearer credential; returns status and body.
    pub async fn patch_json(&self, path: &str, credential: &str, body: Value) -> (u16, Value) {
        answer(
            self.http
                .patch(self.url(path))
                .bearer_auth(credential)
                .json(&body),
        )
        .await
    }

    /// GETs with a bearer credential; returns status and body.
    pub async fn get_json(&self, path: &str, credential: &str) -> (u16, Value) {
        answer(self.http.get(self.url(path)).bearer_auth(credential)).await
    }

    /// DELETEs with a bearer credential; returns status and body.
    pub async fn delete_json(&self, path: &str, credential: &str) -> (u16, Value) {
        answer(self.http.delete(self.url(path)).bearer_auth(credential)).await
    }

    /// The OpenAPI document the instance serves.
    pub async fn openapi(&self) -> Value {
        self.http
            .get(self.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
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

    /// Delivers a Stripe event, signed as Stripe signs it, now.
    pub async fn stripe_event(
        &self,
        id: &str,
        kind: &str,
        created: i64,
        object: Value,
    ) -> (u16, Value) {
        let body = json!({"id": id, "object": "event", "type": kind, "created": created,
                          "data": {"object": object}})
        .to_string();
        let signature = connected_apps::auth::stripe_signature::sign(
            &[WEBHOOK_SECRET],
            body.as_bytes(),
            chrono::Utc::now().timestamp(),
        );
        self.deliver_webhook(body, &signature).await
    }

    /// Posts a raw body with the given `Stripe-Signature`.
    pub async fn deliver_webhook(&self, body: String, signature: &str) -> (u16, Value) {
        answer(
            self.http
                .post(self.url("/api/v1/webhooks/stripe"))
                .header("Stripe-Signature", signature)
                .header("Content-Type", "application/json")
                .body(body),
        )
        .await
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

    /// Deletes only the customer's account hash, as an eviction, a restart
    /// without AOF or an operator's `DEL` would: its usage stream keeps the
    /// unflushed charges.
    pub async fn lose_account_hash(&self, customer: Uuid) {
        let _: i64 = self
            .redis
            .del(self.state.hot.keys().account(customer))
            .await
            .unwrap();
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

    /// A flusher under another consumer name, with `extra` settings.
    pub async fn flusher_named(&self, name: &str, claim_idle_ms: u64) -> Flusher {
        let mut settings = self.settings.flusher.clone();
        settings.consumer_name = name.to_owned();
        settings.claim_idle = Duration::from_millis(claim_idle_ms);
        Flusher::connect(&self.settings.redis, self.db.clone(), settings)
            .await
            .expect("flusher connects")
    }

    /// Charges `count` consumes of `app` through the API, spread over a few
    /// sessions and visitors with processing times, `parallel` at a time.
    /// Returns the event ids of those that were charged (200).
    pub async fn consume_many(
        &self,
        customer: &Customer,
        app: &str,
        count: usize,
        parallel: usize,
    ) -> HashSet<Uuid> {
        let mut charged = HashSet::new();
        let mut in_flight = tokio::task::JoinSet::new();
        for i in 0..count {
            if in_flight.len() >= parallel {
                charged.extend(in_flight.join_next().await.unwrap().unwrap());
            }
            let (http, url, token) = (
                self.http.clone(),
                self.url("/api/v1/customer/tokens/consume"),
                customer.token.clone(),
            );
            let body = json!({
                "app_id": app,
                "session_id": format!("sess-{}", i % 7),
                "metadata": {
                    "visitor_id": format!("visitor-{}", i % 5),
                    "processing_time_ms": 100.0 + (i % 13) as f64 * 10.5,
                },
            });
            in_flight.spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                if response.status() != 200 {
                    return None;
                }
                let body: Value = response.json().await.ok()?;
                body["event_id"].as_str()?.parse::<Uuid>().ok()
            });
        }
        while let Some(done) = in_flight.join_next().await {
            charged.extend(done.unwrap());
        }
        charged
    }

    /// The ledger after any recovery: its rows are exactly the charged
    /// events, once each, and every daily aggregate and balance equals the
    /// sums over the rows.
    pub async fn assert_ledger_exact(&self, charged: &HashSet<Uuid>) {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM token_usage")
            .fetch_all(&self.db)
            .await
            .unwrap();
        let distinct: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(ids.len(), distinct.len(), "no event has two rows");
        assert_eq!(
            &distinct, charged,
            "the rows are exactly the charged events"
        );

        let aggregate_mismatches: Vec<(String,)> = sqlx::query_as(
            r#"
            WITH rows AS (
                SELECT customer_id, app_id, (created_at AT TIME ZONE 'UTC')::date AS date,
                       SUM(tokens_consumed)::int8 AS tokens, COUNT(*)::int8 AS events,
                       COUNT(DISTINCT session_id)::int8 AS sessions,
                       COUNT(DISTINCT COALESCE('v:' || NULLIF(metadata->>'visitor_id', ''),
                           CASE WHEN ip_address IS NOT NULL OR user_agent IS NOT NULL
                                THEN 'a:' || COALESCE(host(ip_address), '') || '|' || COALESCE(user_agent, '') END))::int8 AS visitors,
                       ROUND(AVG(ROUND((metadata->>'processing_time_ms')::numeric * 1000)) / 1000, 2) AS avg_ms
                FROM token_usage GROUP BY 1, 2, 3
            )
            SELECT format('%s/%s/%s: rows %s, aggregate %s', r.customer_id, r.app_id, r.date, row(r.tokens, r.events, r.sessions, r.visitors, r.avg_ms),
                          row(d.tokens_consumed, d.events_count, d.sessions_count, d.unique_users, d.avg_processing_time_ms))
            FROM rows r FULL JOIN usage_analytics_daily d
                 ON d.customer_id = r.customer_id AND d.app_id = r.app_id AND d.date = r.date
            WHERE row(r.tokens, r.events, r.sessions, r.visitors, r.avg_ms)
                  IS DISTINCT FROM row(d.tokens_consumed, d.events_count, d.sessions_count, d.unique_users, d.avg_processing_time_ms)
            "#,
        )
        .fetch_all(&self.db)
        .await
        .unwrap();
        assert!(
            aggregate_mismatches.is_empty(),
            "aggregates differ from the rows: {aggregate_mismatches:?}"
        );

        let balance_mismatches: Vec<(Uuid,)> = sqlx::query_as(
            r#"
            SELECT c.id FROM customers c LEFT JOIN customer_billing b ON b.customer_id = c.id
            WHERE c.purchased_tokens_used IS DISTINCT FROM
                  (SELECT COALESCE(SUM(purchased_tokens_consumed), 0) FROM token_usage u WHERE u.customer_id = c.id)
               OR (b.customer_id IS NOT NULL AND b.tokens_used IS DISTINCT FROM
                  (SELECT COALESCE(SUM(tokens_consumed - purchased_tokens_consumed), 0) FROM token_usage u
                   WHERE u.customer_id = c.id AND u.created_at >= b.billing_cycle_start AND u.created_at < b.billing_cycle_end)::int8)
            "#,
        )
        .fetch_all(&self.db)
        .await
        .unwrap();
        assert!(
            balance_mismatches.is_empty(),
            "balances differ from the rows: {balance_mismatches:?}"
        );
    }

    /// Entries delivered to a flusher and not yet acknowledged, all shards.
    pub async fn pending_entries(&self) -> u64 {
        let mut pending = 0;
        for stream in self.state.hot.keys().usage_streams() {
            let summary: fred::types::Value = self
                .redis
                .xpending(stream, connected_apps::workers::flusher::GROUP, ())
                .await
                .unwrap_or(fred::types::Value::Null);
            if let fred::types::Value::Array(v) = summary {
                pending += v.first().and_then(|c| c.as_u64()).unwrap_or(0);
            }
        }
        pending
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
        // The aborted server never reaches its own quit: close its Redis
        // connections and the test's, or a process that spawns thousands of
        // instances (the billing simulation) runs out of Redis clients.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (state, redis) = (self.state.clone(), self.redis.clone());
            runtime.spawn(async move {
                state.hot.quit().await;
                state.limiter.quit().await;
                let _ = redis.quit().await;
            });
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
