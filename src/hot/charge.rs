//! Charging one use of an app: the Rust side of `lua/consume.lua`.
//!
//! A 503 promises that nothing was charged, and it must come within
//! `REDIS_TIMEOUT_MS`. The caller waits for the script's reply for 60 % of
//! the timeout. A reply that does not come back in time leaves the outcome
//! in doubt: the script may have charged, its reply still on the way, or
//! may still be waiting in Redis's queue. The caller then settles it over a
//! second connection with `lua/settle.lua`, which atomically either finds
//! the outcome record every charge writes (charged: answer 200) or writes
//! a fence in its place, which the consume script checks before its first
//! write (not charged, and never will be: answer 503). The settle has the
//! rest of the budget (`REDIS_SETTLE_TIMEOUT_MS`, 40 %); only when it fails
//! too (Redis down) is a 503 given without proof, and counted in
//! `consume_outcome_unknown_total`.
//!
//! Consumes reach Redis coalesced (hot/coalesce.rs): a batch's
//! call failing, or its reply late, leaves each of its charges in doubt
//! and each caller settles its own, as above.
//!
//! The script is also given a deadline on Redis's clock and refuses to
//! charge past it: a second guard, for when the settle cannot reach Redis.
//! Exactness does not rest on it, nor on any clock.

use std::time::Duration;

use fred::types::Value;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{
    coalesce::{self, ChargeArgs, Pending},
    rate_limit::Throttle,
    HotError, HotStore, Keys,
};
use crate::config::Limit;

/// What to charge, as the script needs it. Built by [`crate::domain::metering`]
/// from a validated request, so every field is already in range.
#[derive(Debug)]
pub struct Charge<'a> {
    pub customer: Uuid,
    pub app_slug: &'a str,
    pub app_id: Uuid,
    pub tokens: i64,
    pub event_id: Uuid,
    pub embed_key: Option<KeyCharge>,
    pub idempotency: Option<Idempotency<'a>>,
    pub session_id: Option<&'a str>,
    /// The request's `metadata` object, passed on as it came.
    pub metadata: Option<&'a RawValue>,
    /// The customer's consume limit ([`Limit::NONE`] for none).
    pub customer_limit: Limit,
}

impl Charge<'_> {
    /// The event's details as the usage stream carries them (the `d`
    /// field, see `lua/consume.lua`), which the flusher decodes into a row.
    pub fn event_details(&self) -> String {
        serde_json::to_string(&EventDetails {
            e: self.event_id,
            c: self.customer,
            a: self.app_id,
            s: self.session_id,
            k: self.embed_key.map(|k| k.id),
            m: self.metadata,
        })
        .expect("event details serialize")
    }
}

/// The embed key a consume came with, and the key's own rate limit: a key
/// limit exists only with a key.
#[derive(Debug, Clone, Copy)]
pub struct KeyCharge {
    pub id: Uuid,
    pub limit: Limit,
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
    /// Redis ran the script after the caller's deadline, or never will;
    /// nothing charged.
    DeadlinePassed,
    /// Over the customer's or the embed key's consume limit; nothing
    /// charged, and the limiters unchanged.
    RateLimited(Throttle),
}

/// How long the hash of outcome records of consumes without
/// `Idempotency-Key` minted in one second lives from its first write
/// (`lua/consume.lua`), for a Redis `timeout`: short, so at tens of
/// thousands of consumes a second the records stay a few megabytes, but
/// past every use of the hash. Its consumes are sent within the second it
/// is named after, charged or refused by their deadline, and settled
/// before their `timeout` runs out, so the last read of the hash comes at
/// most a second and a `timeout` after its first write; a second more
/// for rounding, and never under 10 s.
fn charge_record_ttl_secs(timeout: Duration) -> i64 {
    let timeout_secs = timeout.as_secs() as i64 + i64::from(timeout.subsec_nanos() > 0);
    (timeout_secs + 2).max(10)
}

/// How long a fence without `Idempotency-Key` lives: far longer than any
/// consume can wait in Redis's queue. Fences are written only for replies
/// that were late, so they are few.
const FENCE_TTL_SECS: i64 = 3600;

