//! Random operation sequences through the real consume script, checked
//! against a plain Rust model of the balance rules. Each sequence runs
//! over three shops, in three shards on one Redis server (in a cluster, in
//! one shard: a call stays within a slot there), so a batch carries the
//! charges of several shops, and of several shards, as the coalescer sends
//! them.

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
const SHOPS: usize = 3;

/// One use of an app: by which shop, which app, how many tokens, with which
/// embed key (else a JWT), under which Idempotency-Key and body.
#[derive(Debug, Clone)]
struct Use {
    shop: usize,
    app: usize,
    tokens: i64,
    key: Option<usize>,
    idem: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
enum Op {
    Consume(Use),
    /// Uses charged in one script call, as concurrent consumes are
    /// (hot/coalesce.rs): each must be answered as if it came alone, in
    /// order.
    Batch(Vec<Use>),
    /// The rest: (shop, what).
    AddPurchased(usize, i64),
    /// A refund taking back up to this many purchased tokens.
    Refund(usize, i64),
    Activate(usize, usize),
    Deactivate(usize, usize),
    RevokeKey(usize, usize),
}

fn a_use() -> impl Strategy<Value = Use> {
    (
        0..SHOPS,
        0..3usize,
        1..400i64,
        proptest::option::of(0..3usize),
        proptest::option::of((0..3usize, 0..2usize)),
    )
        .prop_map(|(shop, app, tokens, key, idem)| Use {
            shop,
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
        1 => (0..SHOPS, 1..500i64).prop_map(|(shop, n)| Op::AddPurchased(shop, n)),
        1 => (0..SHOPS, 1..500i64).prop_map(|(shop, n)| Op::Refund(shop, n)),
        1 => (0..SHOPS, 0..3usize).prop_map(|(shop, app)| Op::Activate(shop, app)),
        1 => (0..SHOPS, 0..3usize).prop_map(|(shop, app)| Op::Deactivate(shop, app)),
        1 => (0..SHOPS, 0..3usize).prop_map(|(shop, key)| Op::RevokeKey(shop, key)),
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
            shop: _,
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

/// A shop's state when its sequence starts: allowance (-1 unlimited),
/// used, purchased, and its subscription's status (with whether a past-due
/// one is within its grace).
type Start = (i64, i64, i64, (SubscriptionStatus, bool));

fn start() -> impl Strategy<Value = Start> {
    (
        prop_oneof![Just(-1i64), 0..2000i64],
        0..1500i64,
        0..500i64,
        status(),
    )
}

/// A shop of the sequence: its id, its embed keys, and its model.
struct Shop {
    id: Uuid,
    key_ids: Vec<Uuid>,
    model: Model,
}

/// Loads a shop in `shard` from `start`.
async fn open_shop(
    hot: &HotStore,
    shard: u16,
    (allowance, used, purchased, (status, in_grace)): Start,
) -> Result<Shop, TestCaseError> {
    let id = std::iter::repeat_with(Uuid::new_v4)
        .find(|id| hot.keys().shard_of(*id) == shard)
        .unwrap();
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
    prop_assert!(hot.load_account(id, &state).await.unwrap());
    let model = Model {
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
    Ok(Shop { id, key_ids, model })
}

async fn run_case(hot: &HotStore, starts: Vec<Start>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    // Three shards on one server; one shard, the first shop's, in a cluster.
    let mut shops: Vec<Shop> = Vec::new();
    for (n, start) in starts.into_iter().enumerate() {
        let shard = match shops.first() {
            Some(first) if hot.clustered() => hot.keys().shard_of(first.id),
            _ => n as u16 % hot.keys().shards(),
        };
        shops.push(open_shop(hot, shard, start).await?);
    }
    let app_id = Uuid::new_v4();
    /// The charge of `one` by its shop.
    fn charge_by<'a>(
        shops: &[Shop],
        app_id: Uuid,
        one: &Use,
        idem_key: &'a Option<String>,
        fingerprint: &'a Option<String>,
    ) -> Charge<'a> {
        let shop = &shops[one.shop];
        charge_of(one, shop.id, app_id, &shop.key_ids, idem_key, fingerprint)
    }

    for op in ops {
        match op {
            Op::Consume(one) => {
                let (idem_key, fingerprint) = idempotency(&one);
                let charge = charge_by(&shops, app_id, &one, &idem_key, &fingerprint);
                let got = comparable(hot.charge(&charge).await.unwrap());
                prop_assert_eq!(got, shops[one.shop].model.consume(&one));
            }
            Op::Batch(uses) => {
                let idempotency: Vec<_> = uses.iter().map(idempotency).collect();
                let charges: Vec<_> = uses
                    .iter()
                    .zip(&idempotency)
                    .map(|(one, (key, fp))| charge_by(&shops, app_id, one, key, fp))
                    .collect();
                let got: Vec<_> = hot
                    .charge_all(&charges)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|outcome| comparable(outcome.unwrap()))
                    .collect();
                let expected: Vec<_> = uses
                    .iter()
                    .map(|one| shops[one.shop].model.consume(one))
                    .collect();
                prop_assert_eq!(got, expected);
            }
            Op::AddPurchased(shop, n) => {
                let shop = &mut shops[shop];
                // A credit, then its retry: credited once.
                let credit = [AccountChange::CreditPurchased {
                    tokens: n,
                    once: Once::grant(Uuid::new_v4()),
                }];
                prop_assert_eq!(
                    hot.update_account(shop.id, &credit).await.unwrap(),
                    Updated::Applied
                );
                prop_assert_eq!(
                    hot.update_account(shop.id, &credit).await.unwrap(),
                    Updated::Gated
                );
                shop.model.purchased += n;
            }
            Op::Refund(shop, n) => {
                let shop = &mut shops[shop];
                let once = Once::refund(&format!("pi_{}", Uuid::new_v4().simple()), 1);
                let taken = hot.take_purchased(shop.id, &once, n).await.unwrap();
                let expected = n.min(shop.model.purchased.max(0));
                prop_assert_eq!(taken, Some(expected), "only unspent tokens come back");
                let retried = hot.take_purchased(shop.id, &once, n).await.unwrap();
                prop_assert_eq!(
                    retried,
                    taken,
                    "a retry is told the first take, takes nothing"
                );
                shop.model.purchased -= expected;
            }
            Op::Activate(shop, app) => {
                let shop = &mut shops[shop];
                hot.update_account(shop.id, &[AccountChange::ActivateApp(APPS[app].into())])
                    .await
                    .unwrap();
                shop.model.apps.insert(app);
            }
            Op::Deactivate(shop, app) => {
                let shop = &mut shops[shop];
                hot.update_account(shop.id, &[AccountChange::DeactivateApp(APPS[app].into())])
                    .await
                    .unwrap();
                shop.model.apps.remove(&app);
            }
            Op::RevokeKey(shop, k) => {
                let shop = &mut shops[shop];
                hot.update_account(shop.id, &[AccountChange::RemoveEmbedKey(shop.key_ids[k])])
                    .await
                    .unwrap();
                shop.model.keys.remove(&k);
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
        starts in proptest::collection::vec(start(), SHOPS),
        ops in proptest::collection::vec(op(), 1..60),
    )| {
        rt.block_on(run_case(&hot, starts, ops))?;
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
