//! The one error type of the HTTP edge.
//!
//! Every failure a handler can return is an [`ApiError`]; its
//! `IntoResponse` writes the contract's body,
//! `{"error": {"code": …, "message": …}}`, with the stable `code` of API.md.
//! Internal causes (`Internal`, `Unavailable`) are logged with their chain and
//! never shown to clients.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::error::Category;

/// One invalid field, in a 422 body's `details`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    /// The field's path in the request body, e.g. `metadata.ip_address`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("request body exceeds 64 KiB")]
    PayloadTooLarge,
    #[error("the request did not arrive in time")]
    RequestTimeout,
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("validation failed")]
    Validation(Vec<FieldError>),

    #[error("authentication required")]
    Unauthenticated,
    #[error("invalid token")]
    InvalidToken,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("the Stripe-Signature header does not verify: {0}")]
    InvalidSignature(crate::auth::stripe_signature::SignatureError),

    #[error("the token lacks the `{0}` scope")]
    InsufficientScope(&'static str),
    #[error("app `{0}` is not active for this customer")]
    AppNotActive(String),
    #[error("this API key may not use app `{0}`")]
    AppNotPermitted(String),
    #[error("app `{0}` needs a higher plan")]
    PlanUpgradeRequired(String),
    #[error("this API key may not be used from this origin")]
    OriginNotAllowed,

    #[error("too many requests; retry after {} s", crate::http::rate_limit::seconds(.0.retry_after))]
    RateLimited(crate::hot::rate_limit::Throttle),

    #[error("not enough tokens")]
    InsufficientTokens { tokens_remaining: i64 },
    /// A payment Stripe could not take (a plan upgrade's invoice): the
    /// card's decline, or a confirmation the customer must give.
    #[error("{message}")]
    PaymentFailed {
        message: String,
        client_secret: Option<String>,
    },
    #[error("the subscription is not active")]
    SubscriptionInactive,

    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An error status a library or layer answered with, given the
    /// contract's body by [`contract_shaped`].
    #[error("{}", .0.canonical_reason().unwrap_or("the request failed"))]
    Other(StatusCode),

    /// A dependency (Redis, Postgres) is down or too slow. Nothing was charged.
    #[error("a dependency is unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// A bug or an unexpected state; logged, shown as an opaque 500.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Unauthenticated | InvalidToken | InvalidApiKey | InvalidSignature(_) => {
                StatusCode::UNAUTHORIZED
            }
            InsufficientTokens { .. } | SubscriptionInactive | PaymentFailed { .. } => {
                StatusCode::PAYMENT_REQUIRED
            }
            InsufficientScope(_)
            | AppNotActive(_)
            | AppNotPermitted(_)
            | PlanUpgradeRequired(_)
            | OriginNotAllowed => StatusCode::FORBIDDEN,
            NotFound(_) => StatusCode::NOT_FOUND,
            Conflict(_) => StatusCode::CONFLICT,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Other(status) => *status,
        }
    }

    /// The stable `code` of API.md.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidRequest(_) => "invalid_request",
            PayloadTooLarge => "payload_too_large",
            RequestTimeout => "request_timeout",
            UnsupportedMediaType => "unsupported_media_type",
            Validation(_) => "validation_failed",
            Unauthenticated => "unauthenticated",
            InvalidToken => "invalid_token",
            InvalidApiKey => "invalid_api_key",
            InvalidSignature(_) => "invalid_signature",
            InsufficientScope(_) => "insufficient_scope",
            AppNotActive(_) => "app_not_active",
            AppNotPermitted(_) => "app_not_permitted",
            PlanUpgradeRequired(_) => "plan_upgrade_required",
            OriginNotAllowed => "origin_not_allowed",
            RateLimited(_) => "rate_limited",
            InsufficientTokens { .. } => "insufficient_tokens",
            SubscriptionInactive => "subscription_inactive",
            PaymentFailed { .. } => "payment_failed",
            NotFound(_) => "not_found",
            Conflict(_) => "conflict",
            MethodNotAllowed => "method_not_allowed",
            Unavailable(_) => "unavailable",
            Internal(_) => "internal_error",
            Other(status) if status.is_server_error() => "internal_error",
            Other(_) => "invalid_request",
        }
    }

    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError::new(field, message)])
    }
}

