//! The hot balances checked against the ledger: each loaded customer's
//! usage this period in Redis (`used`) must equal the ledger's rows of the
//! period plus the charges still in the stream that the ledger does not
//! hold yet. A difference is drift: a charge lost between Redis and
//! Postgres, one counted twice, or a hand-edited balance. The check
//! reports it (`ledger_drift_customers`, `ledger_drift_tokens`, a warning
//! per customer with both figures) and repairs nothing: which side is
//! right is for an operator to find out (docs/runbooks.md).
//!
//! Consumes go on during the check, so each shard is read race-free:
//! every customer's `used` and period, then the shard's unflushed stream,
//! then `used` again. A customer whose `used` moved in between was
//! charged meanwhile and is left for the next pass; for the others the
//! stream read holds every charge `used` counts that is not yet
//! acknowledged (a charge and its event are one step of the consume
//! script; what was acknowledged was committed). The ledger is read
//! afterwards in one snapshot, which tells which of the stream's events
//! it already holds, so none is counted twice.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use fred::interfaces::HashesInterface;
use sqlx::PgPool;
use uuid::Uuid;

use crate::hot::HotStore;

/// One replica at a time checks (a Postgres advisory lock).
const DRIFT_LOCK: i64 = 0x0ca0_0006;

/// Stream entries read per shard at most: a flusher that far behind is
/// alerted on by its lag, and the check waits for the next pass.
const BACKLOG_LIMIT: usize = 200_000;

/// What one pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DriftReport {
    /// False when another replica held the lock.
    pub ran: bool,
    /// Customers compared.
    pub checked: usize,
    /// Customers charged during the pass, or whose shard's backlog was
    /// too long to read: compared next time.
    pub skipped: usize,
    /// Customers whose hot usage differs: (customer, hot, ledger and
    /// stream), sorted by customer.
    pub drifted: Vec<(Uuid, i64, i64)>,
}

/// A customer's usage this period as the hot store holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HotUsage {
    used: i64,
    period_start_ms: i64,
    period_end_ms: i64,
}

pub struct UsageDrift {
    db: PgPool,
    hot: HotStore,
}

impl UsageDrift {
    pub fn new(db: PgPool, hot: HotStore) -> Self {
        Self { db, hot }
    }

    /// One pass over every customer with a loaded hot account; sets the
    /// gauges and warns per drifted customer.
    pub async fn check(&self) -> anyhow::Result<DriftReport> {
        let mut lock = self.db.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(DRIFT_LOCK)
            .fetch_one(&mut *lock)
            .await?;
        if !locked {
            return Ok(DriftReport::default());
        }
        let report = self.compare_all().await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(DRIFT_LOCK)
            .execute(&mut *lock)
            .await?;
        let report = report?;
        metrics::gauge!("ledger_drift_customers").set(report.drifted.len() as f64);
        metrics::gauge!("ledger_drift_tokens").set(
            report
                .drifted
                .iter()
                .map(|(_, hot, ledger)| (hot - ledger).unsigned_abs() as f64)
                .sum::<f64>(),
        );
        for (customer, hot, ledger) in &report.drifted {
            tracing::warn!(
                %customer,
                hot_used = hot,
                ledger_and_stream = ledger,
                "hot usage differs from the ledger"
            );
        }
        Ok(report)
    }

    async fn compare_all(&self) -> anyhow::Result<DriftReport> {
        let customers: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM customers ORDER BY id")
            .fetch_all(&self.db)
            .await?;
        let keys = self.hot.keys();
        let mut by_shard: HashMap<u16, Vec<Uuid>> = HashMap::new();
        for customer in customers {
            by_shard
                .entry(keys.shard_of(customer))
                .or_default()
                .push(customer);
        }
        let mut report = DriftReport {
            ran: true,
            ..DriftReport::default()
        };
        for (shard, customers) in by_shard {
            self.compare_shard(shard, &customers, &mut report).await?;
        }
        report.drifted.sort();
        Ok(report)
    }

    async fn compare_shard(
        &self,
        shard: u16,
        customers: &[Uuid],
        report: &mut DriftReport,
    ) -> anyhow::Result<()> {
        let before = self.hot_usage(customers).await?;
        let Some(backlog) = self
            .hot
            .unflushed_usage_of_shard(shard, BACKLOG_LIMIT)
            .await?
        else {
            report.skipped += before.iter().flatten().count();
            return Ok(());
        };
        let after = self.hot_usage(customers).await?;
        let mut steady = Vec::new();
        for ((customer, before), after) in customers.iter().zip(before).zip(after) {
            match (before, after) {
                (Some(b), Some(a)) if a == b => steady.push((*customer, b)),
                (Some(_), _) => report.skipped += 1,
                // Not loaded: nothing in Redis to compare.
                (None, _) => {}
            }
        }
        if steady.is_empty() {
            return Ok(());
        }

        // One snapshot: the period's rows, and which of the stream's
        // events are among them.
        let mut tx = self.db.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let ids: Vec<Uuid> = steady.iter().map(|(customer, _)| *customer).collect();
        let starts: Vec<_> = steady
            .iter()
            .map(|(_, hot)| at(hot.period_start_ms))
            .collect();
        let ends: Vec<_> = steady
            .iter()
            .map(|(_, hot)| at(hot.period_end_ms))
            .collect();
        let ledger: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
            "SELECT p.customer_id, COALESCE(SUM(u.tokens_consumed - u.purchased_tokens_consumed), 0)::int8
             FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS p(customer_id, starts, ends)
             LEFT JOIN token_usage u ON u.customer_id = p.customer_id
                  AND u.created_at >= p.starts AND u.created_at < p.ends
             GROUP BY p.customer_id",
        )
        .bind(&ids)
        .bind(&starts)
        .bind(&ends)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let event_ids: Vec<Uuid> = backlog.iter().map(|(_, event)| event.id).collect();
        let persisted: HashSet<Uuid> =
            sqlx::query_scalar("SELECT id FROM token_usage WHERE id = ANY($1)")
                .bind(&event_ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        tx.commit().await?;

        for (customer, hot) in steady {
            let unflushed: i64 = backlog
                .iter()
                .filter(|(owner, event)| {
                    *owner == customer
                        && !persisted.contains(&event.id)
                        && (hot.period_start_ms..hot.period_end_ms).contains(&event.at_ms)
                })
                .map(|(_, event)| event.tokens - event.purchased)
                .sum();
            let expected = ledger.get(&customer).copied().unwrap_or(0) + unflushed;
            report.checked += 1;
            if expected != hot.used {
                report.drifted.push((customer, hot.used, expected));
            }
        }
        Ok(())
    }

    /// Each customer's `used` and period, `None` when its account is not
    /// loaded (or has no period yet).
    async fn hot_usage(&self, customers: &[Uuid]) -> anyhow::Result<Vec<Option<HotUsage>>> {
        let reads = customers.iter().map(|customer| async move {
            let fields: Vec<Option<i64>> = self
                .hot
                .client()
                .hmget(
                    self.hot.keys().account(*customer),
                    vec!["used", "period_start", "period_end"],
                )
                .await?;
            anyhow::Ok(match fields[..] {
                [Some(used), Some(period_start_ms), Some(period_end_ms)] => Some(HotUsage {
                    used,
                    period_start_ms,
                    period_end_ms,
                }),
                _ => None,
            })
        });
        futures::future::try_join_all(reads).await
    }
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
