//! Building and running the service.
//!
//! [`Application::build`] connects, migrates if asked, and binds the
//! listener (port 0 gives a free port, which tests use);
//! [`Application::run_until_stopped`] serves every configured role until
//! the shutdown token is cancelled. Shutdown is ordered: the HTTP server
//! stops accepting and finishes in-flight requests, then the workers are
//! told to stop and the flusher commits its batch in flight.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{EmbedKeys, JwtKeys},
    config::{Roles, Settings},
    domain::{
        accounts::Accounts, alerts::UsageAlerts, catalog::Catalog, consume::Metering,
        stripe_events::StripeEvents, subscriptions::Subscriptions,
    },
    egress::{AddressPolicy, Egress, Resolve, SystemResolver},
    hot::{rate_limit::RateLimiter, HotStore},
    ledger,
    ledger::sealed::Sealer,
    state::AppState,
    stripe::Stripe,
    telemetry,
    workers::{alerts::AlertDeliveries, flusher::Flusher, scheduler::Scheduler},
};

/// How often the API role re-reads the catalog, re-measures Redis's clock,
/// reads the process's memory and CPU, and runs the metrics upkeep.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

pub struct Application {
    state: Arc<AppState>,
    roles: Roles,
    listener: TcpListener,
    port: u16,
}

impl Application {
    pub async fn build(settings: Settings, roles: Roles) -> anyhow::Result<Self> {
        Self::build_with_resolver(settings, roles, Arc::new(SystemResolver)).await
    }

    /// As [`Self::build`], resolving webhooks' names with `resolver` (tests
    /// give a stub, to name addresses without DNS).
    pub async fn build_with_resolver(
        settings: Settings,
        roles: Roles,
        resolver: Arc<dyn Resolve>,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        // First, so every metric handle registered below records.
        let metrics = telemetry::metrics_handle();
        if settings.uses_dev_defaults {
            tracing::warn!("running with development defaults (local Redis and Postgres; the development secrets, if used, serve loopback only); APP_ENV=production forbids them");
        }
        if settings.database.migrate_on_start {
            ledger::create_database_if_missing(settings.database.url.expose()).await?;
        }
        let db = ledger::pool(&settings.database)?;
        if settings.database.migrate_on_start {
            ledger::migrate(&db, settings.database.partitions_ahead_months).await?;
        }
        let hot = HotStore::connect(&settings.redis).await?;
        let catalog = Arc::new(Catalog::load(&db).await?);
        let accounts = Arc::new(Accounts::new(
            hot.clone(),
            db.clone(),
            settings.consume.grace_period,
            settings.redis.rebuild_max_backlog,
            settings.enable_usage_alerts,
            settings.consume.billing_period,
        ));
        let metering = Metering::new(
            hot.clone(),
            catalog.clone(),
            accounts.clone(),
            settings.consume.idempotency_ttl.as_secs(),
            settings.rate_limits.consume,
        );
        let limiter = RateLimiter::connect(
            settings.rate_limits.redis_url.expose(),
            &settings.redis.key_prefix,
            settings.redis.timeout,
        )?;
        let sealer = Arc::new(Sealer::from_ring(settings.data_encryption_keys.expose())?);
        let stripe = Arc::new(Stripe::new(&settings.stripe)?);
        let stripe_events = StripeEvents::new(
            stripe.clone(),
            accounts.clone(),
            sealer.clone(),
            hot.clone(),
            db.clone(),
            settings.consume.grace_period,
        );
        let subscriptions = Arc::new(Subscriptions::new(
            stripe,
            accounts.clone(),
            sealer.clone(),
            hot.clone(),
            db.clone(),
            settings.consume.grace_period,
            settings.stripe.cents_per_1000_tokens,
        ));
        let egress = Arc::new(Egress::new(
            AddressPolicy {
                allow_loopback: !settings.production,
                allow: settings.webhooks.allow_cidrs.clone(),
            },
            resolver,
        ));
        let alerts = UsageAlerts::new(
            accounts.clone(),
            sealer.clone(),
            db.clone(),
            egress.clone(),
            settings.webhooks.secret_overlap,
        );
        let state = Arc::new(AppState {
            jwt: JwtKeys::new(&settings.auth),
            embed_keys: EmbedKeys::default(),
            settings: settings.clone(),
            db,
            hot,
            catalog,
            accounts,
            metering,
            limiter,
            stripe_events,
            subscriptions,
            alerts,
            egress,
            sealer,
            metrics,
        });
        // Every process listens: without the API role it still answers
        // the probes and `/metrics` (a flusher exports the backlog there).
        let listener = TcpListener::bind(settings.bind).await?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            state,
            roles,
            listener,
            port,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let state = self.state;
        let workers_stop = CancellationToken::new();
        let mut workers = JoinSet::new();

        let flusher = if self.roles.flusher {
            Some(spawn_flusher(state.settings.clone(), workers_stop.clone()).await?)
        } else {
            None
        };
        if self.roles.scheduler {
            let scheduler = Scheduler::new(
                state.db.clone(),
                state.hot.clone(),
                state.subscriptions.clone(),
                state.settings.database.partitions_ahead_months,
                state.settings.database.usage_retention_days,
                state.settings.consume.billing_period,
            );
            let deliveries = AlertDeliveries::new(
                state.db.clone(),
                state.egress.clone(),
                state.sealer.clone(),
                state.settings.usage_alert_retry_base,
                state.settings.webhooks.disable_after,
            );
            workers.spawn(deliveries.run(workers_stop.clone()));
            let stop = workers_stop.clone();
            workers.spawn(async move {
                if let Err(e) = scheduler.run(stop).await {
                    tracing::error!(error = %crate::telemetry::chain(&*e), "scheduler failed");
                }
            });
        }

        let housekeeping = tokio::spawn(housekeeping(state.clone(), shutdown.clone()));
        let listener = self.listener;
        let app = if self.roles.api {
            tracing::info!(address = %listener.local_addr()?, "serving the API");
            crate::http::router(state.clone())
        } else {
            tracing::info!(address = %listener.local_addr()?, "serving probes and metrics");
            crate::http::ops_router(state.clone())
        };
        crate::http::server::serve(listener, app, state.settings.http, shutdown.clone()).await?;
        housekeeping.abort();
        tracing::info!("HTTP stopped; in-flight requests finished");

        workers_stop.cancel();
        while workers.join_next().await.is_some() {}
        if let Some(flusher) = flusher {
            let _ = tokio::task::spawn_blocking(move || flusher.join()).await;
        }
        state.hot.quit().await;
        state.limiter.quit().await;
        state.db.close().await;
        Ok(())
    }
}

