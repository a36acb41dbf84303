//! The consume endpoint's body: any bytes are refused cleanly or accepted,
//! and what is accepted carries metadata Postgres stores (valid JSON with
//! no U+0000 and no exponent `jsonb` refuses).
#![no_main]

use connected_apps::domain::consume::ConsumeRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(request) = ConsumeRequest::parse(body) else {
        return;
    };
    assert!(!request.app_id.is_empty() && request.app_id.len() <= 50);
    if let Some(tokens) = request.tokens_consumed {
        assert!((1..=i64::from(i32::MAX)).contains(&tokens));
    }
    if let Some(metadata) = request.metadata {
        let text = metadata.get();
        let value: serde_json::Value =
            serde_json::from_str(text).expect("accepted metadata is JSON");
        assert!(value.is_object());
        assert!(!text.contains("\\u0000"));
        assert!(exponents_within_jsonb(text), "{text}");
    }
});

/// Every number's exponent within ±1000, the bound of Postgres's numeric.
fn exponents_within_jsonb(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'e' | b'E' if !in_string => {
                let rest = &text[i + 1..];
                let digits: String = rest
                    .trim_start_matches(['+', '-'])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                if digits.parse::<u64>().map_or(true, |e| e > 1000) {
                    return false;
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}
