//! Scheduled jobs (tokio-cron-scheduler):
//!
//! - `billing-rollover`, every minute and at start: customers billed
//!   without Stripe whose period has ended move into the next one (one
//!   replica at a time, under a Postgres advisory lock; each customer's
//!   move is keyed by the period, so a repeat changes nothing). Consumes
//!   never wait for it: the consume script starts a due period itself.
//!
//! Daily at 03:00 UTC and once at start:
//!
//! - `usage-partitions`: creates the partitions of the coming months;
//! - `usage-retention`: drops raw usage partitions whose month ended more
//!   than `USAGE_RETENTION_DAYS` ago (default 400). The daily aggregates
//!   are kept.
//!
//! These are idempotent (`CREATE TABLE IF NOT EXISTS`, `DROP TABLE IF
//! EXISTS`), so replicas running them at once need no lock.
//!
//! Every 30 s, `business-gauges`: MRR, active customers by plan,
//! activations by app and status, and customers' period usage against
//! their allowance, read from Postgres (one query each) into gauges by one
//! replica at a time (a Postgres advisory lock): aggregate with `max`.
//!
//! Every 5 minutes, `usage-drift`: each loaded customer's usage this
//! period in Redis compared with the ledger plus the unflushed stream,
//! reported as gauges and warnings, repaired never (one replica at a
//! time, see `domain::usage_drift`).
//!
//! Daily at 04:00 UTC, `billing-reconcile`: every Stripe-billed customer
//! compared with Stripe and set right where it differs (one replica at a
//! time, see `domain::reconcile`).

use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::{
    domain::{billing::Periods, subscriptions::Subscriptions, usage_drift::UsageDrift},
    hot::HotStore,
    ledger::{partitions, reports},
};

/// The advisory lock that lets one replica at a time refresh the gauges.
const GAUGES_LOCK: i64 = 0x0ca0_0004;

/// `period_usage_ratio`'s buckets (as in `telemetry`).
pub const USAGE_RATIO_BUCKETS: [f64; 8] = [0.1, 0.25, 0.5, 0.75, 0.8, 0.9, 0.95, 1.0];

