//! Keeping a customer's hot state and the ledger in step.
//!
//! Two operations, both under the customer's row lock in Postgres (see
//! [`crate::ledger::accounts`]):
//!
//! - [`Accounts::rebuild`] installs the hot state from Postgres when Redis
//!   has none (first use, or Redis restarted empty). Concurrent requests
//!   for one customer wait on a process-local lock first, so one process
//!   sends one rebuild, and the row lock plus the load script's
//!   only-if-absent check make it one rebuild across all processes.
//! - [`Accounts::change`] runs a Postgres change and its hot-state change
//!   together, so a consume sees an activation, a revocation or a grant the
//!   moment the request that made it returns.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Mutex;
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    error::ApiError,
    hot::{
        account::{AccountChange, AccountState},
        backlog::UnflushedEvent,
        HotStore,
    },
    ledger::accounts::{self as ledger_accounts, Snapshot},
    period::Cadence,
};

const REBUILD_STRIPES: usize = 64;

pub struct Accounts {
    hot: HotStore,
    db: PgPool,
    grace: chrono::Duration,
    /// Striped, so concurrent rebuilds of different customers rarely wait
    /// on each other and memory stays fixed.
    rebuild_locks: Vec<Mutex<()>>,
    /// `REBUILD_MAX_BACKLOG`: the longest unflushed stream a rebuild reads.
    max_backlog: usize,
    /// `ENABLE_USAGE_ALERTS`: whether the hot state carries the merchants'
    /// alert thresholds (without, no consume ever reports a crossing).
    alerts_enabled: bool,
    /// How long a billing period lasts (`BILLING_PERIOD_SECONDS`).
    cadence: Cadence,
}

impl Accounts {
    pub fn new(
        hot: HotStore,
        db: PgPool,
        grace: Duration,
        max_backlog: usize,
        alerts_enabled: bool,
        cadence: Cadence,
    ) -> Self {
        Self {
            hot,
            db,
            grace: chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::hours(72)),
            rebuild_locks: (0..REBUILD_STRIPES).map(|_| Mutex::new(())).collect(),
            max_backlog,
            alerts_enabled,
            cadence,
        }
    }

    pub fn alerts_enabled(&self) -> bool {
        self.alerts_enabled
    }

    pub fn cadence(&self) -> Cadence {
        self.cadence
    }

    /// Loads the customer's hot state from Postgres unless it is loaded.
    /// `NotFound` when the customer does not exist.
    ///
    /// The account hash can be lost while the customer's shard stream
    /// still holds charges the flusher has not written (an eviction, an
    /// operator's `DEL`, a partial restore): the rebuild counts those too,
    /// or the customer could spend them again. Each event found in the
    /// stream and not in the ledger's snapshot is added to the balance.
    /// When the unflushed part of the stream is longer than
    /// `REBUILD_MAX_BACKLOG` entries, the rebuild waits for the flusher:
    /// 503, nothing loaded.
    #[tracing::instrument(name = "hot state rebuild", level = "debug", skip_all, fields(%customer))]
    pub async fn rebuild(&self, customer: Uuid) -> Result<(), ApiError> {
        let stripe = (customer.as_u128() % REBUILD_STRIPES as u128) as usize;
        let _local = self.rebuild_locks[stripe].lock().await;
        if self.hot.is_loaded(customer).await? {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        if !ledger_accounts::lock_customer(&mut tx, customer).await? {
            return Err(ApiError::NotFound("customer"));
        }
        // Read after the lock, before the snapshot: whatever the flusher
        // commits in between is either in the snapshot or added from here,
        // never both (the snapshot says which of these it holds).
        let unflushed = self
            .hot
            .unflushed_usage(customer, self.max_backlog)
            .await?
            .ok_or_else(|| {
                ApiError::Unavailable(anyhow::anyhow!(
                    "the usage backlog is longer than REBUILD_MAX_BACKLOG; waiting for the flusher"
                ))
            })?;
        let ids: Vec<Uuid> = unflushed.iter().map(|e| e.id).collect();
        // The period is the one Redis's clock is in now, read after the
        // charges above: a charge made in the first milliseconds of a
        // period must be counted in it, and an estimate of Redis's clock a
        // millisecond behind would install the period before, whose end the
        // next consume would then roll past, from zero (found by the billing
        // simulation, seed 1384744506).
        let now = chrono::DateTime::from_timestamp_millis(self.hot.redis_time_ms().await?)
            .unwrap_or_else(chrono::Utc::now);
        let snapshot =
            ledger_accounts::snapshot(&mut tx, customer, self.grace, &ids, now, self.cadence)
                .await?;
        let state = with_unflushed(snapshot, &unflushed, self.alerts_enabled);
        let installed = self.hot.load_account(customer, &state).await?;
        tx.commit().await?;
        if installed {
            metrics::counter!("hot_state_rebuilds_total").increment(1);
            tracing::info!(%customer, unflushed = unflushed.len(), "rebuilt hot state from the ledger");
        }
        Ok(())
    }

    /// Runs `change` in a transaction holding the customer's row lock, then
    /// applies the hot-state changes it returns, then commits.
    ///
    /// Redis is written before the commit so no rebuild can slip between
    /// them. Should the commit then fail, the changes that could let a
    /// consume through (an activation, a new key, added tokens) are undone
    /// in Redis; those that only refuse (a pause, a revocation) are left,
    /// and the next rebuild or a retry of the request settles them. Tokens a
    /// refund took back are given back too when the commit fails (an error
    /// inside `change` after the take leaves it to the marker: the retry is
    /// told what was taken).
    ///
    /// Credits and takes of tokens are done once per effect (see
    /// [`crate::hot::account::Once`]): if the process dies between Redis and
    /// the commit, or Redis's reply is lost, the retry (Stripe's, or the
    /// client's) finds them done and the ledger catches up; their undo
    /// reverses them only if they were done.
    ///
    /// The whole of it runs on a task of its own: a request cut short (its
    /// client gone, its connection closed) drops the handler's future,
    /// and a change dropped between Redis and the commit would leave the
    /// two apart. The task runs to the end whatever happens to the request.
    #[tracing::instrument(name = "account change", level = "debug", skip_all, fields(%customer))]
    pub async fn change<T: Send + 'static>(
        &self,
        customer: Uuid,
        change: impl for<'c> FnOnce(
                &'c mut PgConnection,
            ) -> BoxFuture<'c, Result<(T, Vec<AccountChange>), ApiError>>
            + Send
            + 'static,
    ) -> Result<T, ApiError> {
        let (hot, db) = (self.hot.clone(), self.db.clone());
        let task = tokio::spawn(
            async move {
                let mut tx = db.begin().await?;
                if !ledger_accounts::lock_customer(&mut tx, customer).await? {
                    return Err(ApiError::NotFound("customer"));
                }
                let (result, changes) = change(&mut tx).await?;
                if let Err(e) = hot.update_account(customer, &changes).await {
                    // The reply may be what was lost; only credits and takes,
                    // gated by their marker, can be undone without knowing
                    // whether they were applied.
                    if changes.iter().any(AccountChange::is_once) {
                        undo(&hot, customer, &changes, "update").await;
                    }
                    return Err(e.into());
                }
                if let Err(e) = tx.commit().await {
                    undo(&hot, customer, &changes, "commit").await;
                    return Err(e.into());
                }
                Ok(result)
            }
            .in_current_span(),
        );
        task.await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("an account change failed: {e}")))?
    }
}

