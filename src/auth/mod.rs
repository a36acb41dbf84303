//! Who is calling: customers and operators with JWTs, shoppers' browsers
//! with embed keys.
//!
//! Both are verified without a database round trip on the hot path:
//! verified JWTs and embed-key records are cached in process memory (a
//! JWT's verdict depends only on its bytes and the clock; an embed key's
//! record never changes but for revocation, which the consume script
//! checks in Redis on every use, so a revoked key is refused at once by
//! every replica).

pub mod embed_key;
pub mod jwt;
pub mod stripe_signature;

pub use embed_key::{EmbedKey, EmbedKeys};
pub use jwt::{Claims, JwtKeys, Scope, Scopes};