impl HotStore {
    #[tracing::instrument(name = "consume script", level = "debug", skip_all)]
    pub async fn charge(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
        let started = std::time::Instant::now();
        let outcome = self.run_consume(charge).await;
        self.script_time.record(started.elapsed());
        outcome
    }

    async fn run_consume(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
        let deadline = self.charge_deadline();
        let (reply_to, reply) = oneshot::channel();
        let pending = Pending {
            charge: self.charge_args(charge, deadline),
            reply: reply_to,
        };
        if !self.coalescer.submit(pending) {
            return Err(HotError::Unavailable(anyhow::anyhow!(
                "the consume queue is closed: shutting down"
            )));
        }
        // Any failure of the call leaves this charge's outcome in doubt:
        // the batch may have charged it before failing, or its reply may
        // still be on the way.
        let wait = self.timeout * 3 / 5;
        let failure = match tokio::time::timeout(wait, reply).await {
            Ok(Ok(Ok(reply))) => return parse_charge_reply(&reply, charge),
            Ok(Ok(Err(e))) => anyhow::Error::from(e),
            Ok(Err(_)) => anyhow::anyhow!("the consume batch was dropped"),
            Err(_) => anyhow::anyhow!("no reply from redis within {wait:?}"),
        };
        self.settle(charge).await.map_err(|settle| {
            tracing::warn!(error = %crate::telemetry::chain(&settle), first = %crate::telemetry::chain(&*failure), "consume outcome unknown: redis did not answer");
            metrics::counter!("consume_outcome_unknown_total").increment(1);
            HotError::Unavailable(failure)
        })
    }

