//! The steps a simulation is made of, and how a seed draws them.
//!
//! A sequence is a function of its seed and length alone, so a failure
//! replays from the seed it prints (`SIM_SEED`), and a shrunk sequence is
//! printed whole.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// The merchants of a run: shops 0 and 1 pay through Stripe, shop 2 is
/// billed by an operator (Professional, rolled by the scheduler).
pub const SHOPS: usize = 3;
pub const OPERATOR_SHOP: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Card {
    /// Pays (`pm_card_visa`).
    Pays,
    /// Declines every charge (`pm_card_chargeDeclined`).
    Declines,
    /// Needs 3-D Secure (`pm_card_authenticationRequired`).
    ThreeDs,
}

impl Card {
    pub fn id(self) -> &'static str {
        match self {
            Card::Pays => "pm_card_visa",
            Card::Declines => "pm_card_chargeDeclined",
            Card::ThreeDs => "pm_card_authenticationRequired",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every queued event, in order.
    InOrder,
    /// Every queued event, shuffled.
    Shuffled,
    /// Every queued event, each twice.
    Twice,
    /// Half of them now; the rest wait for a later delivery.
    HoldHalf,
    /// The subscription events never arrive (the reconciliation is the
    /// net); the rest in order.
    DropSubscriptionEvents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Subscribe {
        shop: usize,
        plan: &'static str,
        card: Card,
    },
    ChangePlan {
        shop: usize,
        plan: &'static str,
    },
    Cancel {
        shop: usize,
        at_once: bool,
    },
    /// The customer's card for renewals from now on.
    SetCard {
        card: Card,
    },
    Buy {
        shop: usize,
        tokens: i64,
        card: Card,
    },
    /// The shop's oldest purchase waiting for 3-D Secure is confirmed.
    Confirm {
        shop: usize,
    },
    Refund {
        shop: usize,
        purchase: usize,
        percent: i64,
    },
    OpenDispute {
        shop: usize,
        purchase: usize,
    },
    CloseDispute {
        shop: usize,
        purchase: usize,
        won: bool,
    },
    /// A consume with a JWT, or with the shop's embed key; `retried`:
    /// sent twice under one Idempotency-Key.
    Consume {
        shop: usize,
        tokens: i64,
        embed_key: bool,
        retried: bool,
    },
    Grant {
        shop: usize,
        tokens: i64,
    },
    /// Time passes across this many period boundaries (0: a moment).
    Advance {
        boundaries: u32,
    },
    Deliver(Delivery),
    Reconcile,
    /// The scheduler's rollover runs (it is down between its runs).
    Scheduler,
    /// Redis loses one shop's account hash (eviction, a restart without
    /// AOF); the next request rebuilds it.
    WipeAccount {
        shop: usize,
    },
    /// The flusher writes what is in the streams; `killed`: one is killed
    /// mid-batch first.
    Flush {
        killed: bool,
    },
    /// Stripe refuses the next writing call (500, nothing done), or does
    /// it and the reply is lost.
    StripeFails {
        lose_reply: bool,
    },
    /// Stripe answers subscription calls this slowly until the next such
    /// step (0: at once again).
    StripeSlow {
        millis: u64,
    },
}

const PLANS: [&str; 3] = ["starter", "professional", "enterprise"];

fn card(rng: &mut StdRng) -> Card {
    match rng.gen_range(0..10) {
        0 | 1 => Card::Declines,
        2 => Card::ThreeDs,
        _ => Card::Pays,
    }
}

fn stripe_shop(rng: &mut StdRng) -> usize {
    rng.gen_range(0..OPERATOR_SHOP)
}

/// One step, drawn with the weights below.
fn step(rng: &mut StdRng) -> Step {
    let plan = PLANS[rng.gen_range(0..PLANS.len())];
    match rng.gen_range(0..100) {
        0..=7 => Step::Subscribe {
            shop: stripe_shop(rng),
            plan,
            card: card(rng),
        },
        8..=11 => Step::ChangePlan {
            shop: stripe_shop(rng),
            plan,
        },
        12..=14 => Step::Cancel {
            shop: stripe_shop(rng),
            at_once: rng.gen_bool(0.5),
        },
        15 => Step::SetCard { card: card(rng) },
        16..=20 => Step::Buy {
            shop: rng.gen_range(0..SHOPS),
            tokens: rng.gen_range(1..=20) * 100,
            card: card(rng),
        },
        21..=22 => Step::Confirm {
            shop: rng.gen_range(0..SHOPS),
        },
        23..=24 => Step::Refund {
            shop: rng.gen_range(0..SHOPS),
            purchase: rng.gen_range(0..4),
            percent: [25, 50, 100][rng.gen_range(0..3)],
        },
        25 => Step::OpenDispute {
            shop: rng.gen_range(0..SHOPS),
            purchase: rng.gen_range(0..4),
        },
        26 => Step::CloseDispute {
            shop: rng.gen_range(0..SHOPS),
            purchase: rng.gen_range(0..4),
            won: rng.gen_bool(0.5),
        },
        27..=58 => Step::Consume {
            shop: rng.gen_range(0..SHOPS),
            tokens: [1, 2, 50, 200, 700, 2_500][rng.gen_range(0..6)],
            embed_key: rng.gen_bool(0.25),
            retried: rng.gen_bool(0.15),
        },
        59..=60 => Step::Grant {
            shop: rng.gen_range(0..SHOPS),
            tokens: rng.gen_range(1..=5) * 100,
        },
        61..=67 => Step::Advance {
            boundaries: rng.gen_range(0..=3),
        },
        68..=78 => Step::Deliver(match rng.gen_range(0..10) {
            0..=3 => Delivery::InOrder,
            4 | 5 => Delivery::Shuffled,
            6 => Delivery::Twice,
            7 | 8 => Delivery::HoldHalf,
            _ => Delivery::DropSubscriptionEvents,
        }),
        79..=80 => Step::Reconcile,
        81..=83 => Step::Scheduler,
        84..=86 => Step::WipeAccount {
            shop: rng.gen_range(0..SHOPS),
        },
        87..=94 => Step::Flush {
            killed: rng.gen_bool(0.3),
        },
        95 => Step::StripeSlow {
            millis: [0, 0, 300, 1_500][rng.gen_range(0..4)],
        },
        _ => Step::StripeFails {
            lose_reply: rng.gen_bool(0.5),
        },
    }
}

/// The sequence of `length` steps a seed draws.
pub fn sequence(seed: u64, length: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..length).map(|_| step(&mut rng)).collect()
}

/// A random order of `n` items, from the seed and the step's position.
pub fn shuffled<T>(items: &mut [T], seed: u64) {
    use rand::seq::SliceRandom;
    items.shuffle(&mut StdRng::seed_from_u64(seed));
}
