//! Scheduled jobs (tokio-cron-scheduler).
//!
//! - `usage-partitions`, daily at 03:00 UTC and once at start: creates the
//!   `token_usage` partitions of the coming months. It is idempotent
//!   (`CREATE TABLE IF NOT EXISTS`), so replicas running it at once need
//!   no lock.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::ledger::partitions;

pub struct Scheduler {
    db: PgPool,
    months_ahead: u32,
}

impl Scheduler {
    pub fn new(db: PgPool, months_ahead: u32) -> Self {
        Self { db, months_ahead }
    }

    /// Makes sure the coming months' partitions exist.
    pub async fn ensure_partitions(&self) -> anyhow::Result<()> {
        partitions::ensure_months_ahead(&self.db, chrono::Utc::now(), self.months_ahead).await?;
        Ok(())
    }

    /// Runs the jobs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Err(e) = self.ensure_partitions().await {
            tracing::warn!(error = ?e, "could not create usage partitions at start; retrying on schedule");
        }
        let this = Arc::new(self);
        let mut scheduler = JobScheduler::new().await?;
        let job_state = this.clone();
        scheduler
            .add(Job::new_async("0 0 3 * * *", move |_id, _lock| {
                let job_state = job_state.clone();
                Box::pin(async move {
                    match job_state.ensure_partitions().await {
                        Ok(()) => tracing::info!("usage partitions ensured"),
                        Err(e) => tracing::error!(error = ?e, "usage partition job failed"),
                    }
                })
            })?)
            .await?;
        scheduler.start().await?;
        shutdown.cancelled().await;
        scheduler.shutdown().await?;
        tracing::info!("scheduler stopped");
        Ok(())
    }
}
