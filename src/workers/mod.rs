//! Background work, each with a shutdown token passed in.
//!
//! - [`flusher`]: moves usage events from the Redis streams into the
//!   ledger, exactly once in effect.
//! - [`scheduler`]: periodic jobs (usage partitions ahead of time).

pub mod flusher;
pub mod scheduler;
