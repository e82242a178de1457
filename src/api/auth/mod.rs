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
//! The parts: `keys` (the settings, [`Auth`]: API keys and token secrets), `gate` (the gate
//! and its extractors), `principal` (who is calling), `token` (session tokens) and `bucket`
//! (rate buckets). Each imports only those before it in `bucket` ← `principal` ← `keys` ←
//! `token` ← `gate`.

mod bucket;
mod gate;
mod keys;
mod principal;
mod token;

pub(crate) use bucket::Bucket;
pub use gate::{
    AdminCaller, AnyCaller, KeySession, ReadInteraction, ReadSession, TENANT_HEADER, TenantCaller,
    WriteInteraction, WriteSession, gate,
};
pub use keys::{Auth, key_sha256, new_key};
pub use principal::{Caller, Principal, Scope};
pub use token::{MAX_TOKEN_TTL_S, MintedToken};
