//! Extractors whose rejections are the API's own errors, so malformed input gets the same
//! error shape as every other error.

use std::time::Duration;

use axum::body::{BodyDataStream, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri, header};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::AppState;
use super::error::ApiError;
use crate::model::{SessionId, Tenant, percent_decode};

/// The `index`th segment of the path, percent-decoded; `None` when an escape is malformed or
/// decodes to something that is not UTF-8.
fn path_segment(uri: &Uri, index: usize) -> Option<String> {
    percent_decode(uri.path().split('/').nth(index).unwrap_or(""))
}

/// The `{id}` of `/v1/sessions/{id}/…` as a session of `tenant`, percent-decoded and then
/// validated: `a%3Ab` is the session `a:b`, and an encoded `/` decodes to a character ids
/// cannot hold, so it is `400 invalid_session_id`, never a 404. Handlers get their session
/// from the access extractors of [`super::auth`], which call this with the caller's tenant.
pub(super) fn session_id_from_uri(tenant: &Tenant, uri: &Uri) -> Result<SessionId, ApiError> {
    let invalid = |message: String| ApiError::invalid_session_id(message);
    let raw = path_segment(uri, 3)
        .ok_or_else(|| invalid("the session id is not a valid percent-encoded string".into()))?;
    SessionId::new(tenant, &raw).map_err(|e| invalid(e.0))
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

/// How much of an oversized body is still read (and thrown away) after the `413` answer, so a
/// client that uploads everything before it reads gets that answer instead of a connection
/// reset (what nginx calls a lingering close).
const DRAIN_MAX_BYTES: usize = 16 * 1024 * 1024;
/// How long that draining may take.
const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

/// Reads the whole body: `413` past `limit` bytes, `400` when it is cut short or malformed
/// (bad chunked encoding, fewer bytes than its `Content-Length`) or does not arrive within
/// `timeout`.
pub async fn read_body(req: Request, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let declared = content_length(req.headers());
    // A client waiting for `100 Continue` has not sent its body: nothing to drain.
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = req.into_body().into_data_stream();
    if declared.is_some_and(|length| length > limit) {
        if !expects_continue {
            drain_in_background(body);
        }
        return Err(ApiError::payload_too_large(limit));
    }
    let read = async {
        let mut buffer = Vec::with_capacity(declared.unwrap_or(0));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|_| BodyError::Malformed)?;
            if buffer.len() + chunk.len() > limit {
                return Err(BodyError::TooLarge);
            }
            buffer.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buffer))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(BodyError::TooLarge)) => {
            drain_in_background(body);
            Err(ApiError::payload_too_large(limit))
        }
        Ok(Err(BodyError::Malformed)) => Err(ApiError::invalid_request(
            "the body is malformed or shorter than its Content-Length",
        )
        .closing()),
        Err(_) => Err(ApiError::invalid_request(format!(
            "the body did not arrive within {} s",
            timeout.as_secs_f64()
        ))
        .closing()),
    }
}

enum BodyError {
    TooLarge,
    Malformed,
}

/// Keeps reading what the client still sends, within [`DRAIN_MAX_BYTES`] and
/// [`DRAIN_MAX_TIME`], while the `413` answer is written. The connection lives as long as
/// the body is held, so graceful shutdown waits for this too; the bounds end it.
fn drain_in_background(mut body: BodyDataStream) {
    tokio::spawn(async move {
        let drain = async {
            let mut drained = 0;
            while let Some(Ok(chunk)) = body.next().await {
                drained += chunk.len();
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_MAX_TIME, drain).await;
    });
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
    numbers_kept(bytes)?;
    // Read straight from the text (a detour through a Value would round some numbers), once:
    // only a body that is not an object, or fails, is parsed again to say which it is.
    let object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    let parsed = if object {
        serde_json::from_slice(bytes).ok()
    } else {
        None
    };
    if let Some(parsed) = parsed {
        return Ok(parsed);
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_request(format!("malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("the body must be a JSON object"));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid_request(format!("invalid request body: {e}")))
}

/// Refuses JSON whose numbers would not come back as they were written. Numbers are kept as
/// their text (serde_json's `arbitrary_precision`), except forms it rewrites (`1E5` becomes
/// `1e+5`, some long fractions are rounded): those are `400`, never silently changed.
pub fn numbers_kept(json: &[u8]) -> Result<(), ApiError> {
    let mut i = 0;
    let mut in_string = false;
    while i < json.len() {
        let byte = json[i];
        if in_string {
            match byte {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let text = &json[start..i];
                // A malformed number is the parser's to report.
                if let Ok(number) = serde_json::from_slice::<serde_json::Number>(text)
                    && number.to_string().as_bytes() != text
                {
                    return Err(ApiError::invalid_request(format!(
                        "the number {} cannot be kept exactly as written (it would read back \
                         as {number}); send it as {number} or as a string",
                        String::from_utf8_lossy(text)
                    )));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.max_body_bytes, state.body_timeout).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_request("a JSON body is required"));
        }
        parse_json(&bytes).map(JsonBody)
    }
}

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = read_body(req, state.max_body_bytes, state.body_timeout).await?;
        // Only no body at all is "no body": whitespace is malformed JSON.
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_json(&bytes).map(OptionalJsonBody)
    }
}

#[cfg(test)]
mod tests {
    use super::numbers_kept;

    #[test]
    fn numbers_that_read_back_as_written_pass_and_others_are_refused() {
        for kept in [
            r#"{"a": 1, "b": -2, "c": 123456789012345678901234567890, "d": 1.10}"#,
            r#"{"e": -123456789012345678901234567890, "f": 0.1000000000000000055511151231257827}"#,
            r#"{"g": 1e+400, "h": 2.5e-3, "s": "1E5 and \" 1e400 in a string"}"#,
            r#"[0, -0, 10, 3.14159265358979323846264338327950288]"#,
        ] {
            assert!(numbers_kept(kept.as_bytes()).is_ok(), "{kept}");
        }
        for changed in [r#"{"a": 1E5}"#, r#"{"a": 1e400}"#] {
            let e = numbers_kept(changed.as_bytes()).unwrap_err();
            assert_eq!(e.code, "invalid_request", "{changed}");
        }
    }
}
