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
    /// Epoch ms at which an active subscription ends with its period
    /// (`cancel_at_period_end`); 0 = it goes on.
    pub closes_at_ms: i64,
    /// Slugs of the apps whose activation is active.
    pub active_apps: Vec<String>,
    /// Live embed keys and their expiry (epoch ms, 0 = never).
    pub embed_keys: Vec<(Uuid, i64)>,
    /// The billing period's end and the next one's, with its allowance.
    pub period: Option<Period>,
    /// When the billing period began (epoch ms, 0 = no period).
    pub period_start_ms: i64,
    /// The usage alert thresholds (percent of the allowance), comma-
    /// separated; empty for none.
    pub alert_at: String,
    /// The thresholds already crossed this period, comma-separated.
    pub alerted: String,
}

/// A billing period's end, as the consume script reads it (epoch ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub end_ms: i64,
    /// The ends of the periods after it, ascending; the script starts the
    /// one a consume falls in itself, however many boundaries have passed.
    /// Empty when no period follows (a subscription ending with this one).
    pub next_ends_ms: Vec<i64>,
    /// The allowance of the periods after this one (a downgrade's, once
    /// one is scheduled).
    pub next_allowance: i64,
}

impl Period {
    /// `next_ends` as the scripts read it: comma-separated.
    fn next_ends_arg(&self) -> String {
        let ends: Vec<String> = self.next_ends_ms.iter().map(i64::to_string).collect();
        ends.join(",")
    }
}

/// The start of a new period, for `lua/account_rollover.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollover {
    /// The old period's end, epoch ms: the key of the rollover.
    pub start_ms: i64,
    pub allowance: i64,
    /// The new period's end and its successor.
    pub period: Period,
    /// The period of a new subscription (after a cancellation, or
    /// replacing an operator's plan): started from zero even when the old
    /// period ends at the same instant, which would otherwise read as the
    /// same period started already.
    pub new_subscription: bool,
}

/// What a rollover found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloverOutcome {
    /// Usage reset, the new period started.
    Started,
    /// A new subscription's period started from zero at this instant
    /// (epoch ms, Redis's clock): charges stamped before it were the old
    /// subscription's.
    StartedAt(i64),
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
        ending_at(
            self.status,
            self.status.open_until(self.grace_until_ms),
            self.closes_at_ms,
        )
    }
}

