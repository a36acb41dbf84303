//! Connected Apps: meters and bills the apps eyewear merchants embed in
//! their shops.
//!
//! A guided tour, from the edge inwards:
//!
//! - [`http`]: the API of API.md: routers, extractors, the consume handler.
//! - [`auth`]: JWTs and embed keys.
//! - [`domain`]: the product's rules: the catalog, consuming tokens,
//!   keeping hot state and ledger in step.
//! - [`hot`]: Redis, its key layout and the Lua scripts (in `lua/`) that
//!   make every balance change atomic in one round trip.
//! - [`ledger`]: Postgres, the durable record.
//! - [`workers`]: the flusher (Redis streams into the ledger) and the
//!   scheduled jobs.
//! - [`egress`]: requests to merchants' servers (webhooks), kept off
//!   the service's own network.
//! - [`period`]: billing periods' arithmetic, below every layer that
//!   needs it.
//! - [`startup`], [`config`], [`telemetry`]: wiring, settings, logs and
//!   metrics.

pub mod auth;
pub mod config;
pub mod domain;
pub mod egress;
pub mod error;
pub mod hot;
pub mod http;
pub mod ledger;
pub mod period;
pub mod startup;
pub mod state;
pub mod stripe;
pub mod telemetry;
pub mod workers;
