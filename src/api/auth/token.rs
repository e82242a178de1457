//! Session tokens, minted by a key for one session and verified against every configured
//! secret: `bt1.`, the payload (tenant, session, scope, expiry, minting key), then its HMAC.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use super::keys::Auth;
use super::principal::{Caller, Principal, Scope};
use crate::api::error::ApiError;
use crate::model::{SessionId, Tenant};

/// What every session token starts with (API keys never do).
pub(super) const TOKEN_PREFIX: &str = "bt1.";
/// Longest lifetime of a session token, in seconds.
pub const MAX_TOKEN_TTL_S: u64 = 86_400;

/// A minted session token, as `POST …/tokens` answers it.
#[derive(Debug, Clone)]
pub struct MintedToken {
    pub token: String,
    pub scope: Scope,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Auth {
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
    pub(super) fn sign(
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

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::keys::fixtures::{auth, auth_with_keys, session};
    use super::*;

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
}
