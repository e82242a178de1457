//! Bounds on streaming connections (WebSocket and SSE), in total, per tenant and per
//! session, and their exact count (I6: a guard removes exactly its own connection).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::StatusCode;

use super::error::ApiError;
use crate::model::SessionId;

#[derive(Debug)]
pub struct Connections {
    // A std mutex: a map update, never an await.
    state: Mutex<State>,
    max_total: usize,
    max_per_tenant: usize,
    max_per_session: usize,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    per_tenant: HashMap<Box<str>, usize>,
    per_session: HashMap<SessionId, usize>,
}

impl Connections {
    /// `max_per_tenant` keeps one tenant from taking every stream slot: the others (and
    /// the tenant's own short requests, which take none) are still served.
    pub fn new(max_total: usize, max_per_tenant: usize, max_per_session: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            max_total,
            max_per_tenant,
            max_per_session,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection of `session`, or refuses it past a bound.
    pub fn open(self: &Arc<Self>, session: &SessionId) -> Result<ConnectionGuard, ApiError> {
        let mut state = self.state();
        if state.total >= self.max_total {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("too many connections ({} open)", self.max_total),
            ));
        }
        let of_tenant = state.per_tenant.get(session.tenant()).copied().unwrap_or(0);
        if of_tenant >= self.max_per_tenant {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "tenant_limit",
                format!(
                    "this tenant has {} streams open, its limit (max_connections_per_tenant)",
                    self.max_per_tenant
                ),
            ));
        }
        let count = state.per_session.get(session).copied().unwrap_or(0);
        if count >= self.max_per_session {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many connections to this session ({} open)",
                    self.max_per_session
                ),
            ));
        }
        state.per_session.insert(session.clone(), count + 1);
        state
            .per_tenant
            .insert(session.tenant().into(), of_tenant + 1);
        state.total += 1;
        Ok(ConnectionGuard {
            connections: Arc::clone(self),
            session: session.clone(),
        })
    }

    /// Open streaming connections.
    pub fn count(&self) -> usize {
        self.state().total
    }

    /// Sessions with at least one open streaming connection.
    pub fn session_count(&self) -> usize {
        self.state().per_session.len()
    }
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnectionGuard {
    connections: Arc<Connections>,
    session: SessionId,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut state = self.connections.state();
        state.total = state.total.saturating_sub(1);
        uncount(&mut state.per_session, &self.session);
        uncount(&mut state.per_tenant, self.session.tenant());
    }
}

/// Takes one off `key`'s count, dropping the entry at zero (I6: only counted keys stay).
fn uncount<K, Q>(counts: &mut HashMap<K, usize>, key: &Q)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}