/// `open_until` of a subscription that ends with its period at
/// `closes_at_ms` (0: it does not): open until that end when active, and
/// past due, no later than its grace or its end, whichever comes first.
pub fn ending_at(status: SubscriptionStatus, open_until: i64, closes_at_ms: i64) -> i64 {
    match status {
        _ if closes_at_ms <= 0 => open_until,
        SubscriptionStatus::Active => closes_at_ms,
        SubscriptionStatus::PastDue => open_until.min(closes_at_ms),
        _ => open_until,
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
    /// replaces ours mid-way: only while the account is still in the
    /// period ending at `replacing_ms`.
    SetPeriod {
        period: Period,
        replacing_ms: i64,
    },
    /// The allowance of the period ending at `period_end_ms` (-1 =
    /// unlimited): only while the account is in that period, never in the
    /// next one the consume script may have started meanwhile.
    SetAllowance {
        allowance: i64,
        period_end_ms: i64,
    },
    /// The allowance of the period after this one.
    SetNextAllowance(i64),
    /// The subscription's state as `open_until` (see [`AccountState`]).
    SetOpenUntil(i64),
    /// The usage alert thresholds (percent of the allowance, comma-
    /// separated; empty for none).
    SetAlerts(String),
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

    /// A dispute taking back a purchase's tokens.
    pub fn dispute(dispute: &str) -> Self {
        Self(format!("dispute:{dispute}"))
    }

    /// A dispute won, giving them back.
    pub fn dispute_won(dispute: &str) -> Self {
        Self(format!("dispute-won:{dispute}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What an update is applied under (see `lua/account_update.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate<'a> {
    /// Once per id.
    Once(&'a Once),
    /// Undoes what was done once.
    Forget(&'a Once),
    /// Only while the account is in the period ending then (epoch ms).
    Period(i64),
}

impl AccountChange {
    fn gate(&self) -> Option<Gate<'_>> {
        match self {
            Self::CreditPurchased { once, .. } => Some(Gate::Once(once)),
            Self::Forget(once) => Some(Gate::Forget(once)),
            Self::SetPeriod { replacing_ms, .. } => Some(Gate::Period(*replacing_ms)),
            Self::SetAllowance { period_end_ms, .. } => Some(Gate::Period(*period_end_ms)),
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
            Self::SetPeriod { period, .. } => {
                op("set", "period_end".into(), period.end_ms.into());
                op("set", "next_ends".into(), period.next_ends_arg().into());
                op("set", "next_allowance".into(), period.next_allowance.into());
                // The usage alerts' next mark depends on the period and
                // the allowance: recomputed by the next consume.
                op("del", "alert_next".into(), "".into());
            }
            Self::SetAllowance { allowance, .. } => {
                op("set", "allowance".into(), (*allowance).into());
                op("del", "alert_next".into(), "".into());
            }
            Self::SetNextAllowance(n) => op("set", "next_allowance".into(), (*n).into()),
            Self::SetOpenUntil(ms) => op("set", "open_until".into(), (*ms).into()),
            Self::SetAlerts(thresholds) => {
                op("set", "alert_at".into(), thresholds.as_str().into());
                op("del", "alert_next".into(), "".into());
            }
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
            "period_start".into(),
            state.period_start_ms.into(),
            "alert_at".into(),
            state.alert_at.as_str().into(),
            "alerted".into(),
            state.alerted.as_str().into(),
        ];
        for slug in &state.active_apps {
            args.push(format!("app:{slug}").into());
            args.push("1".into());
        }
        for (id, expires) in &state.embed_keys {
            args.push(format!("key:{id}").into());
            args.push((*expires).into());
        }
        if let Some(period) = &state.period {
            args.extend([
                "period_end".into(),
                period.end_ms.into(),
                "next_ends".into(),
                period.next_ends_arg().into(),
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
    /// for the next rebuild, which reads the change from Postgres. Changes
    /// under the same gate go in one script call, the ungated ones in
    /// another. At most one change of an update may be done once (see
    /// [`Once`]); what it says is what the update returns.
    pub async fn update_account(
        &self,
        customer: Uuid,
        changes: &[AccountChange],
    ) -> Result<Updated, HotError> {
        let mut groups: Vec<(Option<Gate<'_>>, Vec<&AccountChange>)> = Vec::new();
        for change in changes {
            let gate = change.gate();
            match groups.iter_mut().find(|(g, _)| *g == gate) {
                Some((_, group)) => group.push(change),
                None => groups.push((gate, vec![change])),
            }
        }
        // The change done once goes last: its answer is the update's.
        groups.sort_by_key(|(gate, _)| matches!(gate, Some(Gate::Once(_) | Gate::Forget(_))));
        let once_gates = groups
            .iter()
            .filter(|(gate, _)| matches!(gate, Some(Gate::Once(_) | Gate::Forget(_))))
            .count();
        if once_gates > 1 {
            return Err(HotError::Internal(anyhow::anyhow!(
                "an account update takes one change done once: {changes:?}"
            )));
        }
        // The change done once decides the answer; without one, whether
        // anything applied.
        let mut result = Updated::NotLoaded;
        for (gate, group) in groups {
            let updated = self.update_group(customer, gate, &group).await?;
            if matches!(gate, Some(Gate::Once(_) | Gate::Forget(_))) {
                return Ok(updated);
            }
            if updated == Updated::Applied || result == Updated::NotLoaded {
                result = updated;
            }
        }
        Ok(result)
    }

    /// One script call: `changes`, under `gate`.
    async fn update_group(
        &self,
        customer: Uuid,
        gate: Option<Gate<'_>>,
        changes: &[&AccountChange],
    ) -> Result<Updated, HotError> {
        let mut keys = vec![self.keys.account(customer)];
        let mut args = Vec::with_capacity(changes.len() * 3 + 3);
        match gate {
            Some(Gate::Once(once)) | Some(Gate::Forget(once)) => {
                let op = if matches!(gate, Some(Gate::Once(_))) {
                    "once"
                } else {
                    "forget"
                };
                args.extend([op.into(), "".into(), ONCE_TTL_SECS.into()]);
                keys.push(self.keys.once(customer, once.as_str()));
            }
            Some(Gate::Period(end_ms)) => args.extend(["period".into(), "".into(), end_ms.into()]),
            None => {}
        }
        let gated = args.len();
        for change in changes {
            change.push_args(&mut args);
        }
        if args.len() == gated && !matches!(gate, Some(Gate::Once(_) | Gate::Forget(_))) {
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
            rollover.period.next_ends_arg().into(),
            rollover.allowance.into(),
            rollover.period.next_allowance.into(),
            i64::from(rollover.new_subscription).into(),
        ];
        let outcome: i64 = self
            .scripts
            .account_rollover
            .evalsha_with_reload(self.client(), vec![self.keys.account(customer)], args)
            .await?;
        Ok(match outcome {
            1 => RolloverOutcome::Started,
            2 => RolloverOutcome::AlreadyStarted,
            at if at > 2 => RolloverOutcome::StartedAt(at),
            _ => RolloverOutcome::Nothing,
        })
    }

    /// The live balance, or `None` when the account is not loaded. A
    /// period that has ended is read as the consume script would charge it:
    /// the one now falls in, from zero.
    pub async fn balance(&self, customer: Uuid) -> Result<Option<Balance>, HotError> {
        use fred::prelude::*;
        let fields: Vec<Value> = self
            .client()
            .hmget(
                self.keys.account(customer),
                vec![
                    "allowance",
                    "used",
                    "purchased",
                    "period_end",
                    "next_ends",
                    "next_allowance",
                ],
            )
            .await?;
        let int = |i: usize| fields.get(i).and_then(Value::as_i64);
        let (allowance, used, purchased, period_end, next_allowance) =
            (int(0), int(1), int(2), int(3), int(5));
        let next_ends = fields.get(4).and_then(Value::as_string);
        let (Some(allowance), Some(used), Some(purchased)) = (allowance, used, purchased) else {
            return Ok(None);
        };
        let now = self.redis_now_ms();
        let ended = period_end.is_some_and(|end| end > 0 && now >= end);
        let later_period = next_ends
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .any(|e| e.parse::<i64>().is_ok_and(|end| end > now));
        Ok(Some(match (ended && later_period, next_allowance) {
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
