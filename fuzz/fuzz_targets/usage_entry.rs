//! A usage stream entry as the flusher reads it: any fields decode into a
//! row or a reason, never a panic; a decoded row's counts are in range.
#![no_main]

use arbitrary::Arbitrary;
use connected_apps::workers::flusher::decode;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Entry {
    details: String,
    tokens: String,
    purchased: String,
    at: String,
    extra: Vec<(String, String)>,
}

fuzz_target!(|entry: Entry| {
    let mut fields = vec![
        ("d".to_owned(), entry.details),
        ("t".to_owned(), entry.tokens),
        ("p".to_owned(), entry.purchased),
        ("ts".to_owned(), entry.at),
    ];
    fields.extend(entry.extra);
    if let Ok(row) = decode(&fields) {
        assert!(row.tokens >= 1);
        assert!((0..=row.tokens).contains(&row.purchased_tokens));
    }
});
