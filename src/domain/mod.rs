//! The rules of the product, apart from HTTP and storage.
//!
//! - [`catalog`]: the apps, in memory, and plan tiers.
//! - [`configuration`]: an activation's settings against its app's schema.
//! - [`consume`]: validating a consume and charging it.
//! - [`accounts`]: keeping the hot state and the ledger in step.
//! - [`embed`]: the `embed_code` merchants paste into their shops.
//! - [`usage`]: daily aggregates of usage, and the dashboards' report.
//! - [`usage_drift`]: the hot balances checked against the ledger.

pub mod accounts;
pub mod alerts;
pub mod billing;
pub mod catalog;
pub mod configuration;
pub mod consume;
pub mod embed;
pub mod reconcile;
pub mod stripe_events;
pub mod subscriptions;
pub mod usage;
pub mod usage_drift;
