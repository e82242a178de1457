//! The one access gate: credentials (an `Authorization` header, or a session token in a
//! stream's URL) become a [`Principal`] once, before routing; the extractors hand handlers
//! the sessions that principal may reach, and nothing else.

use std::sync::atomic::Ordering;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::keys::Auth;
use super::principal::{Caller, Principal};
use super::token::TOKEN_PREFIX;
use crate::api::AppState;
use crate::api::error::ApiError;
use crate::config::AuthMode;
use crate::model::{InteractionId, SessionId, Tenant, percent_decode};

/// The header an admin key names another tenant with.
pub const TENANT_HEADER: &str = "baton-tenant";

/// The `Authorization: Bearer …` credential, if the header is there.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, credential))
            if scheme.eq_ignore_ascii_case("bearer") && !credential.trim().is_empty() =>
        {
            Ok(Some(credential.trim()))
        }
        _ => Err(ApiError::unauthorized(
            "the Authorization header must be: Bearer <API key or session token>",
        )),
    }
}

/// `access_token=` of a `GET …/ws` or `GET …/events` (browsers cannot set headers there);
/// anywhere else it is ignored. Only a session token may travel in a URL: an API key there
/// is refused, as URLs end up in logs.
fn query_token(parts: &Parts) -> Result<Option<String>, ApiError> {
    if !streams_token_in_query(parts) {
        return Ok(None);
    }
    let Some(query) = parts.uri.query() else {
        return Ok(None);
    };
    let mut found = None;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == "access_token" {
            if found.is_some() {
                return Err(ApiError::unauthorized(
                    "access_token is given more than once",
                ));
            }
            found = Some(value.into_owned());
        }
    }
    match found {
        Some(token) if !token.starts_with(TOKEN_PREFIX) => Err(ApiError::unauthorized(
            "only a session token may be sent as access_token; send an API key in the \
             Authorization header",
        )),
        other => Ok(other),
    }
}

/// `GET /v1/sessions/{id}/ws` or `GET /v1/sessions/{id}/events`.
fn streams_token_in_query(parts: &Parts) -> bool {
    if parts.method != Method::GET {
        return false;
    }
    let segments: Vec<&str> = parts.uri.path().split('/').collect();
    matches!(
        segments.as_slice(),
        ["", "v1", "sessions", _, "ws" | "events"]
    )
}

impl Auth {
    /// A key or a token, from the `Authorization` header (not yet counted against the key's
    /// rate: [`Principal::charge`]).
    pub fn resolve(&self, credential: &str) -> Result<Principal, ApiError> {
        if credential.starts_with(TOKEN_PREFIX) {
            return self.verify_token(credential);
        }
        let key = self
            .find_key(credential)
            .ok_or_else(|| ApiError::unauthorized("unknown API key"))?;
        Ok(Principal {
            tenant: key.tenant.clone(),
            caller: Caller::Key {
                id: key.id.clone(),
                admin: key.admin,
            },
            meter: Some(key.meter.clone()),
        })
    }

    /// The principal of a request to `parts`, or why it has none.
    fn authenticate(&self, parts: &Parts) -> Result<Principal, ApiError> {
        if self.mode == AuthMode::None {
            return Ok(Principal::open());
        }
        let principal = match bearer(&parts.headers)? {
            Some(credential) => self.resolve(credential)?,
            None => match query_token(parts)? {
                Some(token) => self.verify_token(&token)?,
                None => {
                    return Err(ApiError::unauthorized(
                        "credentials required: send Authorization: Bearer <API key or session token>",
                    ));
                }
            },
        };
        let principal = self.with_tenant_header(principal, &parts.headers)?;
        principal.charge()?;
        Ok(principal)
    }

    /// `Baton-Tenant`: an admin key acts on the tenant it names; anyone else sending it is
    /// refused, even naming their own tenant.
    fn with_tenant_header(
        &self,
        mut principal: Principal,
        headers: &HeaderMap,
    ) -> Result<Principal, ApiError> {
        let Some(value) = headers.get(TENANT_HEADER) else {
            return Ok(principal);
        };
        if !matches!(principal.caller, Caller::Key { admin: true, .. }) {
            return Err(ApiError::forbidden(
                "only an admin key may name a tenant with Baton-Tenant",
            ));
        }
        let name = value
            .to_str()
            .ok()
            .and_then(|v| Tenant::parse(v.trim()).ok())
            .ok_or_else(|| {
                ApiError::invalid_request("Baton-Tenant must be 1-64 characters of [a-z0-9_-]")
            })?;
        principal.tenant = name;
        Ok(principal)
    }
}

/// Paths anyone may read: liveness, readiness, the API description, the console's files.
fn is_open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/openapi.json" | "/")
        || path == "/console"
        || path.starts_with("/console/")
}

