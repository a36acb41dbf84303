//! Consuming tokens: the rules of API.md between a request body and the
//! consume script.
//!
//! [`ConsumeRequest::parse`] turns the raw body into a request that cannot
//! hold an invalid value (400 for bad JSON, 422 per invalid field), and
//! [`Metering::consume`] charges it: it resolves the app from the
//! in-memory catalog, applies the caller's rules (an embed key always
//! charges exactly the app's `token_cost`), runs the script, and rebuilds
//! the customer's hot state once if Redis had none.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{
    auth::EmbedKey,
    config::Limit,
    domain::{accounts::Accounts, catalog::Catalog},
    error::{type_message, ApiError, FieldError},
    hot::{
        charge::{Charge, ChargeOutcome, Idempotency, KeyCharge},
        HotStore,
    },
};

pub const MAX_SESSION_ID_CHARS: usize = 100;
pub const MAX_METADATA_BYTES: usize = 4096;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// The body of `POST /api/v1/customer/tokens/consume`, validated. Borrows
/// from the request body: the hot path copies nothing it does not need to.
#[derive(Debug)]
pub struct ConsumeRequest<'a> {
    pub app_id: Cow<'a, str>,
    pub tokens_consumed: Option<i64>,
    pub session_id: Option<Cow<'a, str>>,
    /// The metadata object, in a form Postgres stores: as it came, or
    /// rewritten where it came in one Postgres refuses (see
    /// [`check_metadata`]).
    pub metadata: Option<Cow<'a, RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest<'a> {
    #[serde(borrow)]
    app_id: Cow<'a, str>,
    #[serde(default)]
    tokens_consumed: Option<i64>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// The metadata fields the service reads; others are kept but not checked.
/// Deserializing checks each field's type; the string fields are read
/// later, from the stored event, so here only their type matters.
#[derive(Deserialize)]
struct KnownMetadata {
    #[serde(default)]
    ip_address: Option<String>,
    #[serde(default, rename = "user_agent")]
    _user_agent: Option<String>,
    #[serde(default, rename = "product_id")]
    _product_id: Option<String>,
    #[serde(default)]
    processing_time_ms: Option<f64>,
    #[serde(default, rename = "visitor_id")]
    _visitor_id: Option<String>,
}

impl<'a> ConsumeRequest<'a> {
    pub fn parse(body: &'a [u8]) -> Result<Self, ApiError> {
        let raw: RawRequest<'a> = crate::error::decode_json(body)?;
        let mut problems = Vec::new();

        if raw.app_id.is_empty() || raw.app_id.len() > 50 || raw.app_id.contains('\0') {
            problems.push(FieldError::new(
                "app_id",
                "must be an app id of 1 to 50 characters",
            ));
        }
        if let Some(t) = raw.tokens_consumed {
            if !(1..=i64::from(i32::MAX)).contains(&t) {
                problems.push(FieldError::new(
                    "tokens_consumed",
                    "must be an integer from 1 to 2147483647",
                ));
            }
        }
        if let Some(s) = &raw.session_id {
            if s.is_empty() || s.chars().count() > MAX_SESSION_ID_CHARS || s.contains('\0') {
                problems.push(FieldError::new("session_id", "must be 1 to 100 characters"));
            }
        }
        let metadata = match raw.metadata {
            None => None,
            Some(m) if m.get() == "null" => None,
            Some(m) => check_metadata(m, &mut problems),
        };
        if !problems.is_empty() {
            return Err(ApiError::Validation(problems));
        }
        Ok(Self {
            app_id: raw.app_id,
            tokens_consumed: raw.tokens_consumed,
            session_id: raw.session_id,
            metadata,
        })
    }
}

/// Checks the metadata and returns it in a form Postgres stores, so that a
/// charged event always becomes a row: whatever the consume accepts must be
/// storable, or the ledger would miss a charge the customer was billed for.
///
/// JSON and Postgres's `jsonb` disagree in three places: U+0000 and lone
/// UTF-16 surrogates (JSON allows them escaped, `jsonb` refuses them:
/// refused here, 422), and numbers, whose exponent `jsonb` bounds at ±1000
/// (`1e200000` is valid JSON). A number with an exponent is rare in
/// metadata, so only metadata that may hold one pays for rewriting: it is
/// read as numbers of double precision and written back in their shortest
/// form (`1.5e3` becomes `1500.0`); one beyond a double's range is refused.
/// Everything else is passed on as it came, byte for byte.
fn check_metadata<'a>(
    raw: &'a RawValue,
    problems: &mut Vec<FieldError>,
) -> Option<Cow<'a, RawValue>> {
    let text = raw.get();
    if !text.starts_with('{') {
        problems.push(FieldError::new("metadata", "must be an object"));
        return None;
    }
    if text.len() > MAX_METADATA_BYTES {
        problems.push(FieldError::new("metadata", "must be at most 4 KiB"));
        return None;
    }
    // Both checks below concern `\u` escapes, which metadata rarely holds:
    // one scan spares the common request the rest.
    if text.contains("\\u") {
        if text.contains("\\u0000") {
            problems.push(FieldError::new("metadata", "must not contain U+0000"));
            return None;
        }
        // A lone surrogate, which the raw value lets through undecoded.
        // Decoding checks the pairs; only text naming a surrogate pays.
        if (text.contains("\\ud") || text.contains("\\uD"))
            && serde_json::from_str::<serde_json::Value>(text).is_err()
        {
            problems.push(FieldError::new(
                "metadata",
                "must not contain unpaired UTF-16 surrogates",
            ));
            return None;
        }
    }
    let metadata = if may_hold_an_exponent(text) {
        match serde_json::from_str::<serde_json::Value>(text)
            .and_then(|value| serde_json::value::to_raw_value(&value))
        {
            Ok(rewritten) => Cow::Owned(rewritten),
            Err(e) => {
                problems.push(FieldError::new("metadata", type_message(&e)));
                return None;
            }
        }
    } else {
        Cow::Borrowed(raw)
    };
    let known: KnownMetadata = match serde_path_to_error::deserialize(
        &mut serde_json::Deserializer::from_str(metadata.get()),
    ) {
        Ok(k) => k,
        Err(e) => {
            problems.push(FieldError::new(
                format!("metadata.{}", e.path()),
                type_message(e.inner()),
            ));
            return None;
        }
    };
    if let Some(ip) = &known.ip_address {
        if ip.parse::<IpAddr>().is_err() {
            problems.push(FieldError::new(
                "metadata.ip_address",
                "must be an IPv4 or IPv6 address",
            ));
        }
    }
    if let Some(ms) = known.processing_time_ms {
        if !(0.0..=86_400_000.0).contains(&ms) {
            problems.push(FieldError::new(
                "metadata.processing_time_ms",
                "must be a number of ms from 0 to 86400000",
            ));
        }
    }
    Some(metadata)
}

