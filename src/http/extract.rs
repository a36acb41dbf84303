//! Extractors whose rejections are in the contract's error shape.
//!
//! axum's `Json` answers bad input with plain-text rejections; the contract
//! wants 400 `invalid_json` for text that is not JSON, 422
//! `validation_failed` naming the field for JSON of the wrong shape, and
//! 413 `payload_too_large` past 64 KiB.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::{header, request::Parts, StatusCode},
};
use serde::de::DeserializeOwned;

use axum::http::HeaderMap;

use crate::{
    domain::consume::MAX_IDEMPOTENCY_KEY_CHARS,
    error::{decode_json, ApiError},
};

/// Request bodies above this are refused with 413 before they are read whole.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Reads the body as bytes: 415 for a body declared as something other
/// than JSON, 413 past the body limit, 408 for one that did not arrive in
/// time (`http::server`).
pub async fn read_body(req: Request) -> Result<Bytes, ApiError> {
    if let Some(declared) = req.headers().get(header::CONTENT_TYPE) {
        if !is_json(declared.as_bytes()) {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else if std::error::Error::source(&rejection).is_some_and(super::server::timed_out) {
            ApiError::RequestTimeout
        } else {
            ApiError::InvalidRequest("the request body could not be read".into())
        }
    })
}

/// `application/json`, or a `+json` type, with any parameters
/// (`; charset=utf-8`, as Stripe sends).
fn is_json(content_type: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(content_type) else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence.rsplit_once('+').is_some_and(|(kind, suffix)| {
            kind.starts_with("application/") && suffix.eq_ignore_ascii_case("json")
        })
}

/// `Json<T>` with the contract's errors, for owned request types.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let body = read_body(req).await?;
        decode_json(&body).map(Json)
    }
}

/// The raw body, limited, for handlers that parse borrowed types.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        read_body(req).await.map(Body)
    }
}

/// The query string, with a malformed one answered 422 in the contract's
/// shape.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|rejection| {
                ApiError::Validation(vec![crate::error::FieldError::new(
                    "query",
                    rejection.body_text(),
                )])
            })
    }
}

/// One path parameter. A value that does not parse (a malformed UUID) names
/// nothing that exists, so it is a 404, as for any unknown resource.
pub struct PathParam<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParam<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| PathParam(v))
            .map_err(|_| ApiError::NotFound("resource"))
    }
}

/// The `Idempotency-Key` header, checked: at most 255 visible characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(key) if !key.is_empty() && key.chars().count() <= MAX_IDEMPOTENCY_KEY_CHARS => {
            Ok(Some(key))
        }
        _ => Err(ApiError::InvalidRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        )),
    }
}
