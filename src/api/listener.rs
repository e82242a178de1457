//! The HTTP listener: accepts connections within a bound, serves each with hyper under a
//! deadline for request heads, and on shutdown lets every connection finish its request.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::task::TaskTracker;

/// Bounds of plain HTTP connections (an upgraded WebSocket leaves them: it has its own).
#[derive(Debug, Clone, Copy)]
pub struct HttpSettings {
    /// The head of a request must be complete within this long of the connection being ready
    /// for it, so it also closes a keep-alive connection that stays idle that long.
    pub header_timeout: Duration,
    /// Connections served at once; past it, new ones wait in the kernel's backlog.
    pub max_connections: usize,
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
        let service = TowerToHyperService::new(app.clone());
        let mut stopping = stopping.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(settings.header_timeout);
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
        });
    }
    drop(listener);
    stop.send_replace(true);
    connections.close();
    connections.wait().await;
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
