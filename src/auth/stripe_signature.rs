//! Verifying Stripe's webhook signatures.
//!
//! `Stripe-Signature: t=<unix seconds>,v1=<hex>,v1=<hex>,…` signs
//! `<t>.<raw body>` with HMAC-SHA256 under the endpoint's secret. Stripe
//! sends one `v1` per secret while a secret is being rolled, and we may
//! hold several secrets (`STRIPE_WEBHOOK_SECRET` takes a comma-separated
//! list) while rolling ours: any configured secret matching any `v1`
//! passes. The comparison is constant-time (`Mac::verify_slice`); a
//! timestamp more than the tolerance away from now is refused, so a
//! captured delivery cannot be replayed later.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Stripe's default tolerance.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header, or one without t= and v1=")]
    Malformed,
    #[error("the signature's timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Checks `header` against `body` with each of `secrets`, at `now` (unix
/// seconds).
pub fn verify(
    secrets: &[impl AsRef<[u8]>],
    header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", sig)) => signatures.extend(hex::decode(sig).ok()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return Err(SignatureError::Malformed);
    };
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - timestamp).abs() > TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    for secret in secrets {
        for signature in &signatures {
            if mac(secret.as_ref(), timestamp, body)
                .verify_slice(signature)
                .is_ok()
            {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// The `Stripe-Signature` header Stripe would send for `body` at
/// `timestamp`, one `v1` per secret. For tests and local tools.
pub fn sign(secrets: &[&str], body: &[u8], timestamp: i64) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        let digest = mac(secret.as_bytes(), timestamp, body)
            .finalize()
            .into_bytes();
        header.push_str(",v1=");
        header.push_str(&hex::encode(digest));
    }
    header
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const NOW: i64 = 1_780_000_000;

    #[test]
    fn a_signature_made_with_the_secret_passes() {
        let header = sign(&["whsec_a"], BODY, NOW);
        assert_eq!(verify(&["whsec_a"], &header, BODY, NOW + 10), Ok(()));
    }

    #[test]
    fn a_tampered_body_or_a_wrong_secret_is_refused() {
        let header = sign(&["whsec_a"], BODY, NOW);
        let tampered = br#"{"id":"evt_1","type":"invoice.paid "}"#;
        assert_eq!(
            verify(&["whsec_a"], &header, tampered, NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&["whsec_b"], &header, BODY, NOW),
            Err(SignatureError::Mismatch)
        );
        // A changed timestamp breaks the signature too.
        let moved = header.replace(&format!("t={NOW}"), &format!("t={}", NOW + 1));
        assert_eq!(
            verify(&["whsec_a"], &moved, BODY, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn a_delivery_older_or_newer_than_the_tolerance_is_refused() {
        let header = sign(&["whsec_a"], BODY, NOW);
        assert_eq!(verify(&["whsec_a"], &header, BODY, NOW + 300), Ok(()));
        assert_eq!(
            verify(&["whsec_a"], &header, BODY, NOW + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&["whsec_a"], &header, BODY, NOW - 301),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn while_secrets_roll_any_v1_under_any_configured_secret_passes() {
        // Stripe signs with the old and the new secret while it rolls.
        let header = sign(&["whsec_old", "whsec_new"], BODY, NOW);
        assert_eq!(verify(&["whsec_new"], &header, BODY, NOW), Ok(()));
        assert_eq!(verify(&["whsec_old"], &header, BODY, NOW), Ok(()));
        // We hold both while rolling ours.
        let header = sign(&["whsec_new"], BODY, NOW);
        assert_eq!(
            verify(&["whsec_old", "whsec_new"], &header, BODY, NOW),
            Ok(())
        );
    }

    #[test]
    fn headers_without_a_timestamp_or_a_v1_are_malformed() {
        for header in [
            "",
            "v1=abcd",
            "t=1780000000",
            "t=x,v1=abcd",
            "t=1780000000,v0=abcd",
        ] {
            assert_eq!(
                verify(&["whsec_a"], header, BODY, NOW),
                Err(SignatureError::Malformed),
                "{header}"
            );
        }
    }
}
