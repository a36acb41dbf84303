//! Logs (tracing), error reports (Sentry), traces (OpenTelemetry) and
//! metrics (Prometheus).
//!
//! - Logs go to stdout (see below).
//! - With `SENTRY_DSN`, errors (`tracing::error!`) and panics are reported
//!   to Sentry, each with the request's id and route as tags (from the
//!   request's span, `http::edge`); never a request body, a header or a
//!   secret (`send_default_pii` off, and nothing of them is logged).
//!   Warnings become the report's breadcrumbs.
//! - With `OTEL_EXPORTER_OTLP_ENDPOINT`, the spans (each request, the
//!   consume script's round trip, each `ledger` function's Postgres work,
//!   the account changes and rebuilds, the workers' passes) are exported over OTLP/HTTP; a request carrying a
//!   W3C `traceparent` continues its caller's trace, and usage alert
//!   deliveries carry theirs on. Without either, the spans are debug-level
//!   and cost nothing.
//!
//! Logs are one line per event, JSON unless `LOG_FORMAT=text`, colour only
//! on a terminal. Two rules keep them readable when a dependency fails
//! under load:
//!
//! - errors are logged as their chain of causes on one line ([`chain`]),
//!   never with `Debug`, which prints an anyhow error's backtrace when
//!   `RUST_BACKTRACE` is set (147 frames for each Redis timeout);
//! - each place that logs (a callsite) may write [`LOG_BURST`] lines per
//!   [`LOG_WINDOW`]; what it would write beyond is dropped and counted in
//!   `log_events_suppressed_total{level}`. The counters of the failure
//!   itself (`consume_requests_total`, `flusher_errors_total`, …) carry
//!   its volume.

use std::{
    collections::HashMap,
    io::IsTerminal,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
use tracing::{callsite, Level, Metadata};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    filter::{EnvFilter, FilterExt, LevelFilter},
    fmt::{self, MakeWriter},
    layer::{Context, Filter},
    prelude::*,
    registry::LookupSpan,
    Layer, Registry,
};

use crate::config::Settings;

/// Lines one callsite may log per [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// What [`init`] started: flushed and stopped by [`Telemetry::shutdown`]
/// before the process exits, so the last reports and spans are sent.
pub struct Telemetry {
    sentry: Option<sentry::ClientInitGuard>,
    tracer: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when errors are reported to Sentry (the edge layer then tags
    /// each request's reports with its id and route).
    pub fn reports_errors(&self) -> bool {
        self.sentry.is_some()
    }

    /// Sends what is buffered (at most [`FLUSH_TIMEOUT`] each) and stops.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer {
            if let Err(e) = provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                eprintln!("traces not all exported: {e}");
            }
        }
        if let Some(guard) = self.sentry {
            guard.flush(Some(FLUSH_TIMEOUT));
        }
    }
}

/// How long the exit waits for Sentry and the OTLP collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Logs to stdout at `LOG_LEVEL` (JSON unless `LOG_FORMAT=text`), and
/// reports and traces when `SENTRY_DSN` and `OTEL_EXPORTER_OTLP_ENDPOINT`
/// say where.
pub fn init(settings: &Settings) -> Telemetry {
    let sentry = settings.sentry_dsn.as_ref().map(|dsn| {
        let environment = if settings.production {
            "production"
        } else {
            "development"
        };
        sentry::init(
            sentry::ClientOptions::new()
                .dsn(dsn.expose())
                .maybe_release(sentry::release_name!())
                .environment(environment)
                // No request bodies, headers, addresses or user ids.
                .send_default_pii(false)
                .attach_stacktrace(true)
                .shutdown_timeout(FLUSH_TIMEOUT),
        )
    });
    let tracer =
        settings
            .otlp_endpoint
            .as_deref()
            .and_then(|endpoint| match tracer_provider(endpoint) {
                Ok(provider) => Some(provider),
                Err(e) => {
                    eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT: traces are not exported: {e}");
                    None
                }
            });
    // Our own spans (debug level, so free unless exported), not the
    // libraries'.
    let traces = tracer.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SERVICE_NAME))
            .with_filter(EnvFilter::new("connected_apps=debug"))
            .boxed()
    });
    // Errors become reports; warnings and info their breadcrumbs. Each
    // place reports at most LOG_BURST times per LOG_WINDOW, as it logs.
    let reports = sentry.as_ref().map(|_| {
        ErrorLayer::new()
            .with_filter(LevelFilter::ERROR.and(Throttle::quiet()))
            .and_then(BreadcrumbLayer::new().with_filter(LevelFilter::INFO))
            .boxed()
    });
    let logs = layer(
        &settings.log_level,
        settings.log_json,
        std::io::stdout,
        std::io::stdout().is_terminal(),
    );
    let _ = subscriber([Some(logs), traces, reports]).try_init();
    Telemetry { sentry, tracer }
}