/// The gate: every request passes here before routing. Open paths go through; any other
/// gets the caller's [`Principal`] in its extensions, or is refused (`401`, `403` for a
/// misused `Baton-Tenant`, `429` past the key's rate).
pub async fn gate(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_open_path(request.uri().path()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    match state.auth.authenticate(&parts) {
        Ok(principal) => {
            if tracing::enabled!(tracing::Level::TRACE) {
                tracing::trace!(
                    method = %parts.method,
                    path = parts.uri.path(),
                    tenant = %principal.tenant,
                    caller = principal.describe(),
                    "request authenticated"
                );
            }
            parts.extensions.insert(principal);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => {
            if e.status == axum::http::StatusCode::UNAUTHORIZED {
                state.auth.refused.fetch_add(1, Ordering::Relaxed);
            }
            // The path only: a query may hold a token.
            tracing::debug!(
                method = %parts.method,
                path = parts.uri.path(),
                status = e.status.as_u16(),
                reason = %e.message,
                "request refused by the access gate"
            );
            e.into_response()
        }
    }
}

/// The principal the gate left in the request's extensions.
fn principal(parts: &Parts) -> Result<Principal, ApiError> {
    // Only a router without the gate lacks it: refuse rather than guess a tenant.
    parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
        tracing::error!("a request reached a handler without passing the access gate");
        ApiError::internal()
    })
}

/// Any authenticated caller (key, token or open).
pub struct AnyCaller(pub Principal);

/// A key's (or open) caller: the tenant it acts on. Tokens are refused.
pub struct TenantCaller(pub Tenant);

/// An admin key, or anyone when access control is off.
pub struct AdminCaller;

/// The path's session, readable by the caller: a key of its tenant, or a token (any scope)
/// for that session.
pub struct ReadSession(pub SessionId, pub Principal);

/// The path's session, writable by the caller: a key, or a `write` token for it.
pub struct WriteSession(pub SessionId);

/// The path's session, for what only a key may do (`PUT`, `DELETE`, minting tokens), and
/// the key's caller.
pub struct KeySession(pub SessionId, pub Principal);

/// `/v1/sessions/{id}/interactions/{iid}`, readable by the caller; a malformed `iid` is
/// simply not found.
pub struct ReadInteraction(pub SessionId, pub InteractionId);

/// `/v1/sessions/{id}/interactions/{iid}/…`, writable by the caller (a key, or a `write`
/// token of the session); a malformed `iid` is simply not found.
pub struct WriteInteraction(pub SessionId, pub InteractionId);

/// The `{iid}` of the path: a malformed one is simply not found.
fn interaction_id(parts: &Parts) -> Result<InteractionId, ApiError> {
    parts
        .uri
        .path()
        .split('/')
        .nth(5)
        .and_then(percent_decode)
        .and_then(|raw| InteractionId::parse(&raw).ok())
        .ok_or_else(|| ApiError::not_found("interaction not found in this session"))
}

impl<S: Send + Sync> FromRequestParts<S> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        principal(parts).map(AnyCaller)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TenantCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        principal.require_key("list sessions")?;
        Ok(TenantCaller(principal.tenant))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        match principal(parts)?.caller {
            Caller::Open | Caller::Key { admin: true, .. } => Ok(AdminCaller),
            _ => Err(ApiError::forbidden("this needs an admin key")),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReadSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        let id = principal.session(parts, false)?;
        Ok(ReadSession(id, principal))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WriteSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        principal.session(parts, true).map(WriteSession)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for KeySession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        let id = principal.session(parts, true)?;
        let what = match parts.method {
            Method::PUT => "create or change a session",
            Method::DELETE => "delete a session",
            _ => "create session tokens",
        };
        principal.require_key(what)?;
        Ok(KeySession(id, principal))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ReadInteraction {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        let session = principal.session(parts, false)?;
        Ok(ReadInteraction(session, interaction_id(parts)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WriteInteraction {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let principal = principal(parts)?;
        let session = principal.session(parts, true)?;
        Ok(WriteInteraction(session, interaction_id(parts)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::fixtures::{auth_with_keys, session};
    use super::super::principal::Scope;

    #[test]
    fn tokens_draw_from_their_minting_keys_bucket() {
        let a = auth_with_keys(&["A"], &[("slow", Some(1.0))]);
        let token = a
            .mint("slow", &session("acme", "s"), Scope::Write, 60)
            .unwrap()
            .token;
        // The key's bucket holds 2: the key and its token share it.
        assert!(a.resolve("key-slow").unwrap().charge().is_ok());
        assert!(a.resolve(&token).unwrap().charge().is_ok());
        let e = a.resolve(&token).unwrap().charge().unwrap_err();
        assert_eq!(e.code, "rate_limited");
        assert_eq!(
            a.resolve("key-slow").unwrap().charge().unwrap_err().code,
            "rate_limited"
        );
    }
}
