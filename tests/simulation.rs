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
//!   database, Redis prefix and stand-in;
//! - `SIM_SEQUENCE_SECONDS`: a sequence still running after this long
//!   (default 600) is a failure, reported with its seed and the step it
//!   was in (a hang is as much a finding as a wrong balance).

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

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

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
/// violation and the step it followed; `at` tells which step it is in.
async fn run_counting(
    seed: u64,
    steps: &[Step],
    at: &AtomicUsize,
) -> Result<Tally, (usize, Violation)> {
    let mut world = World::start(seed).await;
    for (i, step) in steps.iter().enumerate() {
        at.store(i, Ordering::Relaxed);
        world.run(*step).await.map_err(|v| (i, v))?;
    }
    at.store(steps.len(), Ordering::Relaxed);
    world.settle().await.map_err(|v| (steps.len(), v))?;
    Ok(world.tally)
}

/// [`run_counting`] within `limit`; past it, a failure at the step it
/// was in.
async fn run_within(
    seed: u64,
    steps: &[Step],
    limit: Duration,
) -> Result<Tally, (usize, Violation)> {
    let at = Arc::new(AtomicUsize::new(0));
    match tokio::time::timeout(limit, run_counting(seed, steps, &at)).await {
        Ok(done) => done,
        Err(_) => {
            let step = at.load(Ordering::Relaxed);
            Err((
                step,
                Violation(format!(
                    "still running after {} s, in step {step} ({:?})",
                    limit.as_secs(),
                    steps.get(step)
                )),
            ))
        }
    }
}

/// The shortest sequence found, by taking steps away, that still fails,
/// within `SIM_SHRINK_SECONDS` (default 300).
async fn shrink(seed: u64, mut steps: Vec<Step>, limit: Duration) -> Vec<Step> {
    let budget = std::time::Duration::from_secs(setting("SIM_SHRINK_SECONDS", 300));
    let started = Instant::now();
    let mut chunk = steps.len() / 2;
    while chunk >= 1 && started.elapsed() < budget {
        let mut start = 0;
        while start < steps.len() {
            let mut fewer = steps.clone();
            fewer.drain(start..(start + chunk).min(steps.len()));
            if run_within(seed, &fewer, limit).await.is_err() {
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
    let limit = Duration::from_secs(setting("SIM_SEQUENCE_SECONDS", 600));
    // Each failure is told as it happens: a long run shows its findings
    // without waiting for its end.
    let mut record = |done: Result<Tally, Failed>| match done {
        Ok(exercised) => tally += exercised,
        Err(failure) => {
            let (seed, _, (at, Violation(what))) = &failure;
            eprintln!("simulation: seed {seed} failed after step {at}: {what}");
            failures.push(failure);
        }
    };
    for i in 0..sequences {
        if running.len() >= parallel {
            record(running.join_next().await.unwrap().unwrap());
        }
        let seed = first_seed + i;
        running.spawn(async move {
            let steps = steps::sequence(seed, length);
            run_within(seed, &steps, limit)
                .await
                .map_err(|e| (seed, steps, e))
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
        let steps = steps[..=at.min(steps.len() - 1)].to_vec();
        if what.starts_with("still running") {
            // Each try at a shorter hang would take the whole limit.
            panic!(
                "seed {seed} (replay: SIM_SEED={seed} SIM_SEQUENCES=1 SIM_STEPS={length}) hung: {what}\n{steps:#?}"
            );
        }
        eprintln!("simulation: seed {seed} failed after step {at}: {what}; shrinking");
        let shrunk = shrink(seed, steps, limit).await;
        let replay = run_within(seed, &shrunk, limit).await.err();
        panic!(
            "seed {seed} (replay: SIM_SEED={seed} SIM_SEQUENCES=1 SIM_STEPS={length}) broke the books: {what}\n\
             shrunk to {} steps, failing with {:?}:\n{:#?}",
            shrunk.len(),
            replay.map(|(i, v)| (i, v.0)),
            shrunk
        );
    }
}
