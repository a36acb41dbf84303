//! What every request handler shares. Built once by [`crate::startup`];
//! nothing here is global, so tests run many instances side by side.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::{
    auth::{EmbedKeys, JwtKeys},
    config::Settings,
    domain::{
        accounts::Accounts, alerts::UsageAlerts, catalog::Catalog, consume::Metering,
        stripe_events::StripeEvents, subscriptions::Subscriptions,
    },
    egress::Egress,
    hot::{rate_limit::RateLimiter, HotStore},
    ledger::sealed::Sealer,
};

pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: PgPool,
    pub hot: HotStore,
    pub catalog: Arc<Catalog>,
    pub jwt: JwtKeys,
    pub embed_keys: EmbedKeys,
    pub accounts: Arc<Accounts>,
    pub metering: Metering,
    /// The route groups' rate limits (the consume limits are in `metering`).
    pub limiter: RateLimiter,
    pub stripe_events: StripeEvents,
    pub subscriptions: Arc<Subscriptions>,
    /// Merchants' usage alert settings.
    pub alerts: UsageAlerts,
    /// The way out to merchants' webhooks (the worker sends through it).
    pub egress: Arc<Egress>,
    /// Seals secrets at rest (`DATA_ENCRYPTION_KEYS`).
    pub sealer: Arc<Sealer>,
    pub metrics: PrometheusHandle,
}

/// Handlers take `State<Shared>`: one reference count per request, not one
/// per field.
pub type Shared = Arc<AppState>;
