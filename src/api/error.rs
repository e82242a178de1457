//! The one error type of the transports: each variant of the engine's and store's errors maps
//! to the wire contract's code and status here, and nowhere else.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::engine::EngineError;
use crate::store::StoreError;

/// An error as the client sees it: `{"error": {"code", "message", ...extra}}` with a status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
    /// The connection cannot carry another request (its body was not read to the end).
    pub close_connection: bool,
    /// Headers the answer carries (`WWW-Authenticate`, `Retry-After`).
    pub headers: Vec<(axum::http::HeaderName, axum::http::HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            close_connection: false,
            headers: Vec::new(),
        }
    }

    /// `401 unauthorized`, with `WWW-Authenticate: Bearer`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.headers.push((
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        ));
        e
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// `429 rate_limited`, with `Retry-After` in whole seconds (at least 1).
    pub fn rate_limited(retry_after_s: u64) -> Self {
        let retry_after_s = retry_after_s.max(1);
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many requests for this key; retry in {retry_after_s} s"),
        )
        .with("retry_after_s", retry_after_s);
        e.headers.push((
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(retry_after_s),
        ));
        e
    }

    /// Answers with `Connection: close`.
    pub fn closing(mut self) -> Self {
        self.close_connection = true;
        self
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_string(), value.into());
        self
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn invalid_session_id(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_session_id", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
        .with("limit", limit)
        .closing()
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this path",
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error (logged on the server)",
        )
    }

    /// The JSON body, also used for WebSocket replies.
    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), self.code.into());
        error.insert("message".into(), self.message.clone().into());
        error.extend(self.extra.clone());
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        if self.close_connection {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::SessionNotFound => Self::not_found("session not found"),
            StoreError::Invalid(why) => Self::invalid_request(why),
            StoreError::InteractionNotFound => {
                Self::not_found("interaction not found in this session")
            }
            StoreError::Busy { running } => Self::new(
                StatusCode::CONFLICT,
                "session_busy",
                "the session is busy; use policy enqueue or interrupt to send anyway",
            )
            .with("running", running.as_str()),
            StoreError::QueueFull { limit } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("the session's queue is full ({limit} queued)"),
            )
            .with("limit", limit),
            StoreError::ContextTooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "context_too_large",
                e.to_string(),
            ),
            StoreError::TenantLimit { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "tenant_limit", e.to_string())
            }
            StoreError::NotWaiting => Self::new(
                StatusCode::CONFLICT,
                "not_waiting",
                "the interaction is not waiting for this request (not waiting, or answered)",
            ),
            StoreError::IdempotencyMismatch => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_mismatch",
                "this idempotency key was used with a different content or metadata",
            ),
            StoreError::Unavailable(detail) => {
                tracing::error!(%detail, "storage unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "storage is unavailable",
                )
            }
            StoreError::Fenced | StoreError::Internal(_) => {
                tracing::error!(error = %e, "store error");
                Self::internal()
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Store(e) => e.into(),
            EngineError::UnknownAgent(name) => Self::new(
                StatusCode::BAD_REQUEST,
                "unknown_agent",
                format!("agent {name:?} is not configured"),
            ),
            EngineError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is shutting down",
            ),
        }
    }
}
