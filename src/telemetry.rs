//! Logs (tracing) and metrics (Prometheus).
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
use tracing::{callsite, Level, Metadata};
use tracing_subscriber::{
    filter::{EnvFilter, FilterExt},
    fmt::{self, MakeWriter},
    layer::{Context, Filter},
    prelude::*,
    registry::LookupSpan,
    Layer,
};

/// Lines one callsite may log per [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 10;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Logs to stdout at `LOG_LEVEL`, JSON unless `json` is false.
pub fn init_logging(level: &str, json: bool) {
    let _ = tracing_subscriber::registry()
        .with(layer(
            level,
            json,
            std::io::stdout,
            std::io::stdout().is_terminal(),
        ))
        .try_init();
}

/// The logging layer: format, level filter and per-callsite throttle.
/// Separate from [`init_logging`] so a test can write into a buffer.
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
        if !allowed {
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
                .install_recorder()
                .expect("the metrics recorder is installed once")
        })
        .clone()
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
