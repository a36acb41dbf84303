//! A customer's hot state: loading it from a Postgres snapshot, and
//! changing it in place when Postgres changes.
//!
//! Both run while the caller holds the customer's row lock in Postgres
//! (`SELECT … FOR NO KEY UPDATE`, see [`crate::ledger::accounts`]), so a
//! rebuild never installs a snapshot that a concurrent change has made
//! stale, and a change never lands in a half-built account.

use fred::types::Value;
use uuid::Uuid;

use super::{HotError, HotStore};

/// Everything the consume script reads for one customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    /// Tokens per billing period; -1 = unlimited.
    pub allowance: i64,
    /// Allowance already drawn this period.
    pub used: i64,
    /// Purchased tokens left.
    pub purchased: i64,
    pub status: SubscriptionStatus,
    /// Epoch ms until which a `past_due` subscription may still consume.
    pub grace_until_ms: i64,
    /// Slugs of the apps whose activation is active.
    pub active_apps: Vec<String>,
    /// Live embed keys and their expiry (epoch ms, 0 = never).
    pub embed_keys: Vec<(Uuid, i64)>,
    /// The billing period's end and the next one's, with its allowance.
    pub period: Option<Period>,
}

/// A billing period's end, as the consume script reads it (epoch ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub end_ms: i64,
    /// The end of the period after; the script starts that one itself when
    /// a consume comes at or after `end_ms`.
    pub next_end_ms: i64,
    /// The next period's allowance (a downgrade's, once one is scheduled).
    pub next_allowance: i64,
}

/// The start of a new period, for `lua/account_rollover.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollover {
    /// The old period's end, epoch ms: the key of the rollover.
    pub start_ms: i64,
    pub allowance: i64,
    /// The new period's end and its successor.
    pub period: Period,
}

/// What a rollover found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloverOutcome {
    /// Usage reset, the new period started.
    Started,
    /// The consume script had started it already: usage kept.
    AlreadyStarted,
    /// A later period is on, or no hot state is loaded.
    Nothing,
}

/// The balance part of the hot state, as the consume script sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// Tokens per period; -1 = unlimited.
    pub allowance: i64,
    /// Allowance drawn this period.
    pub used: i64,
    /// Purchased tokens left.
    pub purchased: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionStatus {
    /// No subscription: only purchased tokens can be spent.
    None,
    Active,
    PastDue,
    Canceled,
    Unpaid,
}

impl SubscriptionStatus {
    /// The `open_until` field of `lua/consume.lua`: 0 = may consume,
    /// > 0 = may consume until then (epoch ms), -1 = may not.
    pub fn open_until(self, grace_until_ms: i64) -> i64 {
        match self {
            SubscriptionStatus::None | SubscriptionStatus::Active => 0,
            SubscriptionStatus::PastDue => grace_until_ms.max(1),
            SubscriptionStatus::Canceled | SubscriptionStatus::Unpaid => -1,
        }
    }

    /// The name `parse` reads, as `customer_billing.status` holds it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
            Self::Unpaid => "unpaid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "active" => Self::Active,
            "past_due" => Self::PastDue,
            "canceled" => Self::Canceled,
            "unpaid" => Self::Unpaid,
            _ => return None,
        })
    }
}

impl AccountState {
    fn open_until(&self) -> i64 {
        self.status.open_until(self.grace_until_ms)
    }
}

/// One in-place change, applied by `lua/account_update.lua`.
#[derive(Debug, Clone)]
pub enum AccountChange {
    ActivateApp(String),
    DeactivateApp(String),
    AddEmbedKey {
        id: Uuid,
        expires_at_ms: i64,
    },
    RemoveEmbedKey(Uuid),
    /// Adds purchased tokens (or, negative, takes them), unconditionally.
    AddPurchased(i64),
    /// Adds purchased tokens once per `once`: a retry after a crash, or
    /// after a lost reply, between this change and the ledger's commit
    /// finds it applied.
    CreditPurchased {
        tokens: i64,
        once: Once,
    },
    /// Purchased tokens a refund has already taken back (see
    /// [`HotStore::take_purchased`]): nothing to apply; given back if the
    /// ledger's transaction then fails.
    TookPurchased {
        tokens: i64,
        once: Once,
    },
    /// Undoes what was done under `once`: the other changes of the update
    /// apply only if it was done, and it is forgotten.
    Forget(Once),
    /// The current period's end and what follows it, when Stripe's period
    /// replaces ours mid-way.
    SetPeriod(Period),
    /// The plan's allowance per period (-1 = unlimited).
    SetAllowance(i64),
    /// The allowance of the period after this one.
    SetNextAllowance(i64),
    /// The subscription's state as `open_until` (see [`AccountState`]).
    SetOpenUntil(i64),
}

