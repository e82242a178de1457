//! Access control: the one gate every request goes through.
//!
//! [`gate()`] turns a request's credentials (an API key or a session token) into a
//! [`Principal`] — a tenant and what the caller may do — once, before any handler runs, and
//! refuses what has none. Handlers reach a session only through its extractors
//! ([`ReadSession`], [`WriteSession`], [`KeySession`], …), which build the
//! [`SessionId`](crate::model::SessionId) from the principal's tenant: there is no other way
//! for a route to name a session, so a route cannot reach another tenant's rows, nor a
//! token's caller another session.
//!
//! Here: the access settings ([`Auth`]: keys and token secrets) and API keys. The gate and
//! its extractors are in `gate`, the principal in `principal`, session tokens in `token`,
//! rate buckets in `bucket`.

mod bucket;
mod gate;
mod principal;
mod token;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac, rand::SecureRandom};

use super::error::ApiError;
use crate::config::{AuthConfig, AuthMode, KeyRole};
use crate::model::Tenant;
pub(crate) use bucket::Bucket;
use bucket::Meter;
pub use gate::{
    AdminCaller, AnyCaller, KeySession, ReadInteraction, ReadSession, TenantCaller,
    WriteInteraction, WriteSession, gate,
};
pub use principal::{Caller, Principal, Scope};
use token::TOKEN_PREFIX;
pub use token::{MAX_TOKEN_TTL_S, MintedToken};

/// The header an admin key names another tenant with.
pub const TENANT_HEADER: &str = "baton-tenant";
/// What `baton key new` keys start with.
const KEY_PREFIX: &str = "bk_";
/// Shortest token secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

/// One configured API key.
struct ApiKey {
    id: Arc<str>,
    tenant: Tenant,
    admin: bool,
    sha256: [u8; 32],
    meter: Arc<Meter>,
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

#[cfg(test)]
mod tests {
    use super::token::unix_now;
    use super::*;
    use crate::model::SessionId;

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
