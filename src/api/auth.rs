//! Access control: the one gate every request goes through.
//!
//! [`gate`] turns a request's credentials (an API key or a session token) into a
//! [`Principal`] — a tenant and what the caller may do — once, before any handler runs, and
//! refuses what has none. Handlers reach a session only through the extractors below
//! ([`ReadSession`], [`WriteSession`], [`KeySession`], …), which build the [`SessionId`] from
//! the principal's tenant: there is no other way for a route to name a session, so a route
//! cannot reach another tenant's rows, nor a token's caller another session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac, rand::SecureRandom};

use super::AppState;
use super::error::ApiError;
use super::extract::session_id_from_uri;
use crate::config::{AuthConfig, AuthMode, KeyRole};
use crate::model::{InteractionId, SessionId, Tenant, percent_decode};

/// The header an admin key names another tenant with.
pub const TENANT_HEADER: &str = "baton-tenant";
/// What every session token starts with (API keys never do).
const TOKEN_PREFIX: &str = "bt1.";
/// What `baton key new` keys start with.
const KEY_PREFIX: &str = "bk_";
/// Longest lifetime of a session token, in seconds.
pub const MAX_TOKEN_TTL_S: u64 = 86_400;
/// Shortest token secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

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
    meter: Option<Arc<Meter>>,
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
    fn open() -> Self {
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
    fn describe(&self) -> String {
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
    fn session(&self, parts: &Parts, write: bool) -> Result<SessionId, ApiError> {
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

    fn require_key(&self, what: &str) -> Result<(), ApiError> {
        if self.is_token() {
            return Err(ApiError::forbidden(format!(
                "a session token cannot {what}; use an API key"
            )));
        }
        Ok(())
    }
}

/// One configured API key.
struct ApiKey {
    id: Arc<str>,
    tenant: Tenant,
    admin: bool,
    sha256: [u8; 32],
    meter: Arc<Meter>,
}

/// A key's rate bucket and counters, shared by every request and WebSocket operation made
/// with the key or with a token it minted.
struct Meter {
    bucket: Option<Mutex<Bucket>>,
    /// Requests (and WebSocket operations) it allowed, and those refused past its rate (for
    /// `/metrics`).
    requests: AtomicU64,
    limited: AtomicU64,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("limited", &self.bucket.is_some())
            .finish()
    }
}

impl Meter {
    fn charge(&self) -> Result<(), ApiError> {
        if let Some(bucket) = &self.bucket {
            let taken = bucket.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Err(retry_after) = taken {
                self.limited.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::rate_limited(retry_after));
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A token bucket: `rate` per second, up to `2 × rate`, starting full (a key's requests, a
/// WebSocket's operations).
pub(crate) struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            rate,
            tokens: 2.0 * rate,
            last: Instant::now(),
        }
    }

    /// Takes one token, or says how many seconds until one is there.
    pub(crate) fn take(&mut self) -> Result<(), u64> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / self.rate).ceil() as u64)
        }
    }
}

