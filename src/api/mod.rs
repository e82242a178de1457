//! The transports: HTTP, WebSocket and SSE on top of the engine. Nothing here
//! touches the store except through the engine.

pub mod auth;
pub mod connections;
pub mod console;
pub mod error;
pub mod extract;
pub mod feed;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod sse;
pub mod tls;
pub mod ws;

use axum::Router;
use axum::routing::{MethodRouter, delete, get, patch, post, put};

use std::sync::Arc;

use crate::engine::Engine;
use connections::Connections;
use ws::WsSettings;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    /// Largest accepted body, in bytes.
    pub max_body_bytes: usize,
    /// Longest wait for a request's whole body.
    pub body_timeout: std::time::Duration,
    /// Open streaming connections and their bounds.
    pub connections: Arc<Connections>,
    pub ws: WsSettings,
    /// The access gate's settings: keys, token secrets.
    pub auth: Arc<auth::Auth>,
}

/// The whole HTTP API, ready to serve, answering browsers from `cors_origins` (none: no
/// CORS headers at all).
pub fn router(state: AppState, cors_origins: &[String]) -> Router {
    let router = routes(state);
    match cors(cors_origins) {
        // Outermost: a preflight carries no credentials and is answered before the gate.
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins: every method of the API, the headers clients send
/// (`Authorization` among them), and the ones they read back. No cookies are involved
/// (credentials are bearer tokens), so credentials mode is not needed.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("baton-tenant"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
                HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Every route: method, path and handler. The router is built from this table alone, so
/// [`route_list`] is exactly what is served (the access-matrix test checks each entry).
fn route_table() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("GET", "/healthz", get(http::healthz)),
        ("GET", "/readyz", get(http::readyz)),
        ("GET", "/metrics", get(metrics::metrics)),
        ("GET", "/openapi.json", get(http::openapi)),
        ("GET", "/v1/agents", get(http::list_agents)),
        ("GET", "/v1/sessions", get(http::list_sessions)),
        ("PUT", "/v1/sessions/{id}", put(http::put_session)),
        ("GET", "/v1/sessions/{id}", get(http::get_session)),
        ("DELETE", "/v1/sessions/{id}", delete(http::delete_session)),
        (
            "POST",
            "/v1/sessions/{id}/messages",
            post(http::post_message),
        ),
        (
            "GET",
            "/v1/sessions/{id}/interactions",
            get(http::list_interactions),
        ),
        (
            "GET",
            "/v1/sessions/{id}/interactions/{iid}",
            get(http::get_interaction),
        ),
        (
            "POST",
            "/v1/sessions/{id}/interactions/{iid}/answer",
            post(http::answer),
        ),
        ("POST", "/v1/sessions/{id}/cancel", post(http::cancel)),
        ("POST", "/v1/sessions/{id}/clear", post(http::clear)),
        ("POST", "/v1/sessions/{id}/tokens", post(http::create_token)),
        ("GET", "/v1/sessions/{id}/events", get(sse::events)),
        ("GET", "/v1/sessions/{id}/ws", get(ws::ws)),
        ("GET", "/v1/sessions/{id}/context", get(http::get_context)),
        ("PUT", "/v1/sessions/{id}/context", put(http::put_context)),
        (
            "PATCH",
            "/v1/sessions/{id}/context",
            patch(http::patch_context),
        ),
    ]
}

/// The web console's routes: open to anyone (its files hold no data), outside the API.
fn console_table() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("GET", "/", get(console::root)),
        ("GET", "/console", get(console::root)),
        ("GET", "/console/", get(console::index)),
        ("GET", "/console/{file}", get(console::file)),
        ("GET", "/favicon.ico", get(console::favicon)),
    ]
}

/// `(method, path)` of the web console's routes.
pub fn console_route_list() -> Vec<(&'static str, &'static str)> {
    console_table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

/// `(method, path)` of every route served.
pub fn route_list() -> Vec<(&'static str, &'static str)> {
    route_table()
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect()
}

fn routes(state: AppState) -> Router {
    let mut router = Router::new();
    for (_, path, handler) in route_table().into_iter().chain(console_table()) {
        router = router.route(path, handler);
    }
    router
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        // Outside the routes: the gate runs for every request, the fallbacks included.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::gate,
        ))
        // Outside the gate, so its refusals are seen too.
        .layer(axum::middleware::from_fn(close_when_unread))
        .with_state(state)
}

/// A request answered before its body was read to the end (a refusal by the gate or by an
/// extractor, an oversized body) cannot leave its connection ready for the next request:
/// the answer says `Connection: close`, so the client knows to open another.
async fn close_when_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    use futures_util::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let headers = request.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0");
    if !has_body {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let read = Arc::new(AtomicBool::new(false));
    let end = {
        let read = read.clone();
        futures_util::stream::once(async move {
            read.store(true, Ordering::Relaxed);
        })
        .filter_map(|()| std::future::ready(None))
    };
    let body = axum::body::Body::from_stream(body.into_data_stream().chain(end));
    let mut response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if !read.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
