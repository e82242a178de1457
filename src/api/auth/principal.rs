//! Who is calling, once the gate has checked their credentials: a tenant and the kind of
//! caller (open, an API key, a session token of one scope), and what that lets it reach.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::request::Parts;

use super::bucket::Meter;
use crate::api::error::ApiError;
use crate::api::extract::session_id_from_uri;
use crate::model::{SessionId, Tenant};

/// A session token's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The session's `GET`s, its SSE stream and its WebSocket (only `ping` as an op).
    Read,
    /// Everything a key may do on that one session except `PUT`, `DELETE` and minting tokens.
    Write,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            _ => None,
        }
    }
}

/// Who is calling, once the gate has checked their credentials.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The tenant every session named by this request belongs to.
    pub tenant: Tenant,
    pub caller: Caller,
    /// The rate bucket and counters of the key behind the caller (the minting key, for a
    /// token); `None` when access control is off.
    pub(super) meter: Option<Arc<Meter>>,
}

/// The kind of caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Access control is off: tenant `default`, everything allowed.
    Open,
    /// An API key (by its configured id, which is not secret).
    Key { id: Arc<str>, admin: bool },
    /// A session token: one session of its tenant, within its scope, until it expires.
    Token {
        session: Arc<str>,
        scope: Scope,
        /// Unix seconds.
        expires_at: u64,
        /// The id of the key that minted it: the token is valid only while that key is
        /// configured.
        key: Arc<str>,
    },
}

impl Principal {
    /// The caller when access control is off.
    pub(super) fn open() -> Self {
        Self {
            tenant: Tenant::default_tenant(),
            caller: Caller::Open,
            meter: None,
        }
    }

    /// The id of the key behind this caller (the minting key, for a token); `""` when access
    /// control is off.
    pub fn key_id(&self) -> &str {
        match &self.caller {
            Caller::Open => "",
            Caller::Key { id, .. } => id,
            Caller::Token { key, .. } => key,
        }
    }

    /// Takes one request (or WebSocket operation) from the bucket of the caller's key:
    /// `429 rate_limited` past its `rate_per_s`.
    pub fn charge(&self) -> Result<(), ApiError> {
        match &self.meter {
            Some(meter) => meter.charge(),
            None => Ok(()),
        }
    }

    /// When this caller's access ends on its own (a token's expiry), for long-lived
    /// streams.
    pub fn expires_at(&self) -> Option<SystemTime> {
        match self.caller {
            Caller::Token { expires_at, .. } => Some(UNIX_EPOCH + Duration::from_secs(expires_at)),
            _ => None,
        }
    }

    /// Whether WebSocket operations that change the session are allowed.
    pub fn can_write(&self) -> bool {
        !matches!(
            self.caller,
            Caller::Token {
                scope: Scope::Read,
                ..
            }
        )
    }

    /// The caller for logs: a key by its configured id, a token by its session and scope;
    /// never a credential.
    pub(super) fn describe(&self) -> String {
        match &self.caller {
            Caller::Open => "open".into(),
            Caller::Key { id, admin } => {
                format!("key {id}{}", if *admin { " (admin)" } else { "" })
            }
            Caller::Token { session, scope, .. } => {
                format!("token for {session} ({})", scope.as_str())
            }
        }
    }

    fn is_token(&self) -> bool {
        matches!(self.caller, Caller::Token { .. })
    }

    /// The session `name` of the path, for this caller: a token reaches its own session only.
    pub(super) fn session(&self, parts: &Parts, write: bool) -> Result<SessionId, ApiError> {
        // Decoded and checked before any access decision: a malformed id is `400` for everyone.
        let id = session_id_from_uri(&self.tenant, &parts.uri)?;
        if let Caller::Token { session, scope, .. } = &self.caller {
            if **session != *id.name() {
                return Err(ApiError::forbidden(
                    "this session token is for another session",
                ));
            }
            if write && *scope == Scope::Read {
                return Err(ApiError::forbidden(
                    "this session token only reads (scope read)",
                ));
            }
        }
        Ok(id)
    }

    pub(super) fn require_key(&self, what: &str) -> Result<(), ApiError> {
        if self.is_token() {
            return Err(ApiError::forbidden(format!(
                "a session token cannot {what}; use an API key"
            )));
        }
        Ok(())
    }
}
