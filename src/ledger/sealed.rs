//! Secrets at rest: AES-256-GCM under a key from the environment.
//!
//! `DATA_ENCRYPTION_KEYS` is a comma-separated key ring, `<id>:<base64 of
//! 32 bytes>`; the first key seals, every key opens. A sealed value is
//! `v1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`, with a fresh random
//! 96-bit nonce each time and the value's place (table, column, row) as
//! associated data, so a ciphertext copied to another row does not open.
//!
//! Rotation: put a new key first, keep the old ones after it, deploy, run
//! `connected-apps reseal` (it re-seals every value not under the first
//! key), then drop the old key.

use std::collections::HashMap;

use aes_gcm::{
    aead::{Aead, KeyInit, OsRng, Payload},
    AeadCore, Aes256Gcm, Nonce,
};
use base64::{engine::general_purpose::STANDARD, Engine};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("DATA_ENCRYPTION_KEYS: {0}")]
    Config(String),
    #[error("not a sealed value")]
    Malformed,
    #[error("sealed under key `{0}`, which is not in the key ring")]
    UnknownKey(String),
    #[error("the value does not open: tampered, or sealed for another place")]
    Tampered,
}

/// The key ring. Cheap to share behind an `Arc`.
pub struct Sealer {
    active: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sealer(active: {}, keys: {})",
            self.active,
            self.keys.len()
        )
    }
}

impl Sealer {
    /// Reads a key ring in the `DATA_ENCRYPTION_KEYS` format.
    pub fn from_ring(ring: &str) -> Result<Self, SealError> {
        let mut active = None;
        let mut keys = HashMap::new();
        for entry in ring.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, key) = entry.split_once(':').ok_or_else(|| {
                SealError::Config(format!(
                    "`{id}` is not <id>:<base64 key>",
                    id = entry.split(':').next().unwrap_or("")
                ))
            })?;
            if id.is_empty() || id.contains([':', ' ']) {
                return Err(SealError::Config(format!("bad key id `{id}`")));
            }
            let bytes = STANDARD
                .decode(key)
                .map_err(|_| SealError::Config(format!("key `{id}` is not base64")))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| SealError::Config(format!("key `{id}` is not 32 bytes")))?;
            keys.insert(id.to_owned(), cipher);
            active.get_or_insert_with(|| id.to_owned());
        }
        let active = active.ok_or_else(|| SealError::Config("no key".into()))?;
        Ok(Self { active, keys })
    }

    /// Seals `plaintext` for `place` (e.g. `customer_billing.stripe_customer_id:<customer>`).
    pub fn seal(&self, plaintext: &str, place: &str) -> String {
        let cipher = &self.keys[&self.active];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: place.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short value cannot fail");
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        format!("v1:{}:{}", self.active, STANDARD.encode(bytes))
    }

    /// Opens a value sealed for `place` under any key of the ring.
    pub fn open(&self, sealed: &str, place: &str) -> Result<String, SealError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SealError::Malformed);
        };
        let cipher = self
            .keys
            .get(id)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let bytes = STANDARD.decode(body).map_err(|_| SealError::Malformed)?;
        if bytes.len() < 12 + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SealError::Malformed)?;
        let plain = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| SealError::Tampered)?;
        String::from_utf8(plain).map_err(|_| SealError::Tampered)
    }

    /// Whether `sealed` is under the key that seals now (else `reseal`).
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed
            .strip_prefix("v1:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.active)
    }
}

/// Where a customer's Stripe id is sealed: its associated data.
pub fn stripe_customer_place(customer: uuid::Uuid) -> String {
    format!("customer_billing.stripe_customer_id:{customer}")
}

/// Where a customer's usage alert signing secret is sealed.
pub fn alert_secret_place(customer: uuid::Uuid) -> String {
    format!("usage_alert_settings.signing_secret:{customer}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const NEW: &str = "k2:HxweHRwbGhkYFxYVFBMSERAPDg0MCwoJCAcGBQQDAgE=";

    #[test]
    fn a_sealed_value_opens_in_its_place_only() {
        let sealer = Sealer::from_ring(OLD).unwrap();
        let sealed = sealer.seal("cus_123", "row:a");
        assert!(sealed.starts_with("v1:k1:"));
        assert!(!sealed.contains("cus_123"));
        assert_eq!(sealer.open(&sealed, "row:a").unwrap(), "cus_123");
        assert_eq!(sealer.open(&sealed, "row:b"), Err(SealError::Tampered));
        let flipped = format!("{}A", &sealed[..sealed.len() - 1]);
        assert!(sealer.open(&flipped, "row:a").is_err());
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let sealer = Sealer::from_ring(OLD).unwrap();
        assert_ne!(sealer.seal("cus_1", "p"), sealer.seal("cus_1", "p"));
    }

    #[test]
    fn after_rotation_old_values_open_and_new_ones_use_the_new_key() {
        let before = Sealer::from_ring(OLD).unwrap();
        let old_value = before.seal("cus_9", "p");
        let ring = Sealer::from_ring(&format!("{NEW},{OLD}")).unwrap();
        assert_eq!(ring.open(&old_value, "p").unwrap(), "cus_9");
        assert!(!ring.is_current(&old_value));
        let resealed = ring.seal("cus_9", "p");
        assert!(ring.is_current(&resealed));
        // Once the old key is dropped, only values sealed under the new one open.
        let after = Sealer::from_ring(NEW).unwrap();
        assert_eq!(
            after.open(&old_value, "p"),
            Err(SealError::UnknownKey("k1".into()))
        );
        assert_eq!(after.open(&resealed, "p").unwrap(), "cus_9");
    }

    #[test]
    fn bad_rings_are_refused_with_a_reason() {
        for ring in [
            "",
            "k1",
            "k1:notbase64!",
            "k1:AAAA",
            ":AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ] {
            assert!(
                matches!(Sealer::from_ring(ring), Err(SealError::Config(_))),
                "{ring}"
            );
        }
    }
}
