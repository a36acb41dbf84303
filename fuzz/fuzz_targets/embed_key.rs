//! The embed-key form: any credential is judged without a panic, and a
//! well-formed one is exactly a prefix and 43 URL-safe base64 characters.
#![no_main]

use connected_apps::auth::embed_key::{hash, is_well_formed, looks_like_embed_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|credential: &str| {
    let well_formed = is_well_formed(credential);
    if well_formed {
        assert!(looks_like_embed_key(credential));
        assert_eq!(credential.len(), 8 + 43);
    }
    let _ = hash(credential);
});
