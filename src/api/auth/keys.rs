//! The access settings: API keys (by the SHA-256 of the key, compared in constant time) and
//! token secrets, built once from `[auth]`; and new keys for `baton key new`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::{digest, hmac, rand::SecureRandom};

use super::bucket::{Bucket, Meter};
use crate::config::{AuthConfig, AuthMode, KeyRole};
use crate::model::Tenant;

/// What `baton key new` keys start with.
const KEY_PREFIX: &str = "bk_";
/// Shortest token secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

/// One configured API key.
pub(super) struct ApiKey {
    pub(super) id: Arc<str>,
    pub(super) tenant: Tenant,
    pub(super) admin: bool,
    sha256: [u8; 32],
    pub(super) meter: Arc<Meter>,
}

/// The access settings, built once at start-up from `[auth]`.
pub struct Auth {
    pub(super) mode: AuthMode,
    keys: Vec<ApiKey>,
    /// The first signs; all verify.
    pub(super) secrets: Vec<hmac::Key>,
    /// Requests refused for their credentials (`401`).
    pub(super) refused: AtomicU64,
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

    /// The configured key of this id (ids are not secret: no constant-time comparison).
    pub(super) fn key_by_id(&self, id: &str) -> Option<&ApiKey> {
        self.keys.iter().find(|key| &*key.id == id)
    }

    /// The key whose hash matches. Every configured hash is compared, each in constant time,
    /// so the time taken says nothing about which (if any) matched, nor how closely.
    pub(super) fn find_key(&self, presented: &str) -> Option<&ApiKey> {
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

/// Access settings for the tests of this module's neighbours: keys of tenant `acme`.
#[cfg(test)]
pub(super) mod fixtures {
    use super::*;
    use crate::config::KeyConfig;
    use crate::model::SessionId;

    pub(in crate::api::auth) fn auth(secrets: &[&str]) -> Auth {
        auth_with_keys(secrets, &[("k1", None)])
    }

    /// Keys by id, each with an optional rate; the key itself is `key-<id>`.
    pub(in crate::api::auth) fn auth_with_keys(
        secrets: &[&str],
        keys: &[(&str, Option<f64>)],
    ) -> Auth {
        let config = AuthConfig {
            mode: AuthMode::Keys,
            token_secret_env: secrets.iter().map(|s| s.to_string()).collect(),
            token_secrets: Vec::new(),
            cors_origins: Vec::new(),
            keys: keys
                .iter()
                .map(|(id, rate)| KeyConfig {
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

    pub(in crate::api::auth) fn session(tenant: &str, name: &str) -> SessionId {
        SessionId::new(&Tenant::parse(tenant).unwrap(), name).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
