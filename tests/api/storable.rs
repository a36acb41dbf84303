//! Whatever the consume accepts, Postgres stores: for arbitrary bodies,
//! every one the consume endpoint's parser accepts becomes an event the
//! flusher decodes into a row the real insert stores as it is, with
//! nothing set aside.

use connected_apps::{
    config::Limit, domain::consume::ConsumeRequest, hot::charge::Charge, ledger::usage,
    workers::flusher::decode,
};
use proptest::prelude::*;
use uuid::Uuid;

/// JSON text as clients write it, the corners included: numbers with any
/// exponent, strings with any escape (U+0000, lone and paired surrogates),
/// nesting.
fn json_text() -> impl Strategy<Value = String> {
    let number = proptest::string::string_regex(
        r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,7})?",
    )
    .unwrap();
    let leaf = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("false".to_owned()),
        number,
        string_text(),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6)
                .prop_map(|items| format!("[{}]", items.join(","))),
            object_text(inner),
        ]
    })
}

fn object_text(value: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    proptest::collection::vec((string_text(), value), 0..6).prop_map(|fields| {
        let fields: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}

fn string_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        24 => "[a-zA-Z0-9 ./:-]{0,12}",
        1 => Just(r"\u0000".to_owned()),
        1 => Just(r"\ud83d".to_owned()),
        1 => Just(r"\udc53".to_owned()),
        1 => Just(r"\ud83d\udc53".to_owned()),
        1 => Just(r#"\"\\\/\b\f\n\r\t"#.to_owned()),
        1 => "\\PC{1,3}".prop_map(|s: String| s.replace(['"', '\\'], "")),
    ];
    proptest::collection::vec(piece, 0..4).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

/// A consume body around arbitrary metadata and session id, with the
/// recognised metadata fields sometimes present.
fn body() -> impl Strategy<Value = String> {
    let known = prop_oneof![
        Just(String::new()),
        Just(r#""ip_address":"192.168.1.1","#.to_owned()),
        Just(r#""user_agent":"Mozilla/5.0","processing_time_ms":1250,"#.to_owned()),
        Just(r#""visitor_id":"v-1","product_id":"frame-001","#.to_owned()),
    ];
    (
        proptest::option::of(string_text()),
        known,
        object_text(json_text()),
    )
        .prop_map(|(session, known, metadata)| {
            let metadata = format!("{{{known}{}", &metadata[1..]).replace(",}", "}");
            match session {
                Some(s) => {
                    format!(r#"{{"app_id":"vto-001","session_id":{s},"metadata":{metadata}}}"#)
                }
                None => format!(r#"{{"app_id":"vto-001","metadata":{metadata}}}"#),
            }
        })
}

#[test]
fn every_body_the_consume_accepts_becomes_a_row_postgres_stores() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(crate::helpers::spawn_app());
    let config = ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    proptest!(config, |(body in body())| {
        let Ok(request) = ConsumeRequest::parse(body.as_bytes()) else {
            return Ok(());
        };
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let charge = Charge {
            customer: Uuid::now_v7(),
            app_slug: "vto-001",
            app_id: Uuid::now_v7(),
            tokens: 5,
            event_id: Uuid::now_v7(),
            embed_key: None,
            idempotency: None,
            session_id: request.session_id.as_deref(),
            metadata: request.metadata.as_deref(),
            customer_limit: Limit::NONE,
        };
        let fields = vec![
            ("d".to_owned(), charge.event_details()),
            ("t".to_owned(), "5".to_owned()),
            ("p".to_owned(), "0".to_owned()),
            ("ts".to_owned(), chrono::Utc::now().timestamp_millis().to_string()),
        ];
        let row = decode(&fields);
        prop_assert!(row.is_ok(), "{body}: {row:?}");
        let row = row.unwrap();
        prop_assert!(row.set_aside.is_none(), "{body}: decoded only set aside");
        let stored = rt.block_on(async {
            let mut tx = app.db.begin().await.unwrap();
            let stored = usage::insert_batch(&mut tx, &[&row]).await;
            tx.rollback().await.unwrap();
            stored
        });
        prop_assert!(stored.is_ok(), "{body}: Postgres refused it: {stored:?}");
        prop_assert_eq!(stored.unwrap().len(), 1);
    });
    let accepted = accepted.into_inner();
    assert!(
        accepted > 100,
        "only {accepted} bodies were accepted: the strategy tests little"
    );
}
