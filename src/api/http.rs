//! The HTTP handlers of `/v1` and the operational endpoints (`/metrics` is [`super::metrics`]).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::AppState;
use super::auth::{
    AnyCaller, KeySession, MAX_TOKEN_TTL_S, ReadInteraction, ReadSession, Scope, TenantCaller,
    WriteInteraction, WriteSession,
};
use super::error::ApiError;
use super::extract::{JsonBody, OptionalJsonBody, QueryParams};
use crate::engine::{MessageOutcome, MessageRequest, Sent};
use crate::model::{
    Interaction, InteractionId, JsonObject, Policy, Session, validate_idempotency_key,
    validate_session_name,
};

type ApiResult<T = Response> = Result<T, ApiError>;

/// `PUT /v1/sessions/{id}` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutSessionBody {
    pub agent: Option<String>,
    pub context: Option<JsonObject>,
}

/// `POST /v1/sessions/{id}/messages` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    pub content: String,
    #[serde(default)]
    pub policy: Option<Policy>,
    #[serde(default)]
    pub metadata: Option<JsonObject>,
}

/// `POST /v1/sessions/{id}/interactions/{iid}/answer` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    pub request_id: String,
    /// Any JSON, `null` included, but present.
    pub answer: Value,
}

/// `POST /v1/sessions/{id}/cancel` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    pub interaction_id: Option<String>,
}

/// The body of `POST …/clear` and `DELETE /v1/sessions/{id}`: none, or `{}`. Anything else
/// is refused before the session is touched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

#[derive(Serialize)]
struct SessionsPage {
    sessions: Vec<Session>,
    next: Option<String>,
}

#[derive(Serialize)]
struct InteractionsPage {
    interactions: Vec<Interaction>,
    next: Option<String>,
}

/// Checks a message's content: not empty and not only whitespace.
pub fn validate_content(content: &str) -> Result<(), ApiError> {
    if content.trim().is_empty() {
        return Err(ApiError::invalid_request(
            "content must not be empty or only whitespace",
        ));
    }
    Ok(())
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> ApiResult {
    state.engine.ready().await?;
    Ok(Json(json!({"status": "ready"})).into_response())
}

pub async fn list_sessions(
    State(state): State<AppState>,
    TenantCaller(tenant): TenantCaller,
    query: QueryParams,
) -> ApiResult {
    let limit = query.int("limit", 1, 1000)?.unwrap_or(100) as u32;
    let after = match query.get("after")? {
        Some(raw) => {
            validate_session_name(raw)
                .map_err(|_| ApiError::invalid_request("after must be a cursor from next"))?;
            Some(raw.to_string())
        }
        None => None,
    };
    let page = state.engine.list_sessions(tenant, after, limit).await?;
    Ok(Json(SessionsPage {
        sessions: page.items,
        next: page.next,
    })
    .into_response())
}

pub async fn put_session(
    State(state): State<AppState>,
    KeySession(id, _): KeySession,
    OptionalJsonBody(body): OptionalJsonBody<PutSessionBody>,
) -> ApiResult {
    let (session, created) = state
        .engine
        .put_session(id, body.agent, body.context)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(session)).into_response())
}

/// `GET /v1/agents`: names and kinds only; settings may hold secrets and never leave.
pub async fn list_agents(State(state): State<AppState>, _: AnyCaller) -> Response {
    let default = state.engine.default_agent();
    let agents: Vec<Value> = state
        .engine
        .agents()
        .iter()
        .map(|(name, agent)| json!({"name": name, "kind": agent.kind, "default": name == default}))
        .collect();
    Json(json!({ "agents": agents })).into_response()
}

pub async fn get_session(
    State(state): State<AppState>,
    ReadSession(id, _): ReadSession,
) -> ApiResult {
    Ok(Json(state.engine.get_session(id).await?).into_response())
}

