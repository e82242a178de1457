//! The transports: HTTP, WebSocket and SSE on top of the engine. Nothing here
//! touches the store except through the engine.

pub mod connections;
pub mod error;
pub mod extract;
pub mod feed;
pub mod http;
pub mod listener;
pub mod sse;
pub mod ws;

use axum::Router;
use axum::routing::{get, post, put};

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
}

/// The whole HTTP API, ready to serve.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(http::healthz))
        .route("/readyz", get(http::readyz))
        .route("/metrics", get(http::metrics))
        .route("/openapi.json", get(http::openapi))
        .route("/v1/agents", get(http::list_agents))
        .route("/v1/sessions", get(http::list_sessions))
        .route(
            "/v1/sessions/{id}",
            put(http::put_session)
                .get(http::get_session)
                .delete(http::delete_session),
        )
        .route("/v1/sessions/{id}/messages", post(http::post_message))
        .route(
            "/v1/sessions/{id}/interactions",
            get(http::list_interactions),
        )
        .route(
            "/v1/sessions/{id}/interactions/{iid}",
            get(http::get_interaction),
        )
        .route("/v1/sessions/{id}/cancel", post(http::cancel))
        .route("/v1/sessions/{id}/clear", post(http::clear))
        .route("/v1/sessions/{id}/events", get(sse::events))
        .route("/v1/sessions/{id}/ws", get(ws::ws))
        .route(
            "/v1/sessions/{id}/context",
            get(http::get_context)
                .put(http::put_context)
                .patch(http::patch_context),
        )
        .fallback(http::not_found)
        .method_not_allowed_fallback(http::method_not_allowed)
        .with_state(state)
}