/// The error body of API.md.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
    /// Repeated at the top level for 402 `insufficient_tokens`, as API.md shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_remaining: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// Stable machine-readable code, e.g. `insufficient_tokens`.
    pub code: &'a str,
    /// Human sentence; may change between releases.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_remaining: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<&'a [FieldError]>,
    /// With 429 `rate_limited`: seconds until a request is allowed again,
    /// as in the `Retry-After` header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// With 402 `payment_failed` awaiting the customer's confirmation
    /// (3-D Secure): the payment intent's client secret, for Stripe.js.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Unavailable(cause) => {
                tracing::warn!(error = %crate::telemetry::chain(&**cause), "dependency unavailable");
                "a dependency is unavailable; nothing was charged, retry later".to_owned()
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = %crate::telemetry::chain(&**cause), "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let tokens_remaining = match &self {
            ApiError::InsufficientTokens { tokens_remaining } => Some(*tokens_remaining),
            _ => None,
        };
        let details = match &self {
            ApiError::Validation(d) => Some(d.as_slice()),
            _ => None,
        };
        let throttle = match &self {
            ApiError::RateLimited(throttle) => Some(*throttle),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
                tokens_remaining,
                details,
                retry_after: throttle.map(|t| crate::http::rate_limit::seconds(t.retry_after)),
                client_secret: match &self {
                    ApiError::PaymentFailed { client_secret, .. } => client_secret.clone(),
                    _ => None,
                },
            },
            tokens_remaining,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(throttle) = throttle {
            crate::http::rate_limit::throttled_headers(response.headers_mut(), &throttle);
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl ApiError {
    /// The error the contract names for an error status.
    fn for_status(status: StatusCode) -> ApiError {
        match status {
            StatusCode::BAD_REQUEST => ApiError::InvalidRequest("the request is malformed".into()),
            StatusCode::UNAUTHORIZED => ApiError::Unauthenticated,
            StatusCode::NOT_FOUND => ApiError::NotFound("route"),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
            StatusCode::REQUEST_TIMEOUT => ApiError::RequestTimeout,
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
            StatusCode::SERVICE_UNAVAILABLE => {
                ApiError::Unavailable(anyhow::anyhow!("a layer answered 503"))
            }
            other => ApiError::Other(other),
        }
    }
}

/// Gives an error answer that is not in the contract's shape (written by a
/// library or a layer, such as a body-limit rejection in plain text) the
/// contract's body for its status, keeping its headers (`Allow`,
/// `Retry-After`). The edge layer runs every response through it, so no
/// route can answer an error in another shape.
pub fn contract_shaped(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    tracing::debug!(%status, "an error answer without the contract's body was given one");
    let (parts, _) = response.into_parts();
    let mut shaped = ApiError::for_status(status).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            shaped
                .headers_mut()
                .entry(name)
                .or_insert_with(|| value.clone());
        }
    }
    shaped
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable(e.into())
            }
            // A value Postgres cannot encode (U+0000 in a path or query
            // parameter) is the request's fault; the statement wrote nothing.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("22021" | "22P05")) =>
            {
                ApiError::InvalidRequest(
                    "a parameter holds a character that cannot be stored (U+0000)".to_owned(),
                )
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<crate::hot::HotError> for ApiError {
    fn from(e: crate::hot::HotError) -> Self {
        match e {
            crate::hot::HotError::Unavailable(cause) => ApiError::Unavailable(cause),
            crate::hot::HotError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

/// Deserializes `body`, mapping serde's errors onto the contract's.
pub fn decode_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    // Postgres stores no U+0000 in text or jsonb, and JSON carries it only
    // escaped: refuse it by field before it reaches a query as a 500.
    if body.windows(6).any(|w| w == b"\\u0000") {
        if let Some(path) = serde_json::from_slice(body).ok().and_then(|v| nul_at(&v)) {
            let field = if path == "." { "body".to_owned() } else { path };
            return Err(ApiError::Validation(vec![FieldError::new(
                field,
                "must not contain U+0000",
            )]));
        }
    }
    decode_json_with_nul(body)
}

/// Deserializes `body` as [`decode_json`] does but lets U+0000 through: for
/// a body whose free text is never stored (a Stripe event carries what
/// customers typed, and refusing it would refuse the event on every retry).
pub fn decode_json_with_nul<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    // Every body of the API is an object. Serde would also fill a struct
    // from an array, positionally (`[null, null]` as every field absent):
    // a client that sent one meant something else.
    if body.trim_ascii_start().starts_with(b"[") {
        return Err(ApiError::Validation(vec![FieldError::new(
            "body",
            "must be a JSON object, not an array",
        )]));
    }
    // The common case, valid input, pays for no path tracking; only a
    // failure is parsed again to name the field.
    if let Ok(value) = serde_json::from_slice(body) {
        return Ok(value);
    }
    // Text that is not JSON at all is a 400 whatever it starts with; only
    // JSON of the wrong shape is a 422 (else `{"unknown":` would be one).
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        if !matches!(e.classify(), Category::Data) {
            return Err(ApiError::InvalidJson(type_message(&e)));
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::InvalidJson(type_message(inner))
            }
            Category::Data => {
                let message = type_message(inner);
                let path = e.path().to_string();
                let field = if path != "." {
                    path
                } else {
                    named_field(&message).unwrap_or("body").to_owned()
                };
                ApiError::Validation(vec![FieldError::new(field, message)])
            }
        }
    })?;
    de.end()
        .map_err(|e| ApiError::InvalidJson(type_message(&e)))?;
    Ok(value)
}