/// A layer of the subscriber, on the registry that keeps its spans.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The registry with the layers that are configured, and only those: a
/// layer left out as `None` in the stack would count as interested in
/// every callsite, so every debug span (the request's, the handlers')
/// would be built and torn down on the consume path for nothing to read.
fn subscriber(
    layers: impl IntoIterator<Item = Option<BoxedLayer>>,
) -> impl tracing::Subscriber + Send + Sync {
    let layers: Vec<BoxedLayer> = layers.into_iter().flatten().collect();
    tracing_subscriber::registry().with(layers)
}

/// The name our spans and reports carry.
pub const SERVICE_NAME: &str = "connected-apps";

/// Spans batched to `<endpoint>/v1/traces` over OTLP/HTTP (protobuf).
fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_timeout(Duration::from_secs(10))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(SERVICE_NAME)
                .build(),
        )
        .build())
}

/// The trace a request's `traceparent` header continues, if it carries one.
pub fn remote_parent(headers: &axum::http::HeaderMap) -> Option<opentelemetry::Context> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let context =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    context.has_active_span().then_some(context)
}

/// Writes the current span's trace into `headers` as W3C `traceparent`,
/// so the receiver of a call we make can continue it.
pub fn inject_trace(headers: &mut axum::http::HeaderMap) {
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new()
            .inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
    }
}

/// The logging layer: format, level filter and per-callsite throttle.
/// Separate from [`init`] so a test can write into a buffer.
pub fn layer<S, W>(
    level: &str,
    json: bool,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // async-stripe warns about an empty secret key on every start without
    // Stripe configured, and the scheduler's library narrates its set-up:
    // neither tells an operator anything.
    let filter = EnvFilter::try_new(format!(
        "{level},sqlx=warn,fred=warn,stripe_client_core::config=error,tokio_cron_scheduler=warn"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"));
    let filter = filter.and(Throttle::default());
    let format = fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        format.json().with_filter(filter).boxed()
    } else {
        format.with_filter(filter).boxed()
    }
}

/// An error and its causes on one line, `outer: inner: …`, without a
/// backtrace.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        // Many errors repeat their cause in their own message.
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line
}

/// Lets each callsite log [`LOG_BURST`] events per [`LOG_WINDOW`].
#[derive(Default)]
struct Throttle {
    windows: Mutex<HashMap<callsite::Identifier, (Instant, u32)>>,
    /// Not counted in `log_events_suppressed_total` (the reports' throttle:
    /// the logs' one counts the same events).
    quiet: bool,
}

impl Throttle {
    fn quiet() -> Self {
        Throttle {
            quiet: true,
            ..Throttle::default()
        }
    }
}

impl<S> Filter<S> for Throttle {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        if meta.is_event() {
            // Asked again for every event, so each can be counted.
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    }

    fn event_enabled(&self, event: &tracing::Event<'_>, _cx: &Context<'_, S>) -> bool {
        let meta = event.metadata();
        let now = Instant::now();
        let allowed = {
            let Ok(mut windows) = self.windows.lock() else {
                return true;
            };
            let (start, count) = windows.entry(meta.callsite()).or_insert((now, 0));
            if now.duration_since(*start) >= LOG_WINDOW {
                *start = now;
                *count = 0;
            }
            *count += 1;
            *count <= LOG_BURST
        };
        if !allowed && !self.quiet {
            metrics::counter!("log_events_suppressed_total", "level" => level_label(meta.level()))
                .increment(1);
        }
        allowed
    }
}