pub async fn delete_session(
    State(state): State<AppState>,
    KeySession(id, _): KeySession,
    OptionalJsonBody(EmptyBody {}): OptionalJsonBody<EmptyBody>,
) -> ApiResult {
    state.engine.delete_session(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `?wait=SECONDS`: a number from 1 to 300.
fn wait_param(query: &QueryParams) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = query.get("wait")? else {
        return Ok(None);
    };
    match raw.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (1.0..=300.0).contains(&s) => {
            Ok(Some(Duration::from_secs_f64(s)))
        }
        _ => Err(ApiError::invalid_request(
            "wait must be a number of seconds from 1 to 300",
        )),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::invalid_request("Idempotency-Key must be printable ASCII"))?;
    validate_idempotency_key(key).map_err(|e| ApiError::invalid_request(e.0))?;
    Ok(Some(key.to_string()))
}

pub async fn post_message(
    State(state): State<AppState>,
    WriteSession(session): WriteSession,
    query: QueryParams,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MessageBody>,
) -> ApiResult {
    validate_content(&body.content)?;
    // A `/clear` ignores `wait` and the key: what is wrong with them goes to the rules, which
    // refuse any other message with it.
    let (wait, key) = (wait_param(&query), idempotency_key(&headers));
    let invalid = [wait.as_ref().err(), key.as_ref().err()]
        .into_iter()
        .flatten()
        .next()
        .map(|e| e.message.clone());
    let (wait, key) = (wait.ok().flatten(), key.ok().flatten());
    let outcome = state
        .engine
        .send_message(MessageRequest {
            session: session.clone(),
            content: body.content,
            policy: body.policy.unwrap_or_default(),
            metadata: body.metadata.unwrap_or_default(),
            idempotency_key: key,
            wait: wait.is_some(),
            invalid,
        })
        .await?;
    let accepted = match outcome {
        MessageOutcome::Cleared(cleared) => {
            return Ok(
                Json(json!({"epoch": cleared.epoch, "cancelled": cleared.cancelled}))
                    .into_response(),
            );
        }
        MessageOutcome::Accepted(accepted) => accepted,
    };
    let Sent {
        accepted,
        final_watch,
    } = *accepted;
    let mut interaction = accepted.interaction;
    if let (Some(wait), Some(watch)) = (wait, final_watch) {
        interaction = state.engine.wait_final(watch, interaction, wait).await?;
    }
    let status = if accepted.replayed || (wait.is_some() && interaction.status.is_final()) {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = (status, Json(interaction)).into_response();
    if accepted.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

pub async fn list_interactions(
    State(state): State<AppState>,
    ReadSession(session, _): ReadSession,
    query: QueryParams,
) -> ApiResult {
    let limit = query.int("limit", 1, 1000)?.unwrap_or(50) as u32;
    let before = match query.get("before")? {
        Some(raw) => Some(
            InteractionId::parse(raw)
                .map_err(|_| ApiError::invalid_request("before must be a cursor from next"))?
                .to_string(),
        ),
        None => None,
    };
    let page = state
        .engine
        .list_interactions(session, before, limit)
        .await?;
    Ok(Json(InteractionsPage {
        interactions: page.items,
        next: page.next,
    })
    .into_response())
}

pub async fn get_interaction(
    State(state): State<AppState>,
    ReadInteraction(session, id): ReadInteraction,
) -> ApiResult {
    Ok(Json(state.engine.get_interaction(session, id).await?).into_response())
}

/// `POST …/interactions/{iid}/answer`: one answer wins (`409 not_waiting` for the others);
/// the interaction runs again, here.
pub async fn answer(
    State(state): State<AppState>,
    WriteInteraction(session, id): WriteInteraction,
    JsonBody(body): JsonBody<AnswerBody>,
) -> ApiResult {
    let interaction = state
        .engine
        .answer(session, id, body.request_id, body.answer)
        .await?;
    Ok(Json(interaction).into_response())
}

pub async fn cancel(
    State(state): State<AppState>,
    WriteSession(session): WriteSession,
    OptionalJsonBody(body): OptionalJsonBody<CancelBody>,
) -> ApiResult {
    let target = match body.interaction_id {
        Some(raw) => match InteractionId::parse(&raw) {
            Ok(id) => Some(id),
            Err(_) => {
                // Malformed ids are unknown ids; the session must exist all the same.
                state.engine.get_session(session).await?;
                return Err(ApiError::not_found("interaction not found in this session"));
            }
        },
        None => None,
    };
    let cancelled = state.engine.cancel(session, target).await?;
    Ok(Json(json!({ "cancelled": cancelled })).into_response())
}

pub async fn clear(
    State(state): State<AppState>,
    WriteSession(session): WriteSession,
    OptionalJsonBody(EmptyBody {}): OptionalJsonBody<EmptyBody>,
) -> ApiResult {
    let cleared = state.engine.clear(session).await?;
    Ok(Json(json!({"epoch": cleared.epoch, "cancelled": cleared.cancelled})).into_response())
}

pub async fn get_context(
    State(state): State<AppState>,
    ReadSession(session, _): ReadSession,
) -> ApiResult {
    Ok(Json(state.engine.get_context(session).await?).into_response())
}

fn object_body(value: Value, what: &str) -> Result<JsonObject, ApiError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::invalid_request(format!(
            "{what} must be a JSON object"
        ))),
    }
}

