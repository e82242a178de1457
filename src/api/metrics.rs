//! `GET /metrics`: this node's gauges and counters in the Prometheus text format, for an
//! admin key (or anyone when access control is off).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::auth::AdminCaller;

/// The metrics of this node, rendered.
pub async fn metrics(State(state): State<AppState>, _: AdminCaller) -> Response {
    let engine = &state.engine;
    let counters = engine.counters();
    let bus = engine.bus();
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        text.push_str(&format!(
            "# HELP baton_{name} {help}\n# TYPE baton_{name} {kind}\nbaton_{name} {value}\n"
        ));
    };
    metric(
        "running_tasks",
        "gauge",
        "Tasks running on this node.",
        engine.running_tasks() as u64,
    );
    metric(
        "subscribers",
        "gauge",
        "Live event subscriptions (streams and waiters).",
        bus.subscriber_count() as u64,
    );
    metric(
        "connections",
        "gauge",
        "Open WebSocket and SSE connections.",
        state.connections.count() as u64,
    );
    metric(
        "connected_sessions",
        "gauge",
        "Sessions with at least one open WebSocket or SSE connection.",
        state.connections.session_count() as u64,
    );
    metric(
        "subscribed_sessions",
        "gauge",
        "Sessions with at least one live subscription.",
        bus.session_count() as u64,
    );
    metric(
        "events_published_total",
        "counter",
        "Committed events handed to subscribers.",
        bus.published_total(),
    );
    let store = engine.store_stats();
    for (name, help, counter) in [
        (
            "store_commits_total",
            "Write transactions committed (group commits).",
            &store.commits,
        ),
        (
            "store_jobs_total",
            "Store operations run by the writer.",
            &store.jobs,
        ),
        (
            "store_checkpoints_total",
            "WAL checkpoints finished by the writer.",
            &store.checkpoints,
        ),
    ] {
        metric(name, "counter", help, counter.load(Ordering::Relaxed));
    }
    for (name, help, counter) in [
        (
            "messages_accepted_total",
            "Messages accepted as interactions.",
            &counters.messages_accepted,
        ),
        (
            "tasks_started_total",
            "Tasks started on this node.",
            &counters.tasks_started,
        ),
        (
            "interactions_completed_total",
            "Interactions completed by their agent.",
            &counters.interactions_completed,
        ),
        (
            "interactions_failed_total",
            "Interactions failed by their agent.",
            &counters.interactions_failed,
        ),
    ] {
        metric(name, "counter", help, counter.load(Ordering::Relaxed));
    }
    let (keys, refused) = state.auth.stats();
    metric(
        "auth_refused_total",
        "counter",
        "Requests refused for missing or invalid credentials (401).",
        refused,
    );
    if !keys.is_empty() {
        type Pick = fn(&(std::sync::Arc<str>, u64, u64)) -> u64;
        let counters: [(&str, &str, Pick); 2] = [
            (
                "key_requests_total",
                "Requests authenticated with each API key (by its configured id).",
                |k| k.1,
            ),
            (
                "key_rate_limited_total",
                "Requests of each API key refused past its rate_per_s (429).",
                |k| k.2,
            ),
        ];
        for (name, help, pick) in counters {
            text.push_str(&format!(
                "# HELP baton_{name} {help}\n# TYPE baton_{name} counter\n"
            ));
            for key in &keys {
                text.push_str(&format!(
                    "baton_{name}{{key=\"{}\"}} {}\n",
                    label_value(&key.0),
                    pick(key)
                ));
            }
        }
    }
    let (stops, stop_sum) = crate::agent::PROCESS_STOPS.snapshot();
    text.push_str(
        "# HELP baton_agent_process_stop_seconds Time to stop a command agent's process group \
         (signal to no member left).\n# TYPE baton_agent_process_stop_seconds histogram\n",
    );
    for (bound, count) in crate::agent::STOP_BUCKETS_MS.iter().zip(&stops) {
        text.push_str(&format!(
            "baton_agent_process_stop_seconds_bucket{{le=\"{}\"}} {count}\n",
            *bound as f64 / 1000.0
        ));
    }
    let total = stops.last().copied().unwrap_or(0);
    text.push_str(&format!(
        "baton_agent_process_stop_seconds_bucket{{le=\"+Inf\"}} {total}\n\
         baton_agent_process_stop_seconds_sum {stop_sum}\n\
         baton_agent_process_stop_seconds_count {total}\n"
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(raw: &str) -> String {
    raw.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