fn level_label(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The Prometheus recorder.
///
/// The `metrics` facade has one recorder per process by design (every
/// library records into it), so this is the one process-wide value of the
/// service: installed once, shared by every instance a test spawns.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    &[
                        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                        1.0, 2.5,
                    ],
                )
                .expect("bucket list is not empty")
                // Merchants' receivers, up to the 5 s timeout.
                .set_buckets_for_metric(
                    Matcher::Full("usage_alert_attempt_duration_seconds".into()),
                    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .expect("bucket list is not empty")
                // Minutes to a week: merchants try an app within the day.
                .set_buckets_for_metric(
                    Matcher::Full("time_to_first_consume_seconds".into()),
                    &[
                        60.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0, 604800.0,
                    ],
                )
                .expect("bucket list is not empty")
                // Customers' used/allowance this period, sampled every minute.
                .set_buckets_for_metric(
                    Matcher::Full("period_usage_ratio".into()),
                    &crate::workers::scheduler::USAGE_RATIO_BUCKETS,
                )
                .expect("bucket list is not empty")
                // Entries per flusher batch, up to FLUSH_BATCH_SIZE's ceiling.
                .set_buckets_for_metric(
                    Matcher::Full("flusher_batch_entries".into()),
                    &[
                        1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 50000.0,
                    ],
                )
                .expect("bucket list is not empty")
                // Charges per consume script call, up to coalesce::MAX_BATCH.
                .set_buckets_for_metric(
                    Matcher::Full("consume_batch_charges".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .inspect(|_| {
                    describe_metrics();
                    counters_at_zero();
                })
                .expect("the metrics recorder is installed once")
        })
        .clone()
}