/// A job's run, on the scheduler's state.
type Task = fn(Arc<Scheduler>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Scheduler {
    db: PgPool,
    periods: Periods,
    drift: UsageDrift,
    subscriptions: Arc<Subscriptions>,
    months_ahead: u32,
    retention_days: u32,
}

impl Scheduler {
    pub fn new(
        db: PgPool,
        hot: HotStore,
        subscriptions: Arc<Subscriptions>,
        months_ahead: u32,
        retention_days: u32,
        cadence: crate::period::Cadence,
    ) -> Self {
        Self {
            periods: Periods::new(db.clone(), hot.clone(), cadence),
            drift: UsageDrift::new(db.clone(), hot),
            db,
            subscriptions,
            months_ahead,
            retention_days,
        }
    }

    /// Refreshes the business gauges from Postgres (one replica at a time:
    /// the others find the lock taken and leave their gauges as they were).
    #[tracing::instrument(name = "scheduler business gauges", level = "debug", skip_all)]
    async fn business_gauges(&self) {
        if let Err(e) = self.refresh_gauges().await {
            tracing::warn!(error = %crate::telemetry::chain(&*e), "business gauges not refreshed");
        }
    }

    /// `billing_mrr_cents`, `customers_active{plan}`,
    /// `app_activations{app_id,status}` and a sample of
    /// `period_usage_ratio`, each from one query.
    pub async fn refresh_gauges(&self) -> anyhow::Result<bool> {
        let mut conn = self.db.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(GAUGES_LOCK)
            .fetch_one(&mut *conn)
            .await?;
        if !locked {
            return Ok(false);
        }
        let refreshed = async {
            metrics::gauge!("billing_mrr_cents").set(reports::mrr_cents(&mut conn).await? as f64);
            for (plan, n) in reports::active_customers_by_plan(&mut conn).await? {
                metrics::gauge!("customers_active", "plan" => plan).set(n as f64);
            }
            for (app, status, n) in reports::activations_by_app(&mut conn).await? {
                metrics::gauge!("app_activations", "app_id" => app, "status" => status)
                    .set(n as f64);
            }
            let ratios = metrics::histogram!("period_usage_ratio");
            for (bucket, n) in reports::period_usage_ratios(&mut conn, &USAGE_RATIO_BUCKETS).await?
            {
                ratios.record_many(bucket, n.max(0) as usize);
            }
            anyhow::Ok(())
        }
        .await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(GAUGES_LOCK)
            .execute(&mut *conn)
            .await?;
        refreshed.map(|()| true)
    }

    #[tracing::instrument(name = "scheduler usage drift", level = "debug", skip_all)]
    async fn usage_drift(&self) {
        match self.drift.check().await {
            Ok(report) if report.ran => tracing::info!(
                checked = report.checked,
                skipped = report.skipped,
                drifted = report.drifted.len(),
                "hot usage checked against the ledger"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::telemetry::chain(&*e), "usage drift check failed")
            }
        }
    }

    #[tracing::instrument(name = "scheduler reconcile", level = "debug", skip_all)]
    async fn reconcile(&self) {
        match self.subscriptions.reconcile().await {
            Ok(report) if report.ran => tracing::info!(
                checked = report.checked,
                fixed = report.fixed.len(),
                failed = report.failed,
                "billing reconciled with Stripe"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %crate::telemetry::chain(&e), "billing reconciliation failed")
            }
        }
    }

    #[tracing::instrument(name = "scheduler rollover", level = "debug", skip_all)]
    async fn rollover(&self) {
        match self.periods.roll_ended(Utc::now()).await {
            Ok(0) => {}
            Ok(moved) => tracing::info!(moved, "billing periods rolled over"),
            Err(e) => {
                tracing::error!(error = %crate::telemetry::chain(&e), "billing rollover failed")
            }
        }
    }

    /// Makes sure the coming months' partitions exist.
    pub async fn ensure_partitions(&self) -> anyhow::Result<()> {
        partitions::ensure_months_ahead(&self.db, Utc::now(), self.months_ahead).await?;
        Ok(())
    }

    /// Drops the raw usage older than the retention period, as of `now`;
    /// returns the partitions dropped.
    pub async fn apply_retention(&self, now: DateTime<Utc>) -> anyhow::Result<Vec<String>> {
        let cutoff = now.date_naive() - chrono::Days::new(u64::from(self.retention_days));
        Ok(partitions::drop_before(&self.db, cutoff).await?)
    }

    #[tracing::instrument(name = "scheduler daily", level = "debug", skip_all)]
    async fn daily(&self) {
        match self.ensure_partitions().await {
            Ok(()) => tracing::info!("usage partitions ensured"),
            Err(e) => {
                tracing::error!(error = %crate::telemetry::chain(&*e), "usage partition job failed")
            }
        }
        match self.apply_retention(Utc::now()).await {
            Ok(dropped) if dropped.is_empty() => {}
            Ok(dropped) => tracing::info!(?dropped, "usage past retention dropped"),
            Err(e) => {
                tracing::error!(error = %crate::telemetry::chain(&*e), "usage retention job failed")
            }
        }
    }

    /// Runs the jobs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.daily().await;
        self.rollover().await;
        self.business_gauges().await;
        let this = Arc::new(self);
        let mut scheduler = JobScheduler::new().await?;
        let jobs: [(&str, Task); 5] = [
            ("0 * * * * *", |s| {
                Box::pin(async move { s.rollover().await })
            }),
            ("0 0 3 * * *", |s| Box::pin(async move { s.daily().await })),
            ("*/30 * * * * *", |s| {
                Box::pin(async move { s.business_gauges().await })
            }),
            ("30 */5 * * * *", |s| {
                Box::pin(async move { s.usage_drift().await })
            }),
            ("0 0 4 * * *", |s| {
                Box::pin(async move { s.reconcile().await })
            }),
        ];
        for (cron, task) in jobs {
            let state = this.clone();
            scheduler
                .add(Job::new_async(cron, move |_id, _lock| task(state.clone()))?)
                .await?;
        }
        scheduler.start().await?;
        shutdown.cancelled().await;
        scheduler.shutdown().await?;
        tracing::info!("scheduler stopped");
        Ok(())
    }
}
