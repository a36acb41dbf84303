//! The billing simulation: random sequences of what merchants, Stripe,
//! time and failures do, run against the real service (real Redis, real
//! PostgreSQL, the real flusher and scheduler) and Stripe's stand-in on a
//! test clock whose periods last two seconds, with the books checked
//! after every step (`simulation/world.rs` names the invariants).
//!
//! A failing sequence is shrunk (steps taken away while it still fails)
//! and printed whole with its seed; `SIM_SEED=<seed>` replays it. The
//! test suite runs a few sequences; `scripts/simulate.sh` runs many:
//!
//! - `SIM_SEQUENCES`: sequences to run (default 4);
//! - `SIM_STEPS`: steps in each (default 40);
//! - `SIM_SEED`: the first sequence's seed (default: drawn, and printed);
//!   sequence `i` uses seed + i;
//! - `SIM_PARALLEL`: sequences at once (default 2), each with its own
//!   database, Redis prefix and stand-in.

#[path = "api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "api/stripe_clock.rs"]
mod stripe_clock;
#[path = "api/stripe_standin.rs"]
#[allow(dead_code)]
mod stripe_standin;

#[path = "simulation/steps.rs"]
mod steps;
#[path = "simulation/world.rs"]
mod world;

use std::time::Instant;

use steps::Step;
use world::{Tally, Violation, World};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A failed sequence: its seed, its steps, and the step after which the
/// violation was found.
type Failed = (u64, Vec<Step>, (usize, Violation));

/// Runs `steps` in a new world: what it exercised, or the first
/// violation and the step it followed.
async fn run(seed: u64, steps: &[Step]) -> Result<Tally, (usize, Violation)> {
    let mut world = World::start(seed).await;
    for (i, step) in steps.iter().enumerate() {
        world.run(*step).await.map_err(|v| (i, v))?;
    }
    world.settle().await.map_err(|v| (steps.len(), v))?;
    Ok(world.tally)
}

/// The shortest sequence found, by taking steps away, that still fails,
/// within `SIM_SHRINK_SECONDS` (default 300).
async fn shrink(seed: u64, mut steps: Vec<Step>) -> Vec<Step> {
    let budget = std::time::Duration::from_secs(setting("SIM_SHRINK_SECONDS", 300));
    let started = Instant::now();
    let mut chunk = steps.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut start = 0;
        while start < steps.len() {
            let mut fewer = steps.clone();
            fewer.drain(start..(start + chunk).min(steps.len()));
            if run(seed, &fewer).await.is_err() {
                steps = fewer;
            } else {
                start += chunk;
            }
        }
        chunk /= 2;
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_sequence_of_billing_events_loses_or_invents_money() {
    let sequences = setting("SIM_SEQUENCES", 4);
    let length = setting("SIM_STEPS", 40) as usize;
    let parallel = setting("SIM_PARALLEL", 2).max(1) as usize;
    let first_seed = setting("SIM_SEED", rand::random::<u32>().into());
    let started = Instant::now();
    eprintln!(
        "simulation: {sequences} sequences of {length} steps from seed {first_seed}, {parallel} at once"
    );

    let mut running = tokio::task::JoinSet::new();
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    let mut record = |done: Result<Tally, Failed>| match done {
        Ok(exercised) => tally += exercised,
        Err(failure) => failures.push(failure),
    };
    for i in 0..sequences {
        if running.len() >= parallel {
            record(running.join_next().await.unwrap().unwrap());
        }
        let seed = first_seed + i;
        running.spawn(async move {
            let steps = steps::sequence(seed, length);
            run(seed, &steps).await.map_err(|e| (seed, steps, e))
        });
    }
    while let Some(done) = running.join_next().await {
        record(done.unwrap());
    }
    eprintln!(
        "simulation: {} steps in {:.0} s, {} failing sequences; the passing ones: {tally:?}",
        sequences as usize * length,
        started.elapsed().as_secs_f64(),
        failures.len()
    );

    for (seed, _, (at, Violation(what))) in &failures {
        eprintln!("simulation: seed {seed} failed after step {at}: {what}");
    }
    if let Some((seed, steps, (at, Violation(what)))) = failures.into_iter().next() {
        eprintln!("simulation: seed {seed} failed after step {at}: {what}; shrinking");
        let shrunk = shrink(seed, steps[..=at.min(steps.len() - 1)].to_vec()).await;
        let replay = run(seed, &shrunk).await.err();
        panic!(
            "seed {seed} (replay: SIM_SEED={seed} SIM_SEQUENCES=1 SIM_STEPS={length}) broke the books: {what}\n\
             shrunk to {} steps, failing with {:?}:\n{:#?}",
            shrunk.len(),
            replay.map(|(i, v)| (i, v.0)),
            shrunk
        );
    }
}
