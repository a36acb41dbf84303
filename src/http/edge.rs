//! The edge layer: request metrics by matched route
//! (`http_requests_total` and `http_request_duration_seconds{method,
//! route, status}`), and panics turned into 500s in the contract's shape.
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

type ByRoute = HashMap<String, HashMap<(Method, u16), Handles>>;

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
        let method = req.method().clone();
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
        method: Method,
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
        if let Ok(response) = &result {
            let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
            let handles = handles_for(this.handles, route, this.method, response.status().as_u16());
            handles.requests.increment(1);
            handles.duration.record(this.start.elapsed().as_secs_f64());
        }
        Poll::Ready(result)
    }
}

fn handles_for(all: &RwLock<ByRoute>, route: &str, method: &Method, status: u16) -> Handles {
    let key = (method.clone(), status);
    if let Some(handles) = all
        .read()
        .ok()
        .and_then(|m| m.get(route).and_then(|r| r.get(&key).cloned()))
    {
        return handles;
    }
    let labels = [
        ("method", method.as_str().to_owned()),
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