    /// Charges `charges` in one script call and in their order, as the
    /// coalescer sends a batch (hot/coalesce.rs; in a Redis Cluster all of
    /// one shard), and answers each as its caller would: its own reply, or,
    /// when the call failed, what settling it finds. Requests go through
    /// [`Self::charge`]; this is for tests of batches.
    pub async fn charge_all(
        &self,
        charges: &[Charge<'_>],
    ) -> Result<Vec<Result<ChargeOutcome, HotError>>, HotError> {
        let Some(first) = charges.first() else {
            return Ok(Vec::new());
        };
        let shard = self.keys.shard_of(first.customer);
        if self.clustered
            && charges
                .iter()
                .any(|c| self.keys.shard_of(c.customer) != shard)
        {
            return Err(HotError::Internal(anyhow::anyhow!(
                "in a cluster a batch holds the charges of one shard"
            )));
        }
        let deadline = self.charge_deadline();
        let mut args: Vec<_> = charges
            .iter()
            .map(|c| self.charge_args(c, deadline))
            .collect();
        let (keys, args) = coalesce::command(&self.shard_keys, args.iter_mut());
        match coalesce::call(&self.pool, &self.scripts.consume, keys, args).await {
            Ok(Value::Array(replies)) if replies.len() == charges.len() => Ok(replies
                .iter()
                .zip(charges)
                .map(|(reply, charge)| parse_charge_reply(reply, charge))
                .collect()),
            _ => {
                let mut settled = Vec::with_capacity(charges.len());
                for charge in charges {
                    settled.push(self.settle(charge).await);
                }
                Ok(settled)
            }
        }
    }

    /// Settles a consume whose reply was lost (see the module docs): the
    /// charge it made, or [`ChargeOutcome::DeadlinePassed`] with a fence
    /// that keeps the script from ever charging it. An error when Redis did
    /// not answer the settle either: the outcome is then unknown.
    #[tracing::instrument(name = "settle script", level = "debug", skip_all)]
    pub async fn settle(&self, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
        let (record, _) = self.outcome_record(charge);
        let fence_ttl = charge
            .idempotency
            .map_or(FENCE_TTL_SECS, |idem| idem.ttl_secs as i64);
        let event = charge.event_id.to_string();
        let in_hash = if charge.idempotency.is_some() {
            ""
        } else {
            "field"
        };
        let found: Option<String> = self
            .scripts
            .settle
            .evalsha_with_reload(
                &self.side,
                vec![record],
                vec![event, fence_ttl.to_string(), in_hash.to_owned()],
            )
            .await?;
        let Some(found) = found else {
            return Ok(ChargeOutcome::DeadlinePassed);
        };
        let outcome = settled_outcome(&found, charge)?;
        if matches!(outcome, ChargeOutcome::Charged { .. }) {
            metrics::counter!("consume_settled_after_timeout_total").increment(1);
        }
        Ok(outcome)
    }

    /// The key and TTL of the record the script leaves of a charge: the
    /// idempotency record, or the charge record hash holding it under the
    /// event id.
    fn outcome_record(&self, charge: &Charge<'_>) -> (String, i64) {
        match charge.idempotency {
            Some(idem) => (
                self.keys.idempotency(charge.customer, idem.key),
                idem.ttl_secs as i64,
            ),
            None => (
                self.charge_records(charge.customer, charge.event_id),
                charge_record_ttl_secs(self.timeout),
            ),
        }
    }

    /// The hash holding the outcome record of `event`, a consume of
    /// `customer` without `Idempotency-Key`: the copy [`Keys::shared_copy`]
    /// names, so on one Redis server a call's charges share one hash, which
    /// the script reads and writes once per call (`lua/consume.lua`).
    pub fn charge_records(&self, customer: Uuid, event: Uuid) -> String {
        let shard = Keys::shared_copy(self.keys.shard_of(customer), self.clustered);
        self.keys.charge_records(shard, event)
    }

    /// The instant on Redis's clock past which a charge sent now must not
    /// be made (see the module docs).
    fn charge_deadline(&self) -> i64 {
        self.redis_now_ms() + (self.timeout.as_millis() as i64) * 2 / 5
    }

    /// The charge's keys and arguments, as `lua/consume.lua` takes them.
    fn charge_args(&self, charge: &Charge<'_>, deadline: i64) -> ChargeArgs {
        let (record, record_ttl) = self.outcome_record(charge);
        let key_limit = charge.embed_key.map_or(Limit::NONE, |k| k.limit);
        let args: Vec<Value> = vec![
            charge.app_slug.into(),
            charge.tokens.into(),
            Value::from(&*charge.event_id.hyphenated().encode_lower(&mut [0u8; 36])),
            charge
                .embed_key
                .map(|k| k.id.to_string())
                .unwrap_or_default()
                .into(),
            charge
                .idempotency
                .map(|i| i.fingerprint)
                .unwrap_or_default()
                .into(),
            record_ttl.into(),
            charge.event_details().into(),
            deadline.into(),
            charge.customer_limit.interval_us().into(),
            charge.customer_limit.burst.into(),
            key_limit.interval_us().into(),
            key_limit.burst.into(),
        ];
        ChargeArgs {
            shard: self.keys.shard_of(charge.customer),
            account: self.keys.account(charge.customer),
            record,
            args,
        }
    }
}

/// What the outcome record `fingerprint|event|tokens|remaining`, found
/// after a reply was lost, says of `charge`: charged by this request, or
/// the record of an earlier request with the same Idempotency-Key, whose
/// replay this was unless its body differs (a conflict, as the script
/// would have answered).
fn settled_outcome(found: &str, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
    let malformed = || HotError::Internal(anyhow::anyhow!("malformed outcome record {found:?}"));
    let [fingerprint, event, tokens, remaining] = found.split('|').collect::<Vec<_>>()[..] else {
        return Err(malformed());
    };
    let event = Uuid::parse_str(event).map_err(|_| malformed())?;
    let tokens_remaining = remaining.parse::<i64>().map_err(|_| malformed())?;
    if event == charge.event_id {
        return Ok(ChargeOutcome::Charged {
            tokens_remaining,
            from_purchased: 0,
            at_ms: 0,
        });
    }
    if charge
        .idempotency
        .is_some_and(|idem| idem.fingerprint != fingerprint)
    {
        return Ok(ChargeOutcome::IdempotencyConflict);
    }
    Ok(ChargeOutcome::Replayed {
        event_id: event,
        tokens: tokens.parse::<i64>().map_err(|_| malformed())?,
        tokens_remaining,
    })
}

/// One charge's reply within a call's (see `lua/consume.lua`).
fn parse_charge_reply(reply: &Value, charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
    match reply {
        Value::Array(reply) => parse_reply(reply, charge),
        other => Err(malformed(std::slice::from_ref(other))),
    }
}

fn parse_reply(reply: &[Value], charge: &Charge<'_>) -> Result<ChargeOutcome, HotError> {
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
        2 => {
            let event_id = reply
                .get(1)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(&s).ok())
                .ok_or_else(|| malformed(reply))?;
            // Its own record: the call was sent twice (a cluster redirect)
            // and this is the first sending's charge, not a retry's replay.
            if event_id == charge.event_id {
                ChargeOutcome::Charged {
                    tokens_remaining: int(3)?,
                    from_purchased: 0,
                    at_ms: 0,
                }
            } else {
                ChargeOutcome::Replayed {
                    event_id,
                    tokens: int(2)?,
                    tokens_remaining: int(3)?,
                }
            }
        }
        3 => ChargeOutcome::IdempotencyConflict,
        -1 => ChargeOutcome::NotLoaded,
        -2 => ChargeOutcome::EmbedKeyRevoked,
        -3 => ChargeOutcome::AppNotActive,
        -4 => ChargeOutcome::SubscriptionInactive,
        -5 => ChargeOutcome::InsufficientTokens {
            tokens_remaining: int(1)?,
        },
        -6 => ChargeOutcome::DeadlinePassed,
        -9 => {
            return Err(HotError::Internal(anyhow::anyhow!(
                "the consume script refused the charge: {:?}",
                reply.get(1)
            )))
        }
        -7 => {
            let micros = |i| int(i).map(|v| Duration::from_micros(v.max(0) as u64));
            ChargeOutcome::RateLimited(Throttle {
                limit: match int(3)? {
                    1 => charge.customer_limit,
                    _ => charge.embed_key.map_or(Limit::NONE, |k| k.limit),
                },
                retry_after: micros(1)?,
                rested_in: micros(2)?,
            })
        }
        _ => return Err(malformed(reply)),
    })
}

