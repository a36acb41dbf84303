//! Random operation sequences through the real consume script, checked
//! against a plain Rust model of the balance rules.

use std::collections::{HashMap, HashSet};

use connected_apps::{
    config::{Limit, Settings},
    hot::{
        account::{AccountChange, AccountState, Once, SubscriptionStatus, Updated},
        charge::{Charge, ChargeOutcome, Idempotency, KeyCharge},
        HotStore,
    },
};
use proptest::prelude::*;
use uuid::Uuid;

const APPS: [&str; 3] = ["a0-001", "a1-001", "a2-001"];

/// One use of an app: which app, how many tokens, with which embed key
/// (else a JWT), under which Idempotency-Key and body.
#[derive(Debug, Clone)]
struct Use {
    app: usize,
    tokens: i64,
    key: Option<usize>,
    idem: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
enum Op {
    Consume(Use),
    /// Uses charged in one script call, as concurrent consumes of a shard
    /// are (hot/coalesce.rs): each must be answered as if it came alone,
    /// in order.
    Batch(Vec<Use>),
    AddPurchased(i64),
    /// A refund taking back up to this many purchased tokens.
    Refund(i64),
    Activate(usize),
    Deactivate(usize),
    RevokeKey(usize),
}

fn a_use() -> impl Strategy<Value = Use> {
    (
        0..3usize,
        1..400i64,
        proptest::option::of(0..3usize),
        proptest::option::of((0..3usize, 0..2usize)),
    )
        .prop_map(|(app, tokens, key, idem)| Use {
            app,
            tokens,
            key,
            idem,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => a_use().prop_map(Op::Consume),
        2 => proptest::collection::vec(a_use(), 2..12).prop_map(Op::Batch),
        1 => (1..500i64).prop_map(Op::AddPurchased),
        1 => (1..500i64).prop_map(Op::Refund),
        1 => (0..3usize).prop_map(Op::Activate),
        1 => (0..3usize).prop_map(Op::Deactivate),
        1 => (0..3usize).prop_map(Op::RevokeKey),
    ]
}

fn status() -> impl Strategy<Value = (SubscriptionStatus, bool)> {
    prop_oneof![
        4 => Just((SubscriptionStatus::Active, false)),
        1 => Just((SubscriptionStatus::None, false)),
        1 => Just((SubscriptionStatus::PastDue, true)),
        1 => Just((SubscriptionStatus::PastDue, false)),
        1 => Just((SubscriptionStatus::Canceled, false)),
        1 => Just((SubscriptionStatus::Unpaid, false)),
    ]
}

/// The balance rules of API.md, in plain Rust.
struct Model {
    allowance: i64,
    used: i64,
    purchased: i64,
    usable: bool,
    apps: HashSet<usize>,
    keys: HashSet<usize>,
    /// (idempotency key) -> (fingerprint, tokens, remaining)
    idem: HashMap<usize, (usize, i64, i64)>,
}

impl Model {
    fn remaining(&self) -> i64 {
        if self.allowance < 0 {
            -1
        } else {
            (self.allowance - self.used).max(0) + self.purchased
        }
    }

    fn consume(
        &mut self,
        &Use {
            app,
            tokens,
            key,
            idem,
        }: &Use,
    ) -> ChargeOutcome {
        if let Some((k, fp)) = idem {
            if let Some(&(first_fp, t, r)) = self.idem.get(&k) {
                return if first_fp == fp {
                    ChargeOutcome::Replayed {
                        event_id: Uuid::nil(),
                        tokens: t,
                        tokens_remaining: r,
                    }
                } else {
                    ChargeOutcome::IdempotencyConflict
                };
            }
        }
        if key.is_some_and(|k| !self.keys.contains(&k)) {
            return ChargeOutcome::EmbedKeyRevoked;
        }
        if !self.apps.contains(&app) {
            return ChargeOutcome::AppNotActive;
        }
        if !self.usable {
            return ChargeOutcome::SubscriptionInactive;
        }
        let mut from_purchased = 0;
        if self.allowance >= 0 {
            let left = (self.allowance - self.used).max(0);
            if left + self.purchased < tokens {
                return ChargeOutcome::InsufficientTokens {
                    tokens_remaining: left + self.purchased,
                };
            }
            from_purchased = (tokens - left).max(0);
        }
        self.used += tokens - from_purchased;
        self.purchased -= from_purchased;
        if let Some((k, fp)) = idem {
            self.idem.insert(k, (fp, tokens, self.remaining()));
        }
        ChargeOutcome::Charged {
            tokens_remaining: self.remaining(),
            from_purchased,
            at_ms: 0,
        }
    }
}

/// Outcomes compared without the parts only Redis can know (ids, clocks).
fn comparable(outcome: ChargeOutcome) -> ChargeOutcome {
    match outcome {
        ChargeOutcome::Charged {
            tokens_remaining,
            from_purchased,
            ..
        } => ChargeOutcome::Charged {
            tokens_remaining,
            from_purchased,
            at_ms: 0,
        },
        ChargeOutcome::Replayed {
            tokens,
            tokens_remaining,
            ..
        } => ChargeOutcome::Replayed {
            event_id: Uuid::nil(),
            tokens,
            tokens_remaining,
        },
        other => other,
    }
}

async fn hot_store(prefix: &str) -> HotStore {
    let vars = [
        ("REDIS_URL".to_owned(), crate::helpers::redis_url()),
        ("REDIS_KEY_PREFIX".to_owned(), prefix.to_owned()),
        ("REDIS_TIMEOUT_MS".to_owned(), "2000".to_owned()),
    ]
    .into_iter()
    .collect();
    HotStore::connect(&Settings::from_map(&vars).unwrap().redis)
        .await
        .unwrap()
}

/// A use's Idempotency-Key and body fingerprint, as strings.
fn idempotency(one: &Use) -> (Option<String>, Option<String>) {
    (
        one.idem.map(|(k, _)| format!("idem-{k}")),
        one.idem.map(|(_, fp)| format!("fp{fp}")),
    )
}

/// The charge the consume endpoint would build for `one`.
fn charge_of<'a>(
    one: &Use,
    customer: Uuid,
    app_id: Uuid,
    key_ids: &[Uuid],
    idem_key: &'a Option<String>,
    fingerprint: &'a Option<String>,
) -> Charge<'a> {
    Charge {
        customer,
        app_slug: APPS[one.app],
        app_id,
        tokens: one.tokens,
        event_id: Uuid::now_v7(),
        embed_key: one.key.map(|k| KeyCharge {
            id: key_ids[k],
            limit: Limit::NONE,
        }),
        idempotency: idem_key
            .as_deref()
            .zip(fingerprint.as_deref())
            .map(|(key, fingerprint)| Idempotency {
                key,
                fingerprint,
                ttl_secs: 60,
            }),
        session_id: Some("s"),
        metadata: None,
        customer_limit: Limit::NONE,
    }
}

