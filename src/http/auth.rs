//! Authentication extractors: a handler names the caller it accepts, and
//! the request is refused before the handler runs otherwise.
//!
//! - [`CustomerAuth`]: a customer's JWT (`Authorization: Bearer <jwt>`).
//! - [`AdminAuth`]: a JWT whose scope holds `admin`.
//! - [`ConsumeAuth`]: a JWT with `tokens:consume`, or an embed key
//!   (`Authorization: Bearer ak_…` or `X-API-Key: ak_…`).

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts, HeaderMap},
};
use uuid::Uuid;

use crate::{
    auth::{
        embed_key::{self, looks_like_embed_key},
        Scope, Scopes,
    },
    domain::consume::Caller,
    error::ApiError,
    state::Shared,
};

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ApiError::InvalidToken)?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(ApiError::InvalidToken),
    }
}

/// A verified customer JWT.
#[derive(Debug, Clone, Copy)]
pub struct CustomerAuth {
    pub customer: Uuid,
    pub scopes: Scopes,
}

impl CustomerAuth {
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(ApiError::InsufficientScope(scope.name()))
        }
    }
}

impl FromRequestParts<Shared> for CustomerAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        // Verified already by a rate-limited route's middleware.
        if let Some(auth) = parts.extensions.get::<CustomerAuth>() {
            return Ok(*auth);
        }
        let token = bearer(&parts.headers)?.ok_or(ApiError::Unauthenticated)?;
        if looks_like_embed_key(token) {
            // Embed keys open only the consume endpoint.
            return Err(ApiError::InvalidToken);
        }
        let claims = state
            .jwt
            .verify(token)
            .map_err(|_| ApiError::InvalidToken)?;
        Ok(CustomerAuth {
            customer: claims.sub,
            scopes: claims.scope,
        })
    }
}

/// An operator: a JWT with the `admin` scope. `operator` is its `sub`.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth {
    pub operator: Uuid,
}

impl FromRequestParts<Shared> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let auth = CustomerAuth::from_request_parts(parts, state).await?;
        auth.require(Scope::Admin)?;
        Ok(AdminAuth {
            operator: auth.customer,
        })
    }
}

/// Whoever may charge tokens.
pub struct ConsumeAuth(pub Caller);

impl FromRequestParts<Shared> for ConsumeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let api_key = match parts.headers.get("x-api-key") {
            Some(v) => Some(v.to_str().map_err(|_| ApiError::InvalidApiKey)?.trim()),
            None => None,
        };
        let credential = match api_key {
            Some(key) => key,
            None => bearer(&parts.headers)?.ok_or(ApiError::Unauthenticated)?,
        };
        if !looks_like_embed_key(credential) {
            if api_key.is_some() {
                return Err(ApiError::InvalidApiKey);
            }
            let claims = state
                .jwt
                .verify(credential)
                .map_err(|_| ApiError::InvalidToken)?;
            if !claims.scope.contains(Scope::TokensConsume) {
                return Err(ApiError::InsufficientScope(Scope::TokensConsume.name()));
            }
            return Ok(ConsumeAuth(Caller::Customer(claims.sub)));
        }

        if !embed_key::is_well_formed(credential) {
            return Err(ApiError::InvalidApiKey);
        }
        let key = state
            .embed_keys
            .find(&state.db, credential)
            .await
            .map_err(ApiError::from)?
            .ok_or(ApiError::InvalidApiKey)?;
        if key.is_expired(chrono::Utc::now()) {
            return Err(ApiError::InvalidApiKey);
        }
        let origin = parts
            .headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        if !key.allows_origin(origin) {
            return Err(ApiError::OriginNotAllowed);
        }
        Ok(ConsumeAuth(Caller::EmbedKey(key)))
    }
}