fn malformed(reply: &[Value]) -> HotError {
    HotError::Internal(anyhow::anyhow!(
        "unexpected consume script reply: {reply:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(event_id: Uuid, idempotency: Option<Idempotency<'static>>) -> Charge<'static> {
        Charge {
            customer: Uuid::nil(),
            app_slug: "vto-001",
            app_id: Uuid::nil(),
            tokens: 5,
            event_id,
            embed_key: None,
            idempotency,
            session_id: None,
            metadata: None,
            customer_limit: Limit::NONE,
        }
    }

    const KEY: Idempotency<'static> = Idempotency {
        key: "order-1",
        fingerprint: "fp-a",
        ttl_secs: 60,
    };

    #[test]
    fn a_charge_record_outlives_the_last_settle_of_its_second_at_any_timeout() {
        for timeout_ms in [10, 250, 1_000, 8_000, 16_700, 30_001, 60_000] {
            let timeout = Duration::from_millis(timeout_ms);
            // Minted at the start of the second, the record first written
            // at once; minted at its end, settled when its timeout runs out.
            let last_read = Duration::from_secs(1) + timeout;
            let lives = Duration::from_secs(charge_record_ttl_secs(timeout) as u64);
            assert!(lives > last_read, "{timeout:?}: {lives:?} <= {last_read:?}");
        }
    }

    #[test]
    fn a_record_found_after_a_lost_reply_tells_charged_replayed_or_conflict() {
        let (mine, earlier) = (Uuid::now_v7(), Uuid::now_v7());

        let own = settled_outcome(&format!("fp-a|{mine}|5|95"), &charge(mine, Some(KEY)));
        assert!(matches!(
            own,
            Ok(ChargeOutcome::Charged {
                tokens_remaining: 95,
                ..
            })
        ));
        let same_body = settled_outcome(&format!("fp-a|{earlier}|5|95"), &charge(mine, Some(KEY)));
        assert_eq!(
            same_body.unwrap(),
            ChargeOutcome::Replayed {
                event_id: earlier,
                tokens: 5,
                tokens_remaining: 95
            }
        );
        let other_body = settled_outcome(&format!("fp-b|{earlier}|7|93"), &charge(mine, Some(KEY)));
        assert_eq!(other_body.unwrap(), ChargeOutcome::IdempotencyConflict);
        assert!(settled_outcome("fp-a|not-an-id|5|95", &charge(mine, Some(KEY))).is_err());
        assert!(settled_outcome("garbage", &charge(mine, None)).is_err());
    }
}
