//! Background work, each with a shutdown token passed in.
//!
//! - [`flusher`]: moves usage events from the Redis streams into the
//!   ledger, exactly once in effect.
//! - [`scheduler`]: periodic jobs (billing rollovers, usage partitions,
//!   retention, billing reconciliation, the business gauges).
//! - [`alerts`]: delivers merchants' usage alerts (run with the scheduler).

pub mod alerts;
pub mod flusher;
pub mod scheduler;