/// The access settings, built once at start-up from `[auth]`.
pub struct Auth {
    mode: AuthMode,
    keys: Vec<ApiKey>,
    /// The first signs; all verify.
    secrets: Vec<hmac::Key>,
    /// Requests refused for their credentials (`401`).
    refused: AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets or the hashes.
        f.debug_struct("Auth")
            .field("mode", &self.mode)
            .field("keys", &self.keys.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// A minted session token, as `POST …/tokens` answers it.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub token: String,
    pub scope: Scope,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Auth {
    /// Access control off: every request is tenant `default`.
    pub fn open() -> Self {
        Self {
            mode: AuthMode::None,
            keys: Vec::new(),
            secrets: Vec::new(),
            refused: AtomicU64::new(0),
        }
    }

    /// Builds the gate from `[auth]` (absent: open), reading the token secrets from the
    /// environment through `var`.
    pub fn from_config(
        config: Option<&AuthConfig>,
        var: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let Some(config) = config else {
            return Ok(Self::open());
        };
        let mut keys = Vec::with_capacity(config.keys.len());
        for key in &config.keys {
            let mut sha256 = [0u8; 32];
            let hex = key.sha256.trim().to_ascii_lowercase();
            for (i, byte) in sha256.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .map_err(|_| anyhow::anyhow!("auth key {:?}: sha256 is not hex", key.id))?;
            }
            keys.push(ApiKey {
                id: Arc::from(key.id.as_str()),
                tenant: Tenant::parse(&key.tenant)?,
                admin: key.role == KeyRole::Admin,
                sha256,
                meter: Arc::new(Meter {
                    bucket: key.rate_per_s.map(|rate| Mutex::new(Bucket::new(rate))),
                    requests: AtomicU64::new(0),
                    limited: AtomicU64::new(0),
                }),
            });
        }
        let mut secrets = Vec::with_capacity(config.token_secret_env.len());
        for value in &config.token_secrets {
            if value.len() < MIN_SECRET_BYTES {
                anyhow::bail!("a token secret must be at least {MIN_SECRET_BYTES} bytes");
            }
            secrets.push(hmac::Key::new(hmac::HMAC_SHA256, value.as_bytes()));
        }
        for name in &config.token_secret_env {
            let value = var(name).unwrap_or_default();
            if value.len() < MIN_SECRET_BYTES {
                anyhow::bail!(
                    "auth.token_secret_env names {name}, which is {}: set it to a random secret \
                     of at least {MIN_SECRET_BYTES} bytes (`baton key new` output works)",
                    if value.is_empty() {
                        "not set"
                    } else {
                        "too short"
                    }
                );
            }
            secrets.push(hmac::Key::new(hmac::HMAC_SHA256, value.as_bytes()));
        }
        Ok(Self {
            mode: config.mode,
            keys,
            secrets,
            refused: AtomicU64::new(0),
        })
    }

    /// `(key id, requests, refused past its rate)` of every configured key, and the requests
    /// refused for their credentials, for `/metrics`.
    pub fn stats(&self) -> (Vec<(Arc<str>, u64, u64)>, u64) {
        let keys = self
            .keys
            .iter()
            .map(|k| {
                (
                    k.id.clone(),
                    k.meter.requests.load(Ordering::Relaxed),
                    k.meter.limited.load(Ordering::Relaxed),
                )
            })
            .collect();
        (keys, self.refused.load(Ordering::Relaxed))
    }

    /// Whether a token secret is configured.
    pub fn can_mint(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Whether requests need credentials.
    pub fn is_on(&self) -> bool {
        self.mode == AuthMode::Keys
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

    /// The configured key of this id (ids are not secret: no constant-time comparison).
    fn key_by_id(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|key| &*key.id == id)
    }

    /// The key whose hash matches. Every configured hash is compared, each in constant time,
    /// so the time taken says nothing about which (if any) matched, nor how closely.
    fn find_key(&self, presented: &str) -> Option<&ApiKey> {
        let hash = digest::digest(&digest::SHA256, presented.as_bytes());
        let mut found = None;
        for key in &self.keys {
            let diff = key
                .sha256
                .iter()
                .zip(hash.as_ref())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if std::hint::black_box(diff) == 0 {
                found = Some(key);
            }
        }
        found
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

    /// Signs a token for `session` (of its tenant), valid for `ttl` seconds from now, minted
    /// by the key `key` (its id): it lives only as long as that key is configured.
    pub fn mint(
        &self,
        key: &str,
        session: &SessionId,
        scope: Scope,
        ttl_s: u64,
    ) -> Option<MintedToken> {
        // Rounded up, so a token lives at least `ttl_s` seconds; but never further from now
        // than the longest lifetime, which verification enforces.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let expires_at = (now.as_secs() + u64::from(now.subsec_nanos() > 0) + ttl_s)
            .min(now.as_secs() + MAX_TOKEN_TTL_S);
        Some(MintedToken {
            token: self.sign(key, session, scope, expires_at)?,
            scope,
            expires_at,
        })
    }

    /// The token of `session` and `scope` until `expires_at` (Unix seconds), minted by `key`.
    /// The key's id comes last: it is the only field that may hold a `/`.
    fn sign(
        &self,
        key: &str,
        session: &SessionId,
        scope: Scope,
        expires_at: u64,
    ) -> Option<String> {
        let secret = self.secrets.first()?;
        let payload = format!(
            "{}/{}/{}/{expires_at}/{key}",
            session.tenant(),
            session.name(),
            scope.as_str()
        );
        let signed = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        let tag = hmac::sign(secret, signed.as_bytes());
        Some(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())))
    }

    /// Checks a token's signature (against every secret), its expiry (past, or further than
    /// the longest lifetime from now) and that its minting key is still configured.
    pub fn verify_token(&self, token: &str) -> Result<Principal, ApiError> {
        let invalid = || ApiError::unauthorized("invalid session token");
        let (signed, tag) = token.rsplit_once('.').ok_or_else(invalid)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        if !self
            .secrets
            .iter()
            .any(|secret| hmac::verify(secret, signed.as_bytes(), &tag).is_ok())
        {
            return Err(invalid());
        }
        let payload = signed
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|p| String::from_utf8(p).ok())
            .ok_or_else(invalid)?;
        let mut fields = payload.splitn(5, '/');
        let (Some(tenant), Some(session), Some(scope), Some(expires_at), Some(key)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(invalid());
        };
        let tenant = Tenant::parse(tenant).map_err(|_| invalid())?;
        let scope = Scope::parse(scope).ok_or_else(invalid)?;
        let expires_at: u64 = expires_at.parse().map_err(|_| invalid())?;
        SessionId::new(&tenant, session).map_err(|_| invalid())?;
        let now = unix_now();
        if expires_at <= now {
            return Err(ApiError::unauthorized("the session token has expired"));
        }
        // However it was signed (a leaked secret, a clock far off when it was minted).
        if expires_at > now.saturating_add(MAX_TOKEN_TTL_S) {
            return Err(ApiError::unauthorized(
                "the session token's expiry is further away than a token may live",
            ));
        }
        let minter = self.key_by_id(key).ok_or_else(|| {
            ApiError::unauthorized("the key that minted this session token is no longer configured")
        })?;
        Ok(Principal {
            tenant,
            caller: Caller::Token {
                session: Arc::from(session),
                scope,
                expires_at,
                key: minter.id.clone(),
            },
            meter: Some(minter.meter.clone()),
        })
    }
}

