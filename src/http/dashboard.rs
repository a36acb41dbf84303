//! The merchant dashboard: `GET /dashboard`, a page built on the public
//! API only (the living example of a merchant's own dashboard).
//!
//! Its files are compiled into the binary (nothing to deploy beside it)
//! and served under names carrying a hash of their content, so they are
//! cached for a year and a new release is fetched at once; the page
//! itself is never cached. Every answer carries a strict
//! Content-Security-Policy: scripts, styles and API calls from this origin
//! only (and Stripe's, when `STRIPE_PUBLISHABLE_KEY` is set, for its card
//! form), no inline script or style.
//!
//! The page (`dashboard/index.html`, `app.js`, `app.css`) and the vendored
//! Chart.js (`dashboard/vendor/`, from npm: `tests/browser/package.json`
//! pins the version, `scripts/browser-test.sh` checks the copy) are
//! described in the README's "The merchant dashboard".

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::Path,
    http::{header, HeaderMap, HeaderValue},
    response::{IntoResponse, Redirect},
    routing::get,
    Router,
};
use sha2::{Digest, Sha256};

use crate::{domain::embed::escape_attribute, error::ApiError, state::Shared};

/// The files, by their name in `index.html`.
const FILES: [(&str, &str, &[u8]); 3] = [
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("dashboard/app.css"),
    ),
    (
        "chart.umd.js",
        "text/javascript; charset=utf-8",
        include_bytes!("dashboard/vendor/chart.umd.js"),
    ),
];

const INDEX: &str = include_str!("dashboard/index.html");

/// Stripe.js, its card form's frames and its API (Stripe's published
/// policy), allowed only when billing is configured.
const STRIPE_SCRIPTS: &str = "https://js.stripe.com https://*.js.stripe.com";
const STRIPE_FRAMES: &str =
    "https://js.stripe.com https://*.js.stripe.com https://hooks.stripe.com";
const STRIPE_API: &str = "https://api.stripe.com";

struct Asset {
    content_type: &'static str,
    body: &'static [u8],
}

struct Dashboard {
    /// `index.html` with the hashed names and the publishable key filled in.
    page: String,
    /// By hashed name, e.g. `app.3f2a9c1b7d4e.js`.
    assets: HashMap<String, Asset>,
    csp: HeaderValue,
}

impl Dashboard {
    fn new(stripe_publishable_key: &str) -> Self {
        let mut page = INDEX.replace(
            "{{stripe_publishable_key}}",
            &escape_attribute(stripe_publishable_key),
        );
        let mut assets = HashMap::new();
        for (name, content_type, body) in FILES {
            let hash = hex::encode(&Sha256::digest(body)[..6]);
            let (stem, extension) = name.rsplit_once('.').unwrap_or((name, ""));
            let hashed = format!("{stem}.{hash}.{extension}");
            page = page.replace(&format!("{{{{{name}}}}}"), &format!("assets/{hashed}"));
            assets.insert(hashed, Asset { content_type, body });
        }
        let stripe = !stripe_publishable_key.is_empty();
        let (scripts, frames, api) = if stripe {
            (STRIPE_SCRIPTS, STRIPE_FRAMES, STRIPE_API)
        } else {
            ("", "'none'", "")
        };
        let csp = format!(
            "default-src 'none'; script-src 'self' {scripts}; style-src 'self'; \
             img-src 'self' data:; connect-src 'self' {api}; frame-src {frames}; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        .replace(" ;", ";");
        Self {
            page,
            assets,
            csp: HeaderValue::from_str(&csp).expect("the policy is ASCII"),
        }
    }

    fn headers(&self, content_type: &'static str, cache: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
        headers.insert(header::CONTENT_SECURITY_POLICY, self.csp.clone());
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        // The token may ride in the URL's fragment, which browsers never
        // send; no referrer at all keeps the page's address to itself.
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers
    }
}

pub fn router(stripe_publishable_key: &str) -> Router<Shared> {
    let dashboard = Arc::new(Dashboard::new(stripe_publishable_key));
    let page = {
        let dashboard = dashboard.clone();
        move || async move {
            (
                dashboard.headers("text/html; charset=utf-8", "no-cache"),
                dashboard.page.clone(),
            )
                .into_response()
        }
    };
    let asset = move |Path(name): Path<String>| async move {
        match dashboard.assets.get(&name) {
            Some(asset) => (
                dashboard.headers(asset.content_type, "public, max-age=31536000, immutable"),
                asset.body,
            )
                .into_response(),
            None => ApiError::NotFound("asset").into_response(),
        }
    };
    Router::new()
        // Relative asset paths resolve under `/dashboard/`.
        .route(
            "/dashboard",
            get(|| async { Redirect::permanent("/dashboard/") }),
        )
        .route("/dashboard/", get(page))
        .route("/dashboard/assets/{name}", get(asset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_file_by_its_hash_and_each_is_served_under_it() {
        let dashboard = Dashboard::new("");
        assert_eq!(dashboard.assets.len(), FILES.len());
        for name in dashboard.assets.keys() {
            assert!(dashboard.page.contains(&format!("assets/{name}")), "{name}");
        }
        assert!(
            !dashboard.page.contains("{{"),
            "a placeholder left unfilled"
        );
    }

    #[test]
    fn stripe_is_allowed_only_when_billing_is_configured() {
        let without = Dashboard::new("");
        let without = without.csp.to_str().unwrap();
        assert!(!without.contains("stripe"));
        assert!(
            without.contains("script-src 'self'; ") && without.contains("connect-src 'self'; ")
        );

        let with = Dashboard::new("pk_test_123");
        assert!(with.page.contains(r#"content="pk_test_123""#));
        let with = with.csp.to_str().unwrap();
        assert!(with.contains("script-src 'self' https://js.stripe.com https://*.js.stripe.com; "));
        assert!(with.contains("connect-src 'self' https://api.stripe.com; "));
        for csp in [without, with] {
            assert!(csp.contains("style-src 'self'; ") && !csp.contains("unsafe"));
        }
    }
}
