//! Charging one use of an app: the Rust side of `lua/consume.lua`.
//!
//! The script's deadline: the request path gives Redis `REDIS_TIMEOUT_MS`
//! to answer and then replies 503, promising that nothing was charged. A
//! script that only reaches the front of Redis's queue after that would
//! still charge. So the script is told a deadline on Redis's own clock
//! (60 % of the timeout, leaving the rest for the reply to travel back)
//! and refuses to charge past it.

use fred::{interfaces::LuaInterface, types::Value};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::{HotError, HotStore};

/// What to charge, as the script needs it. Built by [`crate::domain::metering`]
/// from a validated request, so every field is already in range.
#[derive(Debug)]
pub struct Charge<'a> {
    pub customer: Uuid,
    pub app_slug: &'a str,
    pub app_id: Uuid,
    pub tokens: i64,
    pub event_id: Uuid,
    pub embed_key: Option<Uuid>,
    pub idempotency: Option<Idempotency<'a>>,
    pub session_id: Option<&'a str>,
    /// The request's `metadata` object, passed on as it came.
    pub metadata: Option<&'a RawValue>,
}

/// The event's details, the `d` field of a usage stream entry (see
/// `lua/consume.lua`); the script adds what only it knows.
#[derive(Serialize)]
pub struct EventDetails<'a> {
    /// Event id.
    pub e: Uuid,
    /// Customer.
    pub c: Uuid,
    /// App id.
    pub a: Uuid,
    /// Session id.
    pub s: Option<&'a str>,
    /// Embed key id.
    pub k: Option<Uuid>,
    /// Metadata.
    pub m: Option<&'a RawValue>,
}

/// A request sent with an `Idempotency-Key`.
#[derive(Debug, Clone, Copy)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    /// A hash of the request body: the same key with another body is a 409.
    pub fingerprint: &'a str,
    pub ttl_secs: u64,
}

/// The script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Charged; the event is in the usage stream. `tokens_remaining` is -1
    /// on an unlimited plan.
    Charged {
        tokens_remaining: i64,
        from_purchased: i64,
        at_ms: i64,
    },
    /// A retry of a charged request: nothing charged, the first answer.
    Replayed {
        event_id: Uuid,
        tokens: i64,
        tokens_remaining: i64,
    },
    IdempotencyConflict,
    /// The customer's hot state is not in Redis.
    NotLoaded,
    EmbedKeyRevoked,
    AppNotActive,
    SubscriptionInactive,
    InsufficientTokens {
        tokens_remaining: i64,
    },
    /// Redis ran the script after the caller's deadline; nothing charged.
    DeadlinePassed,
}

impl HotStore {
    pub async fn charge(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
        let script = &self.scripts.consume;
        let (keys, args) = self.charge_command(charge);
        // EVALSHA, and on NOSCRIPT (a restarted or flushed Redis) load the
        // script and send it once more. Written out rather than fred's
        // `evalsha_with_reload`, which clones every argument up front for
        // the rare retry.
        let reply: Vec<Value> = match self
            .client()
            .evalsha(script.sha1().clone(), keys, args)
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                script.load(self.client()).await?;
                let (keys, args) = self.charge_command(charge);
                self.client()
                    .evalsha(script.sha1().clone(), keys, args)
                    .await?
            }
            reply => reply?,
        };
        parse_reply(&reply)
    }

    fn charge_command(&self, charge: &Charge<'_>) -> (Vec<String>, Vec<Value>) {
        let shard = self.keys.shard_of(charge.customer);
        let account = self.keys.account(charge.customer);
        // KEYS[2] must name a key in the same slot even when unused.
        let idempotency_key = match charge.idempotency {
            Some(idem) => self.keys.idempotency(charge.customer, idem.key),
            None => account.clone(),
        };
        let keys = vec![
            account,
            idempotency_key,
            self.keys.usage_stream(shard).to_owned(),
        ];
        let details = EventDetails {
            e: charge.event_id,
            c: charge.customer,
            a: charge.app_id,
            s: charge.session_id,
            k: charge.embed_key,
            m: charge.metadata,
        };
        let deadline = self.redis_now_ms() + (self.timeout.as_millis() as i64) * 6 / 10;
        let args: Vec<Value> = vec![
            charge.app_slug.into(),
            charge.tokens.into(),
            Value::from(&*charge.event_id.hyphenated().encode_lower(&mut [0u8; 36])),
            charge
                .embed_key
                .map(|k| k.to_string())
                .unwrap_or_default()
                .into(),
            charge
                .idempotency
                .map(|i| i.fingerprint)
                .unwrap_or_default()
                .into(),
            charge.idempotency.map_or(0, |i| i.ttl_secs as i64).into(),
            serde_json::to_string(&details)
                .expect("event details serialize")
                .into(),
            deadline.into(),
        ];
        (keys, args)
    }
}

fn parse_reply(reply: &[Value]) -> Result<ChargeOutcome, HotError> {
    let int = |i: usize| -> Result<i64, HotError> {
        reply
            .get(i)
            .and_then(Value::as_i64)
            .ok_or_else(|| malformed(reply))
    };
    Ok(match int(0)? {
        1 => ChargeOutcome::Charged {
            tokens_remaining: int(1)?,
            from_purchased: int(2)?,
            at_ms: int(3)?,
        },
        2 => ChargeOutcome::Replayed {
            event_id: reply
                .get(1)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(&s).ok())
                .ok_or_else(|| malformed(reply))?,
            tokens: int(2)?,
            tokens_remaining: int(3)?,
        },
        3 => ChargeOutcome::IdempotencyConflict,
        -1 => ChargeOutcome::NotLoaded,
        -2 => ChargeOutcome::EmbedKeyRevoked,
        -3 => ChargeOutcome::AppNotActive,
        -4 => ChargeOutcome::SubscriptionInactive,
        -5 => ChargeOutcome::InsufficientTokens {
            tokens_remaining: int(1)?,
        },
        -6 => ChargeOutcome::DeadlinePassed,
        _ => return Err(malformed(reply)),
    })
}

fn malformed(reply: &[Value]) -> HotError {
    HotError::Internal(anyhow::anyhow!(
        "unexpected consume script reply: {reply:?}"
    ))
}
