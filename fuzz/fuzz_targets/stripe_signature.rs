//! The `Stripe-Signature` header, with any body: verified or refused,
//! never a panic; only the real signature verifies.
#![no_main]

use arbitrary::Arbitrary;
use connected_apps::auth::stripe_signature::{sign, verify};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "whsec_fuzz";
const NOW: i64 = 1_764_150_000;

#[derive(Arbitrary, Debug)]
struct Delivery<'a> {
    header: &'a str,
    body: &'a [u8],
    skew: i16,
}

fuzz_target!(|delivery: Delivery<'_>| {
    let secrets: [&[u8]; 1] = [SECRET.as_bytes()];
    let now = NOW + i64::from(delivery.skew);
    if verify(&secrets, delivery.header, delivery.body, now).is_ok() {
        // Only a header signed with the secret for this body verifies.
        let genuine = sign(&[SECRET], delivery.body, NOW);
        assert!(delivery
            .header
            .contains(genuine.split("v1=").nth(1).unwrap_or("-")));
    }
    let signed = sign(&[SECRET], delivery.body, NOW);
    assert!(verify(&secrets, &signed, delivery.body, NOW).is_ok());
});