/// Whether `json` may hold a number with an exponent: a digit or a point
/// followed by `e` or `E`. Text inside strings may match too; that costs
/// only the rewriting, never a wrong answer.
fn may_hold_an_exponent(json: &str) -> bool {
    json.as_bytes()
        .windows(2)
        .any(|w| matches!(w[1], b'e' | b'E') && (w[0].is_ascii_digit() || w[0] == b'.'))
}

/// Who is charging: a customer's backend (JWT) or a shopper's browser
/// (embed key).
pub enum Caller {
    Customer(Uuid),
    EmbedKey(Arc<EmbedKey>),
}

impl Caller {
    pub fn customer(&self) -> Uuid {
        match self {
            Caller::Customer(id) => *id,
            Caller::EmbedKey(key) => key.customer_id,
        }
    }
}

/// A charged (or replayed) consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub event_id: Uuid,
    pub tokens_consumed: i64,
    pub tokens_remaining: i64,
    pub replayed: bool,
}

pub struct Metering {
    hot: HotStore,
    catalog: Arc<Catalog>,
    accounts: Arc<Accounts>,
    idempotency_ttl_secs: u64,
    /// Every customer's consume limit (`RATE_LIMIT_CONSUME_*`).
    limit: Limit,
    metrics: ConsumeMetrics,
}

/// Counter handles registered once: looking a labelled counter up by name
/// on every consume costs more than the rest of the bookkeeping. Tokens
/// are counted per app by the app's own handle (`CatalogApp`).
struct ConsumeMetrics {
    by_outcome: [metrics::Counter; OUTCOMES.len()],
}

/// `consume_requests_total{outcome}`'s values.
pub const OUTCOMES: [&str; 10] = [
    "charged",
    "replayed",
    "idempotency_conflict",
    "not_loaded",
    "key_revoked",
    "app_not_active",
    "subscription_inactive",
    "insufficient_tokens",
    "deadline_passed",
    "rate_limited",
];

impl ConsumeMetrics {
    fn register() -> Self {
        Self {
            by_outcome: OUTCOMES
                .map(|outcome| metrics::counter!("consume_requests_total", "outcome" => outcome)),
        }
    }