/// A new random API key (`bk_` and 43 URL-safe characters: 256 random bits) and its hex
/// SHA-256, for `baton key new`.
pub fn new_key() -> anyhow::Result<(String, String)> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    Ok((key.clone(), key_sha256(&key)))
}

/// The hex SHA-256 of a key, as `[[auth.keys]] sha256` holds it.
pub fn key_sha256(key: &str) -> String {
    digest::digest(&digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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
    use super::*;

    fn auth(secrets: &[&str]) -> Auth {
        auth_with_keys(secrets, &[("k1", None)])
    }

    /// Keys by id, each with an optional rate; the key itself is `key-<id>`.
    fn auth_with_keys(secrets: &[&str], keys: &[(&str, Option<f64>)]) -> Auth {
        let config = AuthConfig {
            mode: AuthMode::Keys,
            token_secret_env: secrets.iter().map(|s| s.to_string()).collect(),
            token_secrets: Vec::new(),
            cors_origins: Vec::new(),
            keys: keys
                .iter()
                .map(|(id, rate)| crate::config::KeyConfig {
                    id: id.to_string(),
                    tenant: "acme".into(),
                    role: KeyRole::Tenant,
                    sha256: key_sha256(&format!("key-{id}")),
                    rate_per_s: *rate,
                })
                .collect(),
        };
        Auth::from_config(Some(&config), |name| {
            Some(format!("secret-of-{name}-0123456789"))
        })
        .expect("auth")
    }

    fn session(tenant: &str, name: &str) -> SessionId {
        SessionId::new(&Tenant::parse(tenant).unwrap(), name).unwrap()
    }

    #[test]
    fn tokens_round_trip_and_refuse_tampering() {
        let a = auth(&["A"]);
        let minted = a
            .mint("k1", &session("acme", "demo:1"), Scope::Read, 60)
            .unwrap();
        let p = a.verify_token(&minted.token).expect("valid");
        assert_eq!(p.tenant.as_str(), "acme");
        let Caller::Token { session, scope, .. } = &p.caller else {
            panic!("a token")
        };
        assert_eq!((&**session, *scope), ("demo:1", Scope::Read));
        // Flip any one character: refused.
        for i in TOKEN_PREFIX.len()..minted.token.len() {
            let mut bytes = minted.token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            if tampered != minted.token {
                assert!(a.verify_token(&tampered).is_err(), "{tampered}");
            }
        }
        // Another secret does not verify it; a rotation list with the old one does.
        assert!(auth(&["B"]).verify_token(&minted.token).is_err());
        assert!(auth(&["B", "A"]).verify_token(&minted.token).is_ok());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let a = auth(&["A"]);
        let past = a
            .sign("k1", &session("acme", "s"), Scope::Write, unix_now() - 1)
            .unwrap();
        let e = a.verify_token(&past).unwrap_err();
        assert_eq!(e.code, "unauthorized");
        assert!(e.message.contains("expired"), "{}", e.message);
        // A token of ttl 1 lives at least a second.
        let minted = a
            .mint("k1", &session("acme", "s"), Scope::Write, 1)
            .unwrap();
        assert!(minted.expires_at > unix_now());
        assert!(a.verify_token(&minted.token).is_ok());
    }

    #[test]
    fn tokens_live_at_most_the_longest_lifetime() {
        let a = auth(&["A"]);
        let s = session("acme", "s");
        // The longest a token may be minted for verifies at once.
        let minted = a.mint("k1", &s, Scope::Write, MAX_TOKEN_TTL_S).unwrap();
        assert!(a.verify_token(&minted.token).is_ok());
        // One signed (with the real secret) further away is refused, `u64::MAX` included.
        for far in [unix_now() + MAX_TOKEN_TTL_S + 1, u64::MAX] {
            let token = a.sign("k1", &s, Scope::Write, far).unwrap();
            let e = a.verify_token(&token).unwrap_err();
            assert_eq!(e.code, "unauthorized", "{far}");
        }
    }

    #[test]
    fn tokens_need_their_minting_key() {
        let s = session("acme", "s");
        let before = auth_with_keys(&["A"], &[("k1", None), ("k/2", None)]);
        let of_k1 = before.mint("k1", &s, Scope::Read, 60).unwrap().token;
        let of_k2 = before.mint("k/2", &s, Scope::Read, 60).unwrap().token;
        let p = before.verify_token(&of_k2).unwrap();
        assert_eq!(p.key_id(), "k/2");
        // The same secret, without key k1 (removed, then a restart): its tokens are refused.
        let after = auth_with_keys(&["A"], &[("k/2", None)]);
        assert_eq!(after.verify_token(&of_k1).unwrap_err().code, "unauthorized");
        assert!(after.verify_token(&of_k2).is_ok());
    }

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

    #[test]
    fn buckets_refill_at_their_rate() {
        let mut b = Bucket::new(1.0);
        assert!(b.take().is_ok());
        assert!(b.take().is_ok());
        assert_eq!(b.take(), Err(1));
    }

    #[test]
    fn new_keys_hash_as_configured() {
        let (key, hash) = new_key().unwrap();
        assert!(key.starts_with(KEY_PREFIX) && key.len() == 46);
        assert_eq!(hash, key_sha256(&key));
        assert_eq!(hash.len(), 64);
    }

    #[test]
    fn loopback_listen_addresses() {
        use crate::config::is_loopback;
        for open in ["127.0.0.1:7420", "[::1]:80", "localhost:1", "127.1.2.3:0"] {
            assert!(is_loopback(open), "{open}");
        }
        for public in ["0.0.0.0:7420", "[::]:80", "10.0.0.1:1", "example.com:80"] {
            assert!(!is_loopback(public), "{public}");
        }
    }
}