/// The identity of a change to a balance that must happen once: the
/// effect it belongs to (a purchase's payment intent, a refund's share of
/// a purchase, a grant), the same however often Stripe's webhook or the
/// purchase request is retried (a grant's id is new with each request, so
/// it guards only that request's own undo). Remembered for
/// [`ONCE_TTL_SECS`], longer than Stripe retries a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once(String);

/// Seven days; Stripe retries a webhook for up to three.
pub const ONCE_TTL_SECS: i64 = 7 * 86_400;

impl Once {
    pub fn purchase(payment_intent: &str) -> Self {
        Self(format!("purchase:{payment_intent}"))
    }

    /// A refund taking back the purchase's tokens up to `refunded_tokens`
    /// (its refunded share, in tokens).
    pub fn refund(payment_intent: &str, refunded_tokens: i32) -> Self {
        Self(format!("refund:{payment_intent}:{refunded_tokens}"))
    }

    pub fn grant(grant: Uuid) -> Self {
        Self(format!("grant:{grant}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AccountChange {
    /// The gate of an update: `once` applies the update once per id,
    /// `forget` undoes it.
    fn gate(&self) -> Option<(&'static str, &Once)> {
        match self {
            Self::CreditPurchased { once, .. } => Some(("once", once)),
            Self::Forget(once) => Some(("forget", once)),
            _ => None,
        }
    }

    /// Done once per [`Once`]: credits and takes of tokens.
    pub fn is_once(&self) -> bool {
        matches!(
            self,
            Self::CreditPurchased { .. } | Self::TookPurchased { .. }
        )
    }

    fn push_args(&self, args: &mut Vec<Value>) {
        let mut op = |op: &str, field: String, value: Value| {
            args.extend([op.into(), field.into(), value]);
        };
        match self {
            Self::ActivateApp(slug) => op("set", format!("app:{slug}"), "1".into()),
            Self::DeactivateApp(slug) => op("del", format!("app:{slug}"), "".into()),
            Self::AddEmbedKey { id, expires_at_ms } => {
                op("set", format!("key:{id}"), (*expires_at_ms).into())
            }
            // The key's rate limiter goes with it.
            Self::RemoveEmbedKey(id) => {
                op("del", format!("key:{id}"), "".into());
                op("del", format!("rl:{id}"), "".into());
            }
            Self::AddPurchased(n) | Self::CreditPurchased { tokens: n, .. } => {
                op("incr", "purchased".into(), (*n).into())
            }
            Self::TookPurchased { .. } | Self::Forget(_) => {}
            Self::SetPeriod(period) => {
                op("set", "period_end".into(), period.end_ms.into());
                op("set", "next_end".into(), period.next_end_ms.into());
                op("set", "next_allowance".into(), period.next_allowance.into());
            }
            Self::SetAllowance(n) => op("set", "allowance".into(), (*n).into()),
            Self::SetNextAllowance(n) => op("set", "next_allowance".into(), (*n).into()),
            Self::SetOpenUntil(ms) => op("set", "open_until".into(), (*ms).into()),
        }
    }
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    Applied,
    /// The account is not loaded: its next rebuild reads the change from
    /// Postgres.
    NotLoaded,
    /// Its gate held it back: done once already, or nothing to undo.
    Gated,
}

impl HotStore {
    /// Installs `state` unless the account is already loaded. Returns
    /// whether it installed it.
    pub async fn load_account(
        &self,
        customer: Uuid,
        state: &AccountState,
    ) -> Result<bool, HotError> {
        let mut args: Vec<Value> = vec![
            "allowance".into(),
            state.allowance.into(),
            "used".into(),
            state.used.into(),
            "purchased".into(),
            state.purchased.into(),
            "open_until".into(),
            state.open_until().into(),
        ];
        for slug in &state.active_apps {
            args.push(format!("app:{slug}").into());
            args.push("1".into());
        }
        for (id, expires) in &state.embed_keys {
            args.push(format!("key:{id}").into());
            args.push((*expires).into());
        }
        if let Some(period) = state.period {
            args.extend([
                "period_end".into(),
                period.end_ms.into(),
                "next_end".into(),
                period.next_end_ms.into(),
                "next_allowance".into(),
                period.next_allowance.into(),
            ]);
        }
        let loaded: i64 = self
            .scripts
            .account_load
            .evalsha_with_reload(self.client(), vec![self.keys.account(customer)], args)
            .await?;
        Ok(loaded == 1)
    }

    /// Applies changes to a loaded account; an account not loaded is left
    /// for the next rebuild, which reads the change from Postgres. At most
    /// one change of an update may be gated (see [`Once`]).
    pub async fn update_account(
        &self,
        customer: Uuid,
        changes: &[AccountChange],
    ) -> Result<Updated, HotError> {
        let mut keys = vec![self.keys.account(customer)];
        let mut args = Vec::with_capacity(changes.len() * 3 + 3);
        let mut gates = changes.iter().filter_map(AccountChange::gate);
        if let Some((op, once)) = gates.next() {
            args.extend([op.into(), "".into(), ONCE_TTL_SECS.into()]);
            keys.push(self.keys.once(customer, once.as_str()));
        }
        if gates.next().is_some() {
            return Err(HotError::Internal(anyhow::anyhow!(
                "an account update takes one gated change: {changes:?}"
            )));
        }
        for change in changes {
            change.push_args(&mut args);
        }
        if args.is_empty() {
            return Ok(Updated::NotLoaded);
        }
        let reply: i64 = self
            .scripts
            .account_update
            .evalsha_with_reload(self.client(), keys, args)
            .await?;
        Ok(match reply {
            1 => Updated::Applied,
            2 => Updated::Gated,
            _ => Updated::NotLoaded,
        })
    }

    /// Takes back up to `tokens` purchased tokens, not below zero, once per
    /// `once`, and returns how many were taken (by the first call, for a
    /// repeated one); `None` when the account is not loaded (see
    /// `lua/account_take.lua`).
    pub async fn take_purchased(
        &self,
        customer: Uuid,
        once: &Once,
        tokens: i64,
    ) -> Result<Option<i64>, HotError> {
        let taken: i64 = self
            .scripts
            .account_take
            .evalsha_with_reload(
                self.client(),
                vec![
                    self.keys.account(customer),
                    self.keys.once(customer, once.as_str()),
                ],
                vec![Value::from(tokens), Value::from(ONCE_TTL_SECS)],
            )
            .await?;
        Ok((taken >= 0).then_some(taken))
    }

    /// Starts a new billing period, once (see `lua/account_rollover.lua`).
    pub async fn rollover(
        &self,
        customer: Uuid,
        rollover: &Rollover,
    ) -> Result<RolloverOutcome, HotError> {
        let args: Vec<Value> = vec![
            rollover.start_ms.into(),
            rollover.period.end_ms.into(),
            rollover.period.next_end_ms.into(),
            rollover.allowance.into(),
            rollover.period.next_allowance.into(),
        ];
        let outcome: i64 = self
            .scripts
            .account_rollover
            .evalsha_with_reload(self.client(), vec![self.keys.account(customer)], args)
            .await?;
        Ok(match outcome {
            1 => RolloverOutcome::Started,
            2 => RolloverOutcome::AlreadyStarted,
            _ => RolloverOutcome::Nothing,
        })
    }

    /// The live balance, or `None` when the account is not loaded. A
    /// period that has ended is read as the consume script would charge it:
    /// the next one's, from zero.
    pub async fn balance(&self, customer: Uuid) -> Result<Option<Balance>, HotError> {
        use fred::prelude::*;
        let fields: Vec<Option<i64>> = self
            .client()
            .hmget(
                self.keys.account(customer),
                vec![
                    "allowance",
                    "used",
                    "purchased",
                    "period_end",
                    "next_end",
                    "next_allowance",
                ],
            )
            .await?;
        let [Some(allowance), Some(used), Some(purchased), period_end, next_end, next_allowance] =
            fields[..]
        else {
            return Ok(None);
        };
        let ended = period_end.is_some_and(|end| end > 0 && self.redis_now_ms() >= end)
            && next_end > period_end;
        Ok(Some(match (ended, next_allowance) {
            (true, Some(next_allowance)) => Balance {
                allowance: next_allowance,
                used: 0,
                purchased,
            },
            _ => Balance {
                allowance,
                used,
                purchased,
            },
        }))
    }

    pub async fn is_loaded(&self, customer: Uuid) -> Result<bool, HotError> {
        use fred::prelude::*;
        let loaded: bool = self
            .client()
            .hexists(self.keys.account(customer), "allowance")
            .await?;
        Ok(loaded)
    }
}
