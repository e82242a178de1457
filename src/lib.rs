//! Baton: a session server for conversational agents that stays correct under concurrency.
//!
//! # Layout
//!
//! Each module imports only the modules above it in this list (`tests/structure.rs` holds it):
//!
//! - [`model`]: the vocabulary (sessions, interactions, events, statuses, policies, ids).
//! - [`session`]: **the session core** — every operation on a session as a type with its
//!   outcome, the statuses' sets, and `decide(snapshot, op) → plan`: the rules (I1–I10),
//!   written once and pure, with the writes and the effects (tasks to start and stop) a plan
//!   asks for as data.
//! - [`logs`]: what may reach the logs.
//! - [`bus`]: local fan-out of committed events to subscribers.
//! - [`store`]: persistence of the core's plans — every operation is one transaction that
//!   also appends its events — with an SQLite backend (one group-committing writer, parallel
//!   readers) and a PostgreSQL backend (several nodes on one database, LISTEN/NOTIFY fan-out,
//!   node leases); the database location.
//! - [`agent`]: the agent contract, the built-in agents and their settings.
//! - [`engine`]: runs operations through the store and executes their effects: the registry
//!   of local tasks, the runner that drives agents, the periodic duties.
//! - [`config`]: settings from defaults, a TOML file, `BATON_*` variables and flags (the
//!   agents' tables are [`agent::config`]'s, the database location [`store::location`]'s).
//! - [`api`]: the transports — the HTTP listener (connection bounds and timeouts), access
//!   control (one gate), the HTTP handlers, WebSocket and SSE on one replay/live feed,
//!   `/metrics` — and the one error model.
//! - [`server`]: wiring and graceful shutdown.
//! - [`client`]: HTTP and WebSocket clients of the contract; [`cli`]: the CLI's commands.
//!
//! Data flows one way: transport → engine → store → bus → transport.

// Bottom up, one layer a paragraph: rustfmt would sort a block of them by name.
pub mod model;

#[macro_use]
pub mod session;

pub mod logs;

pub mod bus;

pub mod store;

pub mod agent;

pub mod engine;

pub mod config;

pub mod api;

pub mod server;

pub mod client;

pub mod cli;