    fn record(&self, outcome: &ChargeOutcome) {
        let index = match outcome {
            ChargeOutcome::Charged { .. } => 0,
            ChargeOutcome::Replayed { .. } => 1,
            ChargeOutcome::IdempotencyConflict => 2,
            ChargeOutcome::NotLoaded => 3,
            ChargeOutcome::EmbedKeyRevoked => 4,
            ChargeOutcome::AppNotActive => 5,
            ChargeOutcome::SubscriptionInactive => 6,
            ChargeOutcome::InsufficientTokens { .. } => 7,
            ChargeOutcome::DeadlinePassed => 8,
            ChargeOutcome::RateLimited(_) => 9,
        };
        self.by_outcome[index].increment(1);
    }
}

impl Metering {
    /// Call after the metrics recorder is installed, or the counters are
    /// no-ops.
    pub fn new(
        hot: HotStore,
        catalog: Arc<Catalog>,
        accounts: Arc<Accounts>,
        idempotency_ttl_secs: u64,
        limit: Limit,
    ) -> Self {
        Self {
            hot,
            catalog,
            accounts,
            idempotency_ttl_secs,
            limit,
            metrics: ConsumeMetrics::register(),
        }
    }

    pub async fn consume(
        &self,
        caller: &Caller,
        request: &ConsumeRequest<'_>,
        idempotency_key: Option<&str>,
        body: &[u8],
    ) -> Result<Receipt, ApiError> {
        let app = self
            .catalog
            .get(&request.app_id)
            .ok_or(ApiError::NotFound("app"))?;
        let tokens = match (caller, request.tokens_consumed) {
            (Caller::Customer(_), t) => t.unwrap_or_else(|| app.token_cost()),
            (Caller::EmbedKey(key), t) => {
                if !key.permits(app.slug()) {
                    return Err(ApiError::AppNotPermitted(app.slug().to_owned()));
                }
                match t {
                    Some(t) if t != app.token_cost() => {
                        return Err(ApiError::validation(
                            "tokens_consumed",
                            format!(
                            "with an embed key must be omitted or equal the app's token_cost ({})",
                            app.token_cost()
                        ),
                        ))
                    }
                    _ => app.token_cost(),
                }
            }
        };
        if app.is_disabled() {
            return Err(ApiError::AppNotActive(app.slug().to_owned()));
        }

        let fingerprint = idempotency_key.map(|_| hex::encode(Sha256::digest(body)));
        let customer = caller.customer();
        let event_id = Uuid::now_v7();
        let embed_key = match caller {
            Caller::EmbedKey(k) => Some(KeyCharge {
                id: k.id,
                limit: Limit::embed_key(k.rate_limit),
            }),
            Caller::Customer(_) => None,
        };
        let charge = Charge {
            customer,
            app_slug: app.slug(),
            app_id: app.row.id,
            tokens,
            event_id,
            embed_key,
            idempotency: idempotency_key
                .zip(fingerprint.as_deref())
                .map(|(key, fingerprint)| Idempotency {
                    key,
                    fingerprint,
                    ttl_secs: self.idempotency_ttl_secs,
                }),
            session_id: request.session_id.as_deref(),
            metadata: request.metadata.as_deref(),
            customer_limit: self.limit,
        };

        let mut outcome = self.hot.charge(&charge).await?;
        if outcome == ChargeOutcome::NotLoaded {
            self.accounts.rebuild(customer).await?;
            outcome = self.hot.charge(&charge).await?;
        }
        self.metrics.record(&outcome);

        match outcome {
            ChargeOutcome::Charged {
                tokens_remaining, ..
            } => {
                app.tokens_consumed.increment(tokens as u64);
                Ok(Receipt {
                    event_id,
                    tokens_consumed: tokens,
                    tokens_remaining,
                    replayed: false,
                })
            }
            ChargeOutcome::Replayed {
                event_id,
                tokens,
                tokens_remaining,
            } => Ok(Receipt {
                event_id,
                tokens_consumed: tokens,
                tokens_remaining,
                replayed: true,
            }),
            ChargeOutcome::IdempotencyConflict => Err(ApiError::Conflict(
                "this Idempotency-Key was used with a different request body".into(),
            )),
            ChargeOutcome::NotLoaded => Err(ApiError::Internal(anyhow::anyhow!(
                "hot state of {customer} missing right after a rebuild"
            ))),
            ChargeOutcome::EmbedKeyRevoked => Err(ApiError::InvalidApiKey),
            ChargeOutcome::AppNotActive => Err(ApiError::AppNotActive(app.slug().to_owned())),
            ChargeOutcome::SubscriptionInactive => Err(ApiError::SubscriptionInactive),
            ChargeOutcome::InsufficientTokens { tokens_remaining } => {
                Err(ApiError::InsufficientTokens { tokens_remaining })
            }
            ChargeOutcome::DeadlinePassed => Err(ApiError::Unavailable(anyhow::anyhow!(
                "redis ran the consume script past its deadline"
            ))),
            ChargeOutcome::RateLimited(throttle) => Err(ApiError::RateLimited(throttle)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ConsumeRequest<'_>, ApiError> {
        ConsumeRequest::parse(body.as_bytes())
    }

    fn fields(e: ApiError) -> Vec<String> {
        match e {
            ApiError::Validation(d) => d.into_iter().map(|f| f.field).collect(),
            other => panic!("expected 422, got {other:?}"),
        }
    }

    #[test]
    fn the_specification_example_parses() {
        let r = parse(r#"{"app_id":"vto-001","tokens_consumed":5,"session_id":"sess-abc123",
            "metadata":{"user_agent":"Mozilla/5.0","ip_address":"192.168.1.1","product_id":"frame-001","processing_time_ms":1250}}"#)
        .unwrap();
        assert_eq!(r.app_id, "vto-001");
        assert_eq!(r.tokens_consumed, Some(5));
        assert!(r.metadata.unwrap().get().contains("frame-001"));
    }

    #[test]
    fn metadata_postgres_would_refuse_is_rewritten_or_refused() {
        let stored = |body: &str| {
            parse(body)
                .map(|r| r.metadata.unwrap().get().to_owned())
                .map_err(fields)
        };
        // jsonb bounds exponents at ±1000: written back as doubles.
        assert_eq!(
            stored(r#"{"app_id":"vto-001","metadata":{"x":0e99999,"y":1.5E3,"z":2e-5000}}"#),
            Ok(r#"{"x":0.0,"y":1500.0,"z":0.0}"#.to_owned())
        );
        // Beyond a double: refused, nothing charged.
        assert_eq!(
            stored(r#"{"app_id":"vto-001","metadata":{"x":1e200000}}"#),
            Err(vec!["metadata".to_owned()])
        );
        // Without an exponent the metadata is passed on byte for byte.
        let as_sent = r#"{ "product_id" : "frame-001", "n": 12345678901234567890123 }"#;
        assert_eq!(
            stored(&format!(r#"{{"app_id":"vto-001","metadata":{as_sent}}}"#)),
            Ok(as_sent.to_owned())
        );
    }

    #[test]
    fn metadata_may_name_paired_surrogates_but_not_lone_ones() {
        let paired = parse(r#"{"app_id":"vto-001","metadata":{"note":"\ud83d\udc53 frames"}}"#);
        assert!(paired.is_ok());
        for lone in [r#""\ud83d""#, r#""\ud83dx""#, r#""\udc53""#] {
            let body = format!(r#"{{"app_id":"vto-001","metadata":{{"note":{lone}}}}}"#);
            assert_eq!(fields(parse(&body).unwrap_err()), ["metadata"], "{lone}");
        }
    }

    #[test]
    fn broken_json_is_a_400() {
        assert!(matches!(
            parse("{\"app_id\": "),
            Err(ApiError::InvalidJson(_))
        ));
    }

    #[test]
    fn wrong_types_are_a_422_naming_the_field() {
        assert_eq!(
            fields(parse(r#"{"app_id":"vto-001","tokens_consumed":"5"}"#).unwrap_err()),
            ["tokens_consumed"]
        );
        assert_eq!(
            fields(parse(r#"{"app_id":"vto-001","tokens_consumed":2.5}"#).unwrap_err()),
            ["tokens_consumed"]
        );
        assert_eq!(
            fields(parse(r#"{"tokens_consumed":5}"#).unwrap_err()),
            ["app_id"]
        );
    }

    #[test]
    fn every_out_of_range_field_gets_its_own_detail() {
        let long = "s".repeat(101);
        let body = format!(
            r#"{{"app_id":"vto-001","tokens_consumed":0,"session_id":"{long}","metadata":{{"ip_address":"not-an-ip"}}}}"#
        );
        assert_eq!(
            fields(ConsumeRequest::parse(body.as_bytes()).unwrap_err()),
            ["tokens_consumed", "session_id", "metadata.ip_address"]
        );
    }

    #[test]
    fn metadata_must_be_a_small_object() {
        assert_eq!(
            fields(parse(r#"{"app_id":"vto-001","metadata":[1]}"#).unwrap_err()),
            ["metadata"]
        );
        let big = format!(
            r#"{{"app_id":"vto-001","metadata":{{"x":"{}"}}}}"#,
            "a".repeat(4100)
        );
        assert_eq!(
            fields(ConsumeRequest::parse(big.as_bytes()).unwrap_err()),
            ["metadata"]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert_eq!(
            fields(parse(r#"{"app_id":"vto-001","token_consumed":5}"#).unwrap_err()),
            ["token_consumed"]
        );
    }
}
