//! The edge layer: request metrics by matched route
//! (`http_requests_total` and `http_request_duration_seconds{method,
//! route, status}`), panics turned into 500s in the contract's shape, and
//! any error answer not in the contract's shape (one a library or layer
//! wrote) given the contract's body for its status.
//!
//! Each request runs in a `request` span (debug level: nothing unless
//! traces are exported, see `telemetry`), continuing the trace of its
//! `traceparent` header if it has one; and, when errors are reported to
//! Sentry, under its own Sentry hub whose scope tags every report it makes
//! (an error logged, a panic) with the request's id, route and method.
//!
//! Labels are bounded whatever a client sends: a method outside HTTP's
//! standard ones is `OTHER`, a path no route matches is `unmatched`, so
//! unauthenticated requests cannot mint new series.
//!
//! One hand-written tower layer, because it sits on the consume hot path:
//! `middleware::from_fn` boxes every future, looking labelled metrics up by
//! name allocates label strings per request, and tower-http's
//! `CatchPanicLayer` boxes every response body; together they cost the
//! consume endpoint a fifth of its throughput (benches/RESULTS.md). Here the
//! metric handles are kept per route, method and status, and a panic is
//! caught around each poll of the handler's future, which costs nothing
//! until one happens.

use std::{
    collections::HashMap,
    future::Future,
    panic::{catch_unwind, AssertUnwindSafe},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::Method,
    response::{IntoResponse, Response},
};
use metrics::{Counter, Histogram};
use sentry::Hub;
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{error::ApiError, telemetry};

#[derive(Clone)]
struct Handles {
    requests: Counter,
    duration: Histogram,
}

type ByRoute = HashMap<String, HashMap<(&'static str, u16), Handles>>;

#[derive(Clone, Default)]
pub struct EdgeLayer {
    handles: Arc<RwLock<ByRoute>>,
    reports_errors: bool,
}

impl EdgeLayer {
    /// `reports_errors`: Sentry is configured (`SENTRY_DSN`).
    pub fn new(reports_errors: bool) -> Self {
        EdgeLayer {
            handles: Arc::default(),
            reports_errors,
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            handles: self.handles.clone(),
            reports_errors: self.reports_errors,
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    handles: Arc<RwLock<ByRoute>>,
    reports_errors: bool,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = method_label(req.method());
        let route_label = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let request_id = req
            .headers()
            .get(super::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let span = tracing::debug_span!(
            "request",
            otel.name = %format_args!("{method} {route_label}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = route_label,
            request_id,
            http.response.status_code = tracing::field::Empty,
        );
        if !span.is_disabled() {
            if let Some(parent) = telemetry::remote_parent(req.headers()) {
                // Only fails when no OpenTelemetry layer is installed.
                let _ = span.set_parent(parent);
            }
        }
        let hub = self.reports_errors.then(|| {
            let hub = Arc::new(Hub::new_from_top(Hub::main()));
            hub.configure_scope(|scope| {
                scope.set_tag("request_id", request_id);
                scope.set_tag("route", route_label);
                scope.set_tag("method", method);
            });
            hub
        });
        ResponseFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            route,
            method,
            handles: self.handles.clone(),
            span,
            hub,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        route: Option<MatchedPath>,
        method: &'static str,
        handles: Arc<RwLock<ByRoute>>,
        span: Span,
        hub: Option<Arc<Hub>>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let inner = this.inner;
        let poll = || match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(result.map(crate::error::contract_shaped)),
            // Sentry's panic hook has reported the panic with its backtrace.
            Err(_) => Poll::Ready(Ok(ApiError::Internal(anyhow::anyhow!(
                "request handler panicked"
            ))
            .into_response())),
        };
        let result = match this.hub {
            Some(hub) => Hub::run(hub.clone(), poll),
            None => poll(),
        };
        let Poll::Ready(result) = result else {
            return Poll::Pending;
        };
        if let Ok(response) = &result {
            let status = response.status().as_u16();
            this.span.record("http.response.status_code", status);
            let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let handles = handles_for(this.handles, route, this.method, status);
            handles.requests.increment(1);
            handles.duration.record(this.start.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}

/// The method as a label: one of HTTP's standard methods, or `OTHER`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

fn handles_for(all: &RwLock<ByRoute>, route: &str, method: &'static str, status: u16) -> Handles {
    let key = (method, status);
    if let Some(handles) = all
        .read()
        .ok()
        .and_then(|m| m.get(route).and_then(|r| r.get(&key).cloned()))
    {
        return handles;
    }
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.to_string()),
    ];
    let handles = Handles {
        requests: metrics::counter!("http_requests_total", &labels),
        duration: metrics::histogram!("http_request_duration_seconds", &labels),
    };
    if let Ok(mut map) = all.write() {
        map.entry(route.to_owned())
            .or_default()
            .insert(key, handles.clone());
    }
    handles
}
