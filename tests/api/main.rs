//! The API test suite: one binary, every test against a real instance with
//! real Redis and Postgres (see `helpers`).

mod activations;
mod admin;
mod alert_webhooks;
mod alerts;
mod auth;
mod bad_input;
mod batches;
mod billing;
mod billing_api;
mod billing_sequences;
mod catalog;
mod cluster;
mod concurrency;
mod consume;
mod edges;
mod flusher;
mod helpers;
mod ledger;
mod metrics;
mod rate_limits;
mod rebuild;
mod replicas;
mod script_model;
mod storable;
mod stripe_clock;
mod stripe_semantics;
mod stripe_standin;
mod telemetry;
mod usage;
mod usage_drift;
mod webhooks;
