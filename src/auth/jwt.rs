//! Customer and operator JWTs: HS256 with `JWT_SECRET`.
//!
//! The algorithm is fixed (a token claiming `none` or RS256 is refused
//! before its signature is looked at); `iss`, `aud`, `exp` and `sub` are
//! required and `nbf` is checked, with at most 60 s of leeway. Claims such
//! as `plan` or `tokens_remaining` are ignored: balances come from the hot
//! store, never from a token.

use std::{sync::Arc, time::Duration};

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use quick_cache::sync::Cache;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::config::AuthSettings;

/// The scopes of API.md, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    AppsRead = 1,
    AppsActivate = 2,
    TokensConsume = 4,
    TokensRead = 8,
    BillingManage = 16,
    Admin = 32,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::AppsRead => "apps:read",
            Scope::AppsActivate => "apps:activate",
            Scope::TokensConsume => "tokens:consume",
            Scope::TokensRead => "tokens:read",
            Scope::BillingManage => "billing:manage",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Scope> {
        Some(match s {
            "apps:read" => Scope::AppsRead,
            "apps:activate" => Scope::AppsActivate,
            "tokens:consume" => Scope::TokensConsume,
            "tokens:read" => Scope::TokensRead,
            "billing:manage" => Scope::BillingManage,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }
}

/// A set of scopes. Unknown scope names are ignored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope as u8 != 0
    }

    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        Scopes(
            names
                .into_iter()
                .filter_map(Scope::parse)
                .fold(0, |acc, s| acc | s as u8),
        )
    }
}

/// `scope` is a JSON array of strings or one space-separated string.
impl<'de> Deserialize<'de> for Scopes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            List(Vec<String>),
            Joined(String),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::List(v) => Scopes::from_names(v.iter().map(String::as_str)),
            Raw::Joined(s) => Scopes::from_names(s.split_whitespace()),
        })
    }
}

/// The claims this service reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// The customer (or operator) id.
    pub sub: Uuid,
    pub exp: i64,
    #[serde(default)]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub scope: Scopes,
}

/// What `connected-apps token` and the tests sign.
#[derive(Debug, Serialize)]
pub struct NewClaims<'a> {
    pub sub: String,
    pub iss: &'a str,
    pub aud: &'a str,
    pub iat: i64,
    pub exp: i64,
    pub scope: Vec<&'a str>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid token")]
pub struct InvalidToken;

/// Verifies tokens; caches each verified token until it expires, so the
/// hot path pays for HMAC and JSON once per token, not per request.
pub struct JwtKeys {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    leeway: i64,
    verified: Cache<Box<str>, Arc<Claims>>,
}

const VERIFIED_CACHE_ENTRIES: usize = 50_000;

impl JwtKeys {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.expose().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[&settings.jwt_issuer]);
        validation.set_audience(&[&settings.jwt_audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = settings.jwt_leeway_secs;
        Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: EncodingKey::from_secret(secret),
            validation,
            issuer: settings.jwt_issuer.clone(),
            audience: settings.jwt_audience.clone(),
            leeway: settings.jwt_leeway_secs as i64,
            verified: Cache::new(VERIFIED_CACHE_ENTRIES),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, InvalidToken> {
        let now = chrono::Utc::now().timestamp();
        if let Some(claims) = self.verified.get(token) {
            // The cached verdict was for the time it was made; time moves.
            if now < claims.exp + self.leeway {
                return Ok(claims);
            }
            self.verified.remove(token);
            return Err(InvalidToken);
        }
        let claims = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| InvalidToken)?
            .claims;
        let claims = Arc::new(claims);
        // The verdict holds until `exp`, which each look-up checks again.
        // A token not yet valid (`nbf` within the leeway) is not cached.
        // The cache is bounded, so memory cannot grow with the token count.
        if claims.nbf.is_none_or(|nbf| nbf <= now) {
            self.verified.insert(token.into(), claims.clone());
        }
        Ok(claims)
    }

    /// Signs a token for `sub` with the configured issuer and audience.
    pub fn mint(&self, sub: Uuid, scopes: &[&str], ttl: Duration) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = NewClaims {
            sub: sub.to_string(),
            iss: &self.issuer,
            aud: &self.audience,
            iat: now,
            exp: now + ttl.as_secs() as i64,
            scope: scopes.to_vec(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn keys() -> JwtKeys {
        JwtKeys::new(&AuthSettings {
            jwt_secret: Secret::new("a-test-secret-that-is-long-enough-0123456789"),
            jwt_issuer: "varai.com".into(),
            jwt_audience: "connected-apps".into(),
            jwt_leeway_secs: 30,
        })
    }

    #[test]
    fn a_minted_token_verifies_with_its_scopes() {
        let k = keys();
        let sub = Uuid::new_v4();
        let claims = k
            .verify(&k.mint(
                sub,
                &["tokens:consume", "apps:read"],
                Duration::from_secs(60),
            ))
            .unwrap();
        assert_eq!(claims.sub, sub);
        assert!(claims.scope.contains(Scope::TokensConsume));
        assert!(!claims.scope.contains(Scope::Admin));
    }

    #[test]
    fn scopes_may_be_one_space_separated_string() {
        let s: Scopes = serde_json::from_str("\"tokens:read admin\"").unwrap();
        assert!(s.contains(Scope::Admin) && s.contains(Scope::TokensRead));
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires() {
        let k = keys();
        let token = k.mint(Uuid::new_v4(), &["tokens:consume"], Duration::from_secs(60));
        let claims = k.verify(&token).unwrap();
        // Pretend time moved on past exp + leeway.
        let expired = Arc::new(Claims {
            exp: chrono::Utc::now().timestamp() - 31,
            ..(*claims).clone()
        });
        k.verified.insert(token.clone().into(), expired);
        assert!(k.verify(&token).is_err());
    }
}
