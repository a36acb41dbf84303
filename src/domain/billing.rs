//! Billing periods: when they end, and moving customers on to the next.
//!
//! A period's end is in the hot state, so the consume script starts the
//! next period itself when a consume comes at or after it; the rollover
//! here moves the ledger on and tells the hot state, keyed by the period,
//! so a rollover that is late, repeated or concurrent changes nothing twice
//! (see `lua/account_rollover.lua`).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{
    error::ApiError,
    hot::{
        account::{Period, Rollover},
        HotStore,
    },
    ledger::{accounts as ledger_accounts, billing},
    period::Cadence,
};

/// Customers rolled per batch of the scheduled job.
const BATCH: i64 = 500;
/// The advisory lock that lets one replica at a time run the job.
const ROLLOVER_LOCK: i64 = 0x0ca0_0001;

pub struct Periods {
    db: PgPool,
    hot: HotStore,
    cadence: Cadence,
}

impl Periods {
    pub fn new(db: PgPool, hot: HotStore, cadence: Cadence) -> Self {
        Self { db, hot, cadence }
    }

    /// Moves every customer billed without Stripe whose period ended by
    /// `now` into the next one. One replica at a time: the others find the
    /// lock taken and return 0. Returns the customers moved.
    pub async fn roll_ended(&self, now: DateTime<Utc>) -> Result<usize, ApiError> {
        // A session lock on a connection of its own: released when the
        // job ends, or when the connection drops with a dead process.
        let mut lock_conn = self.db.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(ROLLOVER_LOCK)
            .fetch_one(&mut *lock_conn)
            .await?;
        if !locked {
            return Ok(0);
        }
        let result = self.roll_all(now).await;
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(ROLLOVER_LOCK)
            .execute(&mut *lock_conn)
            .await?;
        result
    }

    async fn roll_all(&self, now: DateTime<Utc>) -> Result<usize, ApiError> {
        let mut moved = 0;
        loop {
            let due = billing::periods_ended(&mut *self.db.acquire().await?, now, BATCH).await?;
            if due.is_empty() {
                return Ok(moved);
            }
            for customer in &due {
                if self.roll(*customer, now).await? {
                    moved += 1;
                }
            }
            if (due.len() as i64) < BATCH {
                return Ok(moved);
            }
        }
    }

    /// Moves one customer on, if their period has ended: the ledger under
    /// the customer's row lock, then the hot state, keyed by the period,
    /// before the commit (as every hot-state change is: a rebuild cannot
    /// slip between). Should the commit fail, the next run moves the
    /// ledger again and the hot state finds its period already started.
    pub async fn roll(&self, customer: Uuid, now: DateTime<Utc>) -> Result<bool, ApiError> {
        let mut tx = self.db.begin().await?;
        if !ledger_accounts::lock_customer(&mut tx, customer).await? {
            return Ok(false);
        }
        let Some(period) = billing::roll_period(&mut tx, customer, now, self.cadence).await? else {
            return Ok(false);
        };
        let next = rollover(
            self.cadence,
            period.start,
            period.allowance,
            period.anchor,
            period.end,
            period.allowance,
        );
        self.hot.rollover(customer, &next).await?;
        tx.commit().await?;
        metrics::counter!("billing_periods_rolled_total").increment(1);
        Ok(true)
    }
}

/// The hot state's view of the period ending at `end`: the periods after
/// it counted from `anchor`, with `next_allowance`.
pub fn hot_period(
    cadence: Cadence,
    anchor: DateTime<Utc>,
    end: DateTime<Utc>,
    next_allowance: i64,
) -> Period {
    let ahead = cadence.ends_ahead();
    let mut next_ends_ms = Vec::with_capacity(ahead);
    let mut last = end;
    for _ in 0..ahead {
        last = cadence.after(anchor, last);
        next_ends_ms.push(last.timestamp_millis());
    }
    Period {
        end_ms: end.timestamp_millis(),
        next_ends_ms,
        next_allowance,
    }
}

/// The hot-state rollover into the period `[start, end)` with `allowance`
/// (`start`: the old period's end, or a later boundary when the periods
/// between went unseen).
pub fn rollover(
    cadence: Cadence,
    start: DateTime<Utc>,
    allowance: i64,
    anchor: DateTime<Utc>,
    end: DateTime<Utc>,
    next_allowance: i64,
) -> Rollover {
    Rollover {
        start_ms: start.timestamp_millis(),
        allowance,
        period: hot_period(cadence, anchor, end, next_allowance),
        new_subscription: false,
    }
}