/// The path (`a.b[0]`, as serde_path_to_error writes it) of the first key
/// or string holding U+0000.
fn nul_at(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Some(".".to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_at(item).map(|rest| join_path(&format!("[{i}]"), &rest))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                return Some(key.replace('\0', "\\u0000"));
            }
            nul_at(item).map(|rest| join_path(key, &rest))
        }),
        _ => None,
    }
}

fn join_path(head: &str, rest: &str) -> String {
    match rest {
        "." => head.to_owned(),
        _ if rest.starts_with('[') => format!("{head}{rest}"),
        _ => format!("{head}.{rest}"),
    }
}

/// The field serde names in "missing field `x`" or "unknown field `x`".
fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?
        .split('`')
        .next()
}

/// A serde error's message without serde's line and column suffix.
pub fn type_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn refused_field(body: &str) -> Option<String> {
        match decode_json::<Value>(body.as_bytes()) {
            Err(ApiError::Validation(details)) => Some(details[0].field.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_nul_anywhere_in_a_body_is_refused_by_its_path() {
        assert_eq!(
            refused_field(r#"{"name": "a\u0000b"}"#).as_deref(),
            Some("name")
        );
        assert_eq!(
            refused_field(r#"{"configuration": {"sizes": ["ok", "\u0000"]}}"#).as_deref(),
            Some("configuration.sizes[1]")
        );
        assert_eq!(refused_field(r#"["\u0000"]"#).as_deref(), Some("[0]"));
        assert_eq!(
            refused_field(r#"{"k\u0000": 1}"#).as_deref(),
            Some("k\\u0000")
        );
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_no_nul() {
        let body = r#"{"note": "\\u0000"}"#;
        assert_eq!(refused_field(body), None);
        assert_eq!(
            decode_json::<Value>(body.as_bytes()).unwrap()["note"],
            "\\u0000"
        );
    }
}
