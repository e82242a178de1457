//! Extractors whose rejections are the API's own errors, so malformed input gets the same
//! error shape as every other error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri, header};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use crate::model::{InteractionId, SessionId};

/// The `{id}` of `/v1/sessions/{id}/…`, validated on the raw (still percent-encoded) path,
/// so an encoded `/` or any escape is `400 invalid_session_id`, never a 404.
pub struct SessionPath(pub SessionId);

/// `/v1/sessions/{id}/interactions/{iid}`: a malformed `iid` is simply not found.
pub struct InteractionPath(pub SessionId, pub InteractionId);

fn raw_segment(uri: &Uri, index: usize) -> &str {
    uri.path().split('/').nth(index).unwrap_or("")
}

pub fn session_id_from_uri(uri: &Uri) -> Result<SessionId, ApiError> {
    SessionId::parse(raw_segment(uri, 3)).map_err(|e| ApiError::invalid_session_id(e.0))
}

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        session_id_from_uri(&parts.uri).map(SessionPath)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for InteractionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let session = session_id_from_uri(&parts.uri)?;
        let id = InteractionId::parse(raw_segment(&parts.uri, 5))
            .map_err(|_| ApiError::not_found("interaction not found in this session"))?;
        Ok(InteractionPath(session, id))
    }
}

/// The query string's parameters, percent-decoded.
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn from_uri(uri: &Uri) -> Self {
        let query = uri.query().unwrap_or("");
        Self(
            form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The value of `name`; given twice is an error.
    pub fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self.0.iter().filter(|(k, _)| k == name);
        let first = values.next().map(|(_, v)| v.as_str());
        if values.next().is_some() {
            return Err(ApiError::invalid_request(format!(
                "query parameter {name} is given more than once"
            )));
        }
        Ok(first)
    }

    /// An integer parameter within `min..=max`.
    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(raw) = self.get(name)? else {
            return Ok(None);
        };
        match raw.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid_request(format!(
                "query parameter {name} must be an integer from {min} to {max}"
            ))),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Ok(QueryParams::from_uri(&parts.uri))
    }
}

/// A JSON body, at most `max_body_bytes` long (`413 payload_too_large` past it).
pub struct JsonBody<T>(pub T);

/// Like [`JsonBody`], but an empty body gives `T::default()`.
pub struct OptionalJsonBody<T>(pub T);

async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    if let Some(length) = content_length(req.headers())
        && length > limit
    {
        return Err(ApiError::payload_too_large(limit));
    }
    // A body that is cut off or exceeds the limit while streaming ends up here too.
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::payload_too_large(limit))
}

fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Parses a JSON object into `T`, turning every failure into `400 invalid_request` with
/// serde's explanation. Only an object is accepted: serde would otherwise fill a struct from
/// an array, field by field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_request(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("the body must be a JSON object"));
    }
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid_request(format!("invalid request body: {e}")))
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_request("a JSON body is required"));
        }
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.max_body_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}
