//! Bearer tokens: any string, or three base64 segments of any bytes (the
//! header's JSON among them), is verified or refused without a panic; a
//! forged one never verifies.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use connected_apps::{auth::JwtKeys, config::Settings};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Token<'a> {
    Text(&'a str),
    Segments {
        header: &'a [u8],
        claims: &'a [u8],
        signature: &'a [u8],
    },
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fuzz_target!(|token: Token<'_>| {
    thread_local! {
        static KEYS: JwtKeys = {
            let vars = HashMap::from([(
                "JWT_SECRET".to_owned(),
                "fuzz-secret-of-at-least-thirty-two-bytes".to_owned(),
            )]);
            JwtKeys::new(&Settings::from_map(&vars).unwrap().auth)
        };
    }
    let text = match token {
        Token::Text(text) => text.to_owned(),
        Token::Segments {
            header,
            claims,
            signature,
        } => format!("{}.{}.{}", b64(header), b64(claims), b64(signature)),
    };
    KEYS.with(|keys| {
        // Nothing the fuzzer makes carries a valid HMAC under the secret.
        assert!(keys.verify(&text).is_err(), "{text}");
    });
});
