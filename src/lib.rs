//! Baton: a session server for conversational agents that stays correct under concurrency.
//!
//! # Layout
//!
//! - [`model`]: the vocabulary (sessions, interactions, events, statuses, policies, ids).
//! - [`config`]: settings from defaults, a TOML file, `BATON_*` variables and flags.
//! - [`store`]: the store contract — every state change is one transaction that also appends
//!   its events — with an SQLite backend (one group-committing writer, parallel readers) and a
//!   PostgreSQL backend (several nodes on one database, LISTEN/NOTIFY fan-out, node leases).
//! - [`bus`]: local fan-out of committed events to subscribers.
//! - [`engine`]: accept/start/finish/cancel/clear on top of the store, the registry of local
//!   tasks and the runner that drives agents.
//! - [`agent`]: the agent contract and the built-in agents.
//! - [`api`]: the transports — the HTTP listener (connection bounds and timeouts), the HTTP
//!   handlers, WebSocket and SSE on one replay/live feed — and the one error model.
//! - [`server`]: wiring and graceful shutdown; [`logs`]: what may reach the logs.
//! - [`client`]: HTTP and WebSocket clients of the contract; [`cli`]: the CLI's commands.
//! - [`bench`](mod@bench): the load generator (`baton bench`).
//!
//! Data flows one way: transport → engine → store → bus → transport.

pub mod agent;
pub mod api;
pub mod bench;
pub mod bus;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod logs;
pub mod model;
pub mod server;
#[macro_use]
pub mod session;
pub mod store;