async fn undo(hot: &HotStore, customer: Uuid, changes: &[AccountChange], failed: &str) {
    let undo: Vec<AccountChange> = changes.iter().flat_map(undo_of).collect();
    if let Err(e) = hot.update_account(customer, &undo).await {
        tracing::error!(%customer, error = %crate::telemetry::chain(&e), failed, "could not undo a hot-state change");
    }
}

/// The ledger's state plus the charges it does not hold yet: each draws
/// its purchased part from the purchased balance and, when it fell in the
/// current period, the rest from the period's allowance.
fn with_unflushed(
    snapshot: Snapshot,
    events: &[UnflushedEvent],
    alerts_enabled: bool,
) -> AccountState {
    let mut state = snapshot.state;
    if alerts_enabled {
        state.alert_at = alert_at(snapshot.alert_thresholds.as_deref());
    }
    let period = snapshot
        .period_start
        .map(|start| start.timestamp_millis())
        .zip(state.period.as_ref().map(|p| p.end_ms));
    for event in events.iter().filter(|e| !snapshot.stored.contains(&e.id)) {
        state.purchased -= event.purchased;
        if period.is_some_and(|(start, end)| (start..end).contains(&event.at_ms)) {
            state.used += event.tokens - event.purchased;
        }
    }
    state
}

/// The hot state's `alert_at`: the thresholds, comma-separated; empty when
/// the merchant turned alerts off.
pub fn alert_at(thresholds: Option<&[i16]>) -> String {
    thresholds
        .unwrap_or_default()
        .iter()
        .map(i16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// What reverses `change` after its commit failed: the changes that could
/// let a consume through, and the gated credits and takes (reversed only
/// if their marker says they were done).
fn undo_of(change: &AccountChange) -> Vec<AccountChange> {
    match change {
        AccountChange::ActivateApp(slug) => vec![AccountChange::DeactivateApp(slug.clone())],
        AccountChange::AddEmbedKey { id, .. } => vec![AccountChange::RemoveEmbedKey(*id)],
        AccountChange::AddPurchased(n) if *n > 0 => vec![AccountChange::AddPurchased(-n)],
        AccountChange::CreditPurchased { tokens, once } => vec![
            AccountChange::Forget(once.clone()),
            AccountChange::AddPurchased(-tokens),
        ],
        AccountChange::TookPurchased { tokens, once } => vec![
            AccountChange::Forget(once.clone()),
            AccountChange::AddPurchased(*tokens),
        ],
        _ => Vec::new(),
    }
}
