//! The edge layer: request metrics by matched route
//! (`http_requests_total` and `http_request_duration_seconds{method,
//! route, status}`), panics turned into 500s in the contract's shape, and
//! any error answer not in the contract's shape (one a library or layer
//! wrote) given the contract's body for its status.
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
use tower::{Layer, Service};

use crate::error::ApiError;

#[derive(Clone)]
struct Handles {
    requests: Counter,
    duration: Histogram,
}

type ByRoute = HashMap<String, HashMap<(&'static str, u16), Handles>>;

#[derive(Clone, Default)]
pub struct EdgeLayer {
    handles: Arc<RwLock<ByRoute>>,
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            handles: self.handles.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    handles: Arc<RwLock<ByRoute>>,
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
        ResponseFuture {
            inner: self.inner.call(req),
            start: Instant::now(),
            route,
            method,
            handles: self.handles.clone(),
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
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        let result = match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(result)) => result,
            Err(_) => {
                Ok(ApiError::Internal(anyhow::anyhow!("request handler panicked")).into_response())
            }
        };
        let result = result.map(crate::error::contract_shaped);
        if let Ok(response) = &result {
            let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let handles = handles_for(this.handles, route, this.method, response.status().as_u16());
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