/// Every series the service exports, with its unit and meaning (the HELP
/// line Prometheus shows; the README's Operating section lists them too).
/// Every counter, with each of its known label values, exported at 0
/// from the start: a rate or an increase over a process that has not
/// counted one yet is 0, and an `absent()` alert or a dashboard panel
/// finds the series. Counters whose labels are open (a route, an app)
/// appear with their first count; `tests/api/metrics.rs` checks every
/// other counter the code increments is here.
fn counters_at_zero() {
    use crate::{domain::stripe_events::Outcome, hot::rate_limit::RouteGroup};
    for name in [
        "billing_periods_rolled_total",
        "billing_reconciliation_runs_total",
        "billing_subscriptions_adopted_total",
        "consume_outcome_unknown_total",
        "consume_settled_after_timeout_total",
        "flusher_dead_letters_total",
        "flusher_details_set_aside_total",
        "flusher_entries_claimed_total",
        "flusher_entries_retried_total",
        "flusher_errors_total",
        "flusher_events_duplicate_total",
        "flusher_events_persisted_total",
        "hot_state_rebuilds_total",
        "stripe_webhook_events_read_anew_total",
        "usage_events_possibly_lost_total",
        "usage_stream_groups_lost_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    let labelled: [(&'static str, &'static str, &[&'static str]); 6] = [
        (
            "activations_total",
            "outcome",
            &["activated", "refused", "invalid", "error"],
        ),
        (
            "billing_reconciliation_fixes_total",
            "field",
            &crate::domain::reconcile::FIELDS,
        ),
        (
            "consume_requests_total",
            "outcome",
            &crate::domain::consume::OUTCOMES,
        ),
        (
            "log_events_suppressed_total",
            "level",
            &["error", "warn", "info", "debug", "trace"],
        ),
        (
            "usage_alert_deliveries_total",
            "outcome",
            &["delivered", "retried", "failed"],
        ),
        // The default thresholds (API.md); others appear when crossed.
        ("usage_alerts_total", "threshold", &["80", "100"]),
    ];
    for (name, label, values) in labelled {
        for value in values {
            metrics::counter!(name, label => *value).increment(0);
        }
    }
    for group in RouteGroup::ALL {
        metrics::counter!("rate_limited_total", "group" => group.name()).increment(0);
        metrics::counter!("rate_limit_errors_total", "group" => group.name()).increment(0);
    }
    for operation in crate::stripe::OPERATIONS {
        for outcome in ["ok", "refused", "error"] {
            metrics::counter!("billing_sync_total", "operation" => operation, "outcome" => outcome)
                .increment(0);
        }
    }
    for kind in crate::http::webhooks::KNOWN_TYPES {
        for outcome in Outcome::ALL {
            metrics::counter!("stripe_webhook_events_total", "type" => kind, "outcome" => outcome.name())
                .increment(0);
        }
        metrics::counter!("stripe_webhook_events_total", "type" => kind, "outcome" => "error")
            .increment(0);
    }
    for kind in ["unverified", "unreadable"] {
        metrics::counter!("stripe_webhook_events_total", "type" => kind, "outcome" => "invalid")
            .increment(0);
    }
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    // Requests.
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, matched route and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method, matched route and status"
    );
    describe_counter!("consume_requests_total", "Consume requests the script answered, by outcome (charged, replayed, insufficient_tokens, rate_limited, app_not_active, subscription_inactive, key_revoked, idempotency_conflict, not_loaded, deadline_passed)");
    describe_counter!("consume_outcome_unknown_total", "Consumes whose Redis reply was lost and could not be settled: answered 503, charged or not (see Guarantees)");
    describe_counter!(
        "consume_settled_after_timeout_total",
        "Consumes whose Redis reply was late and whose outcome was read back"
    );
    describe_histogram!(
        "consume_batch_charges",
        "Charges per consume script call: the consumes of one shard that arrived while its previous call was in Redis share the next"
    );
    describe_histogram!(
        "redis_script_duration_seconds",
        Unit::Seconds,
        "Round trip of a Lua script to Redis, by script"
    );
    describe_counter!(
        "rate_limited_total",
        "Requests refused by a route group's rate limiter, by group"
    );
    describe_counter!(
        "rate_limit_errors_total",
        "Rate limiter checks that failed (its Redis unreachable): the request was let through"
    );
    describe_counter!(
        "hot_state_rebuilds_total",
        "Customers' hot state rebuilt in Redis from the ledger"
    );
    // The flusher.
    describe_counter!(
        "flusher_events_persisted_total",
        "Usage events written to the ledger"
    );
    describe_counter!(
        "flusher_events_duplicate_total",
        "Usage events already in the ledger (a redelivery): acknowledged, not written again"
    );
    describe_counter!(
        "flusher_errors_total",
        "Flusher passes that failed (Postgres or Redis unreachable); their events stay pending"
    );
    describe_counter!(
        "flusher_entries_retried_total",
        "Stream entries read again after a failed pass"
    );
    describe_counter!(
        "flusher_entries_claimed_total",
        "Stream entries taken over from a consumer that stopped"
    );
    describe_counter!(
        "flusher_dead_letters_total",
        "Stream entries moved to the dead-letter stream after FLUSH_MAX_DELIVERIES"
    );
    describe_counter!(
        "flusher_details_set_aside_total",
        "Usage events whose details could not be stored: charged and recorded without them"
    );
    describe_histogram!("flusher_batch_entries", "Entries per flusher batch");
    describe_histogram!(
        "flusher_phase_duration_seconds",
        Unit::Seconds,
        "Time of each phase of a flusher pass (take, write, acknowledge)"
    );
    describe_gauge!("usage_stream_entries", "Entries in each usage stream shard");
    describe_gauge!(
        "usage_stream_pending",
        "Entries delivered to a flusher and not yet acknowledged, per shard"
    );
    describe_gauge!(
        "usage_stream_undelivered",
        "Entries no flusher has read yet, per shard"
    );
    describe_gauge!(
        "usage_stream_oldest_unflushed_seconds",
        Unit::Seconds,
        "Age of the oldest event not yet in the ledger, per shard (the flusher's lag)"
    );
    describe_counter!(
        "usage_stream_groups_lost_total",
        "Usage streams found without their consumer group (Redis lost its data) and given a new one"
    );
    describe_counter!(
        "usage_events_possibly_lost_total",
        "Charges not yet flushed when Redis lost their stream: the shard's backlog as last measured, less what was flushed since"
    );
    describe_gauge!(
        "ledger_drift_customers",
        "Customers whose usage this period in Redis differs from the ledger plus the unflushed stream, at the last check"
    );
    describe_gauge!(
        "ledger_drift_tokens",
        "Tokens by which those customers' usage differs, summed, at the last check"
    );
    // Billing.
    describe_counter!("billing_sync_total", "Stripe API calls by operation and outcome (ok; refused: Stripe answered 4xx, a declined card among them; error: unreachable, 5xx or 429)");
    describe_counter!(
        "stripe_webhook_events_total",
        "Stripe webhook deliveries by event type and outcome"
    );
    describe_counter!(
        "billing_periods_rolled_total",
        "Billing periods rolled over by the scheduler"
    );
    describe_counter!(
        "billing_reconciliation_runs_total",
        "Billing reconciliations with Stripe run"
    );
    describe_counter!(
        "billing_reconciliation_fixes_total",
        "Differences with Stripe a reconciliation set right, by field"
    );
    describe_gauge!(
        "billing_duplicate_subscriptions",
        "Stripe customers of ours with more than one live subscription, at the last reconciliation"
    );
    describe_counter!(
        "stripe_webhook_events_read_anew_total",
        "Subscription events too close to our own read of Stripe to be ordered, applied as Stripe's state read anew"
    );
    describe_counter!(
        "billing_subscriptions_adopted_total",
        "Live Stripe subscriptions taken into our books after the customer's own ended"
    );
    // Business and experience.
    describe_gauge!(
        "billing_mrr_cents",
        "Monthly recurring revenue of active subscriptions, in cents"
    );
    describe_gauge!(
        "customers_active",
        "Customers with an active subscription, by plan"
    );
    describe_gauge!(
        "app_activations",
        "Activations by app and status (adoption)"
    );
    describe_counter!("tokens_consumed_total", "Tokens consumed, by app");
    describe_histogram!(
        "period_usage_ratio",
        "Customers' tokens used this period over their allowance, sampled every refresh"
    );
    describe_counter!("activations_total", "App activation requests by outcome");
    describe_histogram!(
        "time_to_first_consume_seconds",
        Unit::Seconds,
        "Time from an app's activation to its first charge"
    );
    describe_counter!(
        "usage_alerts_total",
        "Usage alert crossings recorded, by threshold"
    );
    describe_counter!(
        "usage_alert_deliveries_total",
        "Usage alert delivery attempts by outcome (delivered, retried, failed)"
    );
    describe_histogram!(
        "usage_alert_attempt_duration_seconds",
        Unit::Seconds,
        "Each request to a merchant's webhook (deliveries, resends, test events), to its answer or failure"
    );
    describe_gauge!(
        "usage_alert_endpoints_disabled",
        "Merchants' webhook endpoints disabled after failing every attempt for a day"
    );
    // The process.
    describe_counter!(
        "log_events_suppressed_total",
        "Log lines dropped by the per-callsite throttle, by level"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An error whose `Debug` is as long as a captured backtrace.
    #[derive(Debug)]
    struct Timeout {
        #[allow(dead_code)]
        frames: Vec<String>,
    }

    impl std::fmt::Display for Timeout {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Timeout: request timed out")
        }
    }

    impl std::error::Error for Timeout {}

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn spans_below_the_log_level_cost_nothing_when_nothing_exports_them() {
        let quiet = subscriber([
            Some(layer("warn", true, Buffer::default(), false)),
            None,
            None,
        ]);
        tracing::subscriber::with_default(quiet, || {
            assert!(tracing::debug_span!("request").is_disabled());
            assert!(!tracing::warn_span!("shown").is_disabled());
        });

        let traced = subscriber([
            Some(layer("warn", true, Buffer::default(), false)),
            Some(
                Layer::with_filter(
                    fmt::layer().with_writer(Buffer::default()),
                    EnvFilter::new("debug"),
                )
                .boxed(),
            ),
        ]);
        tracing::subscriber::with_default(traced, || {
            assert!(!tracing::debug_span!("request").is_disabled());
        });
    }

    #[test]
    fn a_storm_of_dependency_failures_logs_a_few_short_lines() {
        let buffer = Buffer::default();
        let subscriber =
            tracing_subscriber::registry().with(layer("info", true, buffer.clone(), false));
        let failure = || {
            anyhow::Error::new(Timeout {
                frames: (0..147)
                    .map(|i| format!("{i}: some::frame at src/x.rs:{i}"))
                    .collect(),
            })
            .context("redis unavailable")
        };

        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..128 {
                use axum::response::IntoResponse;
                let _ = crate::error::ApiError::Unavailable(failure()).into_response();
                let _ = crate::error::ApiError::Internal(failure()).into_response();
            }
        });

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2 * LOG_BURST as usize, "{text}");
        for line in lines {
            assert!(line.len() < 400, "{line}");
            assert!(
                line.contains("redis unavailable: Timeout: request timed out"),
                "{line}"
            );
            assert!(!line.contains("frame"), "{line}");
        }
    }
}