async fn run_case(
    hot: &HotStore,
    allowance: i64,
    used: i64,
    purchased: i64,
    (status, in_grace): (SubscriptionStatus, bool),
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let customer = Uuid::new_v4();
    let key_ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let now = chrono::Utc::now().timestamp_millis();
    let state = AccountState {
        allowance,
        used,
        purchased,
        status,
        grace_until_ms: if in_grace { now + 3_600_000 } else { now - 1 },
        active_apps: vec![APPS[0].to_owned(), APPS[1].to_owned()],
        embed_keys: key_ids.iter().map(|id| (*id, 0)).collect(),
        period: None,
        period_start_ms: 0,
        closes_at_ms: 0,
        alert_at: String::new(),
        alerted: String::new(),
    };
    prop_assert!(hot.load_account(customer, &state).await.unwrap());
    let mut model = Model {
        allowance,
        used,
        purchased,
        usable: matches!(
            status,
            SubscriptionStatus::Active | SubscriptionStatus::None
        ) || (status == SubscriptionStatus::PastDue && in_grace),
        apps: [0, 1].into_iter().collect(),
        keys: [0, 1, 2].into_iter().collect(),
        idem: HashMap::new(),
    };
    let app_id = Uuid::new_v4();

    for op in ops {
        match op {
            Op::Consume(one) => {
                let (idem_key, fingerprint) = idempotency(&one);
                let charge = charge_of(&one, customer, app_id, &key_ids, &idem_key, &fingerprint);
                let got = comparable(hot.charge(&charge).await.unwrap());
                prop_assert_eq!(got, model.consume(&one));
            }
            Op::Batch(uses) => {
                let idempotency: Vec<_> = uses.iter().map(idempotency).collect();
                let charges: Vec<_> = uses
                    .iter()
                    .zip(&idempotency)
                    .map(|(one, (key, fp))| charge_of(one, customer, app_id, &key_ids, key, fp))
                    .collect();
                let got: Vec<_> = hot
                    .charge_all(&charges)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|outcome| comparable(outcome.unwrap()))
                    .collect();
                let expected: Vec<_> = uses.iter().map(|one| model.consume(one)).collect();
                prop_assert_eq!(got, expected);
            }
            Op::AddPurchased(n) => {
                // A credit, then its retry: credited once.
                let credit = [AccountChange::CreditPurchased {
                    tokens: n,
                    once: Once::grant(Uuid::new_v4()),
                }];
                prop_assert_eq!(
                    hot.update_account(customer, &credit).await.unwrap(),
                    Updated::Applied
                );
                prop_assert_eq!(
                    hot.update_account(customer, &credit).await.unwrap(),
                    Updated::Gated
                );
                model.purchased += n;
            }
            Op::Refund(n) => {
                let once = Once::refund(&format!("pi_{}", Uuid::new_v4().simple()), 1);
                let taken = hot.take_purchased(customer, &once, n).await.unwrap();
                let expected = n.min(model.purchased.max(0));
                prop_assert_eq!(taken, Some(expected), "only unspent tokens come back");
                let retried = hot.take_purchased(customer, &once, n).await.unwrap();
                prop_assert_eq!(
                    retried,
                    taken,
                    "a retry is told the first take, takes nothing"
                );
                model.purchased -= expected;
            }
            Op::Activate(app) => {
                hot.update_account(customer, &[AccountChange::ActivateApp(APPS[app].into())])
                    .await
                    .unwrap();
                model.apps.insert(app);
            }
            Op::Deactivate(app) => {
                hot.update_account(customer, &[AccountChange::DeactivateApp(APPS[app].into())])
                    .await
                    .unwrap();
                model.apps.remove(&app);
            }
            Op::RevokeKey(k) => {
                hot.update_account(customer, &[AccountChange::RemoveEmbedKey(key_ids[k])])
                    .await
                    .unwrap();
                model.keys.remove(&k);
            }
        }
    }
    Ok(())
}

#[test]
fn the_consume_script_agrees_with_the_model_on_random_operation_sequences() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let prefix = format!("t{}", &Uuid::new_v4().simple().to_string()[..12]);
    let hot = rt.block_on(hot_store(&prefix));
    let config = ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        allowance in prop_oneof![Just(-1i64), 0..2000i64],
        used in 0..1500i64,
        purchased in 0..500i64,
        status in status(),
        ops in proptest::collection::vec(op(), 1..60),
    )| {
        rt.block_on(run_case(&hot, allowance, used, purchased, status, ops))?;
    });
    rt.block_on(async {
        use fred::prelude::*;
        let redis = Builder::from_config(Config::from_url(&crate::helpers::redis_url()).unwrap())
            .build()
            .unwrap();
        redis.init().await.unwrap();
        crate::helpers::delete_keys(&redis, &format!("{prefix}:*")).await;
    });
}
