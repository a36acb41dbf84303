//! Rate limits of the API's route groups (catalog, activation, billing),
//! per customer, as GCRA in Redis (`lua/rate_limit.lua` on `lua/gcra.lua`).
//!
//! The limiters live in `API_RATE_LIMIT_REDIS_URL` (default `REDIS_URL`),
//! one key per customer and group. The consume endpoint's limits are not
//! here: they are checked inside the consume script (`hot/charge.rs`), so
//! the hot path keeps its single round trip.

use std::time::Duration;

use fred::{
    interfaces::ClientLike,
    prelude::{Client, Value},
    types::scripts::Script,
};
use uuid::Uuid;

use super::{builder, HotError};
use crate::config::Limit;

/// The route groups of the specification's rate limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteGroup {
    Apps,
    Activate,
    Billing,
}

impl RouteGroup {
    pub const ALL: [RouteGroup; 3] = [RouteGroup::Apps, RouteGroup::Activate, RouteGroup::Billing];

    pub fn name(self) -> &'static str {
        match self {
            RouteGroup::Apps => "apps",
            RouteGroup::Activate => "activate",
            RouteGroup::Billing => "billing",
        }
    }
}

/// A limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed(Quota),
    Limited(Throttle),
}

/// What a caller may still do, for the `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: Limit,
    /// Requests still allowed at once.
    pub remaining: u32,
    /// Until the limiter is rested, the whole burst allowed again.
    pub rested_in: Duration,
}

/// A refused request: when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    pub limit: Limit,
    /// Until one more request is allowed.
    pub retry_after: Duration,
    pub rested_in: Duration,
}

/// Checks route-group limits. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    client: Client,
    script: Script,
    root: String,
}

impl RateLimiter {
    /// Connects in the background, like the hot store: while the limiter's
    /// Redis is down requests pass (see [`RateLimiter::check`]).
    pub fn connect(url: &str, key_prefix: &str, timeout: Duration) -> anyhow::Result<Self> {
        let client = builder(url, timeout)?.build()?;
        client.connect();
        Ok(Self {
            client,
            script: Script::from_lua(super::Scripts::RATE_LIMIT),
            root: format!("{key_prefix}:v1:rl"),
        })
    }

    /// The limiter's key: `<prefix>:v1:rl:<group>:<customer>`.
    pub fn key(&self, group: RouteGroup, customer: Uuid) -> String {
        format!("{}:{}:{}", self.root, group.name(), customer)
    }

    /// One request by `customer` to `group`. A limit of zero passes
    /// without a round trip.
    pub async fn check(
        &self,
        group: RouteGroup,
        customer: Uuid,
        limit: Limit,
    ) -> Result<Decision, HotError> {
        if limit.is_none() {
            return Ok(Decision::Allowed(Quota {
                limit,
                remaining: 0,
                rested_in: Duration::ZERO,
            }));
        }
        let reply: Vec<Value> = self
            .script
            .evalsha_with_reload(
                &self.client,
                vec![self.key(group, customer)],
                vec![limit.interval_us(), i64::from(limit.burst)],
            )
            .await?;
        let int = |i: usize| -> Result<i64, HotError> {
            reply.get(i).and_then(Value::as_i64).ok_or_else(|| {
                HotError::Internal(anyhow::anyhow!(
                    "unexpected rate limit script reply: {reply:?}"
                ))
            })
        };
        let micros = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(if int(0)? == 1 {
            Decision::Allowed(Quota {
                limit,
                remaining: int(1)?.clamp(0, i64::from(u32::MAX)) as u32,
                rested_in: micros(int(3)?),
            })
        } else {
            Decision::Limited(Throttle {
                limit,
                retry_after: micros(int(2)?),
                rested_in: micros(int(3)?),
            })
        })
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
    }
}