pub async fn put_context(
    State(state): State<AppState>,
    WriteSession(session): WriteSession,
    JsonBody(value): JsonBody<Value>,
) -> ApiResult {
    let context = object_body(value, "the context")?;
    let context = state
        .engine
        .update_context(session, Some(context), None)
        .await?;
    Ok(Json(context).into_response())
}

pub async fn patch_context(
    State(state): State<AppState>,
    WriteSession(session): WriteSession,
    JsonBody(value): JsonBody<Value>,
) -> ApiResult {
    let patch = object_body(value, "a merge patch of the context")?;
    let context = state
        .engine
        .update_context(session, None, Some(patch))
        .await?;
    Ok(Json(context).into_response())
}

/// `POST /v1/sessions/{id}/tokens` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    pub scope: Option<String>,
    pub ttl_s: Option<u64>,
}

/// `POST /v1/sessions/{id}/tokens`: a signed token for this one session (a key's business).
/// Everything is checked before the session is created.
pub async fn create_token(
    State(state): State<AppState>,
    KeySession(session, caller): KeySession,
    OptionalJsonBody(body): OptionalJsonBody<TokenBody>,
) -> ApiResult {
    let scope = match body.scope.as_deref() {
        None => Scope::Write,
        Some(raw) => Scope::parse(raw)
            .ok_or_else(|| ApiError::invalid_request("scope must be \"read\" or \"write\""))?,
    };
    let ttl_s = body.ttl_s.unwrap_or(900);
    if !(1..=MAX_TOKEN_TTL_S).contains(&ttl_s) {
        return Err(ApiError::invalid_request(format!(
            "ttl_s must be an integer from 1 to {MAX_TOKEN_TTL_S}"
        )));
    }
    if !state.auth.can_mint() {
        return Err(ApiError::invalid_request(
            "no token secret is configured: set [auth] token_secret_env",
        ));
    }
    state
        .engine
        .put_session(session.clone(), None, None)
        .await?;
    let minted = state
        .auth
        .mint(caller.key_id(), &session, scope, ttl_s)
        .ok_or_else(ApiError::internal)?;
    let expires_at = crate::model::Millis(minted.expires_at as i64 * 1000);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "token": minted.token,
            "session": session.name(),
            "scope": minted.scope.as_str(),
            "expires_at": expires_at,
        })),
    )
        .into_response())
}

/// The OpenAPI 3 description of the HTTP API (checked to parse in tests).
pub const OPENAPI: &str = include_str!("openapi.json");

/// [`OPENAPI`] with the configured agents as the values `agent` may take, so the document
/// says exactly what this server accepts.
pub async fn openapi(State(state): State<AppState>) -> Response {
    let mut document: Value = match serde_json::from_str(OPENAPI) {
        Ok(document) => document,
        Err(e) => {
            tracing::error!(error = %e, "the embedded OpenAPI document does not parse");
            return ApiError::internal().into_response();
        }
    };
    let names: Vec<Value> = state
        .engine
        .agents()
        .iter()
        .map(|(name, _)| Value::from(name))
        .chain([Value::Null])
        .collect();
    if let Some(agent) = document.pointer_mut(
        "/paths/~1v1~1sessions~1{id}/put/requestBody/content/application~1json/schema/properties/agent",
    ) {
        agent["enum"] = Value::Array(names);
    }
    Json(document).into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
