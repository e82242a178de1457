//! The HTTP listener: accepts connections within a bound, serves each with hyper under a
//! deadline for request heads, and on shutdown lets every connection finish its request.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// A connection's place among the `max_connections` served at once, in its requests'
/// extensions. An event stream gives it back ([`HttpSlot::release`]): streams are bounded by
/// their own limits, and must not keep short requests from being served.
#[derive(Clone)]
pub struct HttpSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl HttpSlot {
    /// Frees the slot for another connection (the one of a response that streams until the
    /// connection closes: it must say `Connection: close`).
    pub fn release(&self) {
        drop(self.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// Bounds of plain HTTP connections (an upgraded WebSocket leaves them: it has its own).
#[derive(Clone)]
pub struct HttpSettings {
    /// The head of a request must be complete within this long of the connection being ready
    /// for it, so it also closes a keep-alive connection that stays idle that long.
    pub header_timeout: Duration,
    /// Connections served at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// HTTPS: every connection starts with a TLS handshake (within `header_timeout`).
    pub tls: Option<TlsAcceptor>,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets each
/// connection finish the request it is serving and returns once all are closed.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let (stop, stopping) = watch::channel(false);
    let connections = TaskTracker::new();
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Events are small frames that must leave at once, not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let slot = HttpSlot(Arc::new(Mutex::new(Some(permit))));
        let service = {
            let app = app.clone();
            let slot = slot.clone();
            service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(slot.clone());
                let mut app = app.clone();
                tower_service::Service::call(&mut app, request)
            })
        };
        let stopping = stopping.clone();
        let tls = settings.tls.clone();
        let header_timeout = settings.header_timeout;
        connections.spawn(async move {
            let _slot = slot;
            match tls {
                None => serve_connection(stream, service, header_timeout, stopping).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(stream, service, header_timeout, stopping).await
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                },
            }
        });
    }
    drop(listener);
    stop.send_replace(true);
    connections.close();
    connections.wait().await;
}

/// Serves one connection (plain or TLS) until it ends, or, once `stopping` says so, until
/// the request in progress is answered.
async fn serve_connection<S, H>(
    stream: S,
    service: H,
    header_timeout: Duration,
    mut stopping: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    H: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
    H::Future: Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let mut connection = pin!(
        builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
    );
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        _ = async { drop(stopping.wait_for(|stop| *stop).await) } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A failed `accept` is about one connection (reset before it was taken) or about the
/// process (out of file descriptors): the latter gets a pause, not a busy loop.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
