//! Serving HTTP: hyper, with the timeouts that keep a slow or silent client
//! from holding a connection.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never
//! runs and a client that trickles header lines holds its connection for
//! ever. This is the same accept loop (hyper-util's auto builder, HTTP/1
//! and HTTP/2, `TCP_NODELAY`, graceful shutdown) with three limits
//! (`HTTP_*_TIMEOUT_SECS`, [`HttpSettings`]):
//!
//! - the header block must arrive within the header timeout, counted from
//!   when hyper starts waiting for it, which also closes keep-alive
//!   connections left idle that long;
//! - a body must keep arriving: no wait for its next piece longer than the
//!   body timeout;
//! - and arrive whole within the request timeout of the request's start,
//!   however steadily it trickles.
//!
//! A body that runs out of time fails the handler's read with
//! [`BodyTimedOut`], answered 408 `request_timeout`. Handlers are never cut
//! off mid-way by a timer: a timeout only ever refuses a request that has
//! not been read yet, so a change to Redis and Postgres is never left
//! half-done by it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, extract::Request, Router};
use bytes::Bytes;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto::Builder, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use crate::config::HttpSettings;

/// How long shutdown waits for in-flight requests before closing their
/// connections anyway.
const DRAIN_FOR: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown`, then lets the requests in
/// flight finish (up to [`DRAIN_FOR`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    http: HttpSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(http.header_timeout);
    let service = ServiceBuilder::new()
        .map_request(move |request: Request<hyper::body::Incoming>| {
            let now = Instant::now();
            request.map(|body| {
                Body::new(DeadlineBody::new(
                    body,
                    http.body_timeout,
                    now,
                    now + http.request_timeout,
                ))
            })
        })
        .service(app);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // it was accepted: wait a little rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Responses go out at once, not held back by Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection;
            // nothing to report.
            let _ = connection.await;
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_FOR, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
    Ok(())
}

/// A request body that ran out of time (see the module docs).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

pin_project_lite::pin_project! {
    /// A body with a deadline for its next piece and one for the whole.
    /// One timer per request, armed for the nearer of the two, and only
    /// when the body makes the reader wait: a body that is there at once
    /// (the common small request) never touches the timer wheel.
    struct DeadlineBody<B> {
        #[pin]
        body: B,
        #[pin]
        timer: tokio::time::Sleep,
        idle: Duration,
        whole_by: Instant,
        // When the wait for the next piece ends.
        next_by: Instant,
    }
}

impl<B> DeadlineBody<B> {
    fn new(body: B, idle: Duration, now: Instant, whole_by: Instant) -> Self {
        let next_by = whole_by.min(now + idle);
        Self {
            body,
            timer: tokio::time::sleep_until(next_by),
            idle,
            whole_by,
            next_by,
        }
    }
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // A piece arrived: the next one has the idle timeout again,
                // within the whole request's deadline.
                *this.next_by = (Instant::now() + *this.idle).min(*this.whole_by);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if this.timer.deadline() != *this.next_by {
                    this.timer.as_mut().reset(*this.next_by);
                }
                match this.timer.poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a body read failed because the body ran out of time.
pub fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        current = e.source();
    }
    false
}