/// Runs the flushers on a thread and runtime of their own, with their own
/// connections: decoding and writing a batch of thousands of events takes
/// milliseconds of CPU, which on the API's runtime would stall requests
/// queued behind it. `FLUSHER_WORKERS` flushers share the thread; each has
/// a Postgres connection, so their transactions run side by side. Returns
/// once they have connected.
async fn spawn_flusher(
    settings: Arc<Settings>,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("flusher".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let connected = async {
                    let db = ledger::pool(&settings.database)?;
                    let mut flushers = Vec::with_capacity(settings.flusher.workers);
                    for n in 0..settings.flusher.workers {
                        let mut worker = settings.flusher.clone();
                        worker.consumer_name = format!("{}-{n}", worker.consumer_name);
                        // One worker trims, claims and measures for all.
                        worker.upkeep = n == 0;
                        flushers.push(Flusher::connect(&settings.redis, db.clone(), worker).await?);
                    }
                    anyhow::Ok(flushers)
                };
                match connected.await {
                    Ok(flushers) => {
                        let _ = ready_tx.send(Ok(()));
                        let mut running = tokio::task::JoinSet::new();
                        for flusher in flushers {
                            running.spawn(flusher.run(stop.clone()));
                        }
                        while running.join_next().await.is_some() {}
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the flusher thread ended before connecting"))??;
    Ok(thread)
}

async fn housekeeping(state: Arc<AppState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
    // Prometheus's process series (`process_resident_memory_bytes`,
    // `process_cpu_seconds_total`, open descriptors, threads): a soak test
    // and an operator watch memory stay flat with them.
    let process = metrics_process::Collector::default();
    process.describe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        process.collect();
        state.metrics.run_upkeep();
        if let Err(e) = state.hot.sync_clock().await {
            tracing::debug!(error = %crate::telemetry::chain(&e), "redis clock not measured");
        }
        if let Err(e) = state.catalog.refresh(&state.db).await {
            tracing::warn!(error = %crate::telemetry::chain(&e), "catalog refresh failed; serving the last one");
        }
    }
}

/// Resolves on SIGTERM or ctrl-c.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
