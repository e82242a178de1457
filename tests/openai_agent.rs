//! The `openai` agent against a mock OpenAI-compatible endpoint that speaks the real wire
//! format: replies stream through as deltas and complete with the full text; history, context
//! and the key go into the request; upstream failures fail with their own codes, and only
//! failures before the first token are retried; cancel closes the upstream connection.

mod common;

use std::time::Duration;

use common::mock_openai::{
    DONE_EVENT, MockOpenai, Reply, Step, content_event, finish_event, role_event, send, unused_port,
};
use common::{TIMEOUT, TestServer, check_log_invariants};
use serde_json::{Value, json};

/// Retries are fast in tests.
fn config(base_url: &str, extra: &str) -> String {
    format!(
        r#"
[agents.default]
kind = "echo"

[agents.llm]
kind = "openai"
base_url = "{base_url}"
model = "test-model"
retry_backoff_ms = 10
{extra}
"#
    )
}

async fn start(mock: &MockOpenai, extra: &str) -> TestServer {
    TestServer::start(&config(&mock.base_url(), extra)).await
}

async fn llm_session(server: &TestServer, session: &str, context: Value) {
    let answer = server
        .put(
            &format!("/v1/sessions/{session}"),
            &json!({"agent": "llm", "context": context}),
        )
        .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
}

/// Sends `content` and waits until its interaction is final.
async fn ask(server: &TestServer, session: &str, content: &str) -> Value {
    let answer = server.send(session, content, "reject").await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let id = answer.body["id"].as_str().expect("id");
    server.wait_final(session, id).await
}

/// The stored deltas of one interaction, in order.
fn deltas(server: &TestServer, session: &str, id: &str) -> Vec<String> {
    server
        .stored_events(session)
        .iter()
        .filter(|e| e["type"] == "task.delta" && e["data"]["interaction_id"] == id)
        .map(|e| e["data"]["text"].as_str().expect("text").to_string())
        .collect()
}

fn assert_failed(done: &Value, code: &str) {
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], code, "{done}");
}

fn message_of(done: &Value) -> &str {
    done["error"]["message"].as_str().expect("message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_streams_through_and_the_request_carries_history_context_and_key() {
    let mock = MockOpenai::start().await;
    // A trailing slash on base_url must not make a `//`.
    let toml = config(
        &format!("{}/", mock.base_url()),
        r#"api_key_env = "PATH"
system = "You help {{context.user}} (n={{context.n}}, missing=[{{context.nope}}]). All: {{context}}"
temperature = 0.5
max_tokens = 64"#,
    );
    let server = TestServer::start(&toml).await;
    let context = json!({"user": "Ada", "n": 3});
    llm_session(&server, "s", context.clone()).await;

    mock.push(Reply::text(&["Hel", "lo", " wörld"]));
    let first = ask(&server, "s", "first").await;
    assert_eq!(first["status"], "completed", "{first}");
    assert_eq!(first["response"], "Hello wörld");
    let id = first["id"].as_str().expect("id");
    assert_eq!(deltas(&server, "s", id).concat(), "Hello wörld");

    mock.push(Reply::text(&["Second ", "answer"]));
    let second = ask(&server, "s", "second").await;
    assert_eq!(second["response"], "Second answer", "{second}");
    check_log_invariants(&server.stored_events("s"));

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let system = format!("You help Ada (n=3, missing=[]). All: {context}");
    for request in &requests {
        assert_eq!(request.method, "POST");
        assert_eq!(request.path, "/v1/chat/completions");
        let key = std::env::var("PATH").expect("PATH is set");
        assert_eq!(
            request.header("authorization"),
            Some(format!("Bearer {key}").as_str())
        );
        assert!(
            request
                .header("content-type")
                .is_some_and(|v| v.starts_with("application/json"))
        );
        let body = &request.body;
        assert_eq!(body["model"], "test-model");
        assert_eq!(body["stream"], true);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["max_tokens"], 64);
    }
    assert_eq!(
        requests[0].body["messages"],
        json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "first"},
        ])
    );
    assert_eq!(
        requests[1].body["messages"],
        json!([
            {"role": "system", "content": system},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "Hello wörld"},
            {"role": "user", "content": "second"},
        ])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unset_key_variable_sends_no_authorization_and_unset_options_stay_out() {
    let variable = "BATON_TEST_OPENAI_KEY_THAT_IS_NEVER_SET";
    assert!(std::env::var_os(variable).is_none());
    let mock = MockOpenai::start().await;
    let server = start(&mock, &format!("api_key_env = {variable:?}")).await;
    llm_session(&server, "s", json!({"user": "Ada"})).await;
    mock.push(Reply::text(&["ok"]));
    let done = ask(&server, "s", "hi").await;
    assert_eq!(done["response"], "ok", "{done}");
    let request = &mock.requests()[0];
    assert_eq!(request.header("authorization"), None);
    let body = request.body.as_object().expect("object");
    assert!(!body.contains_key("temperature"), "{body:?}");
    assert!(!body.contains_key("max_tokens"), "{body:?}");
    // No `system` configured: no system message.
    assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clear_the_history_is_empty() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    mock.push(Reply::text(&["one reply"]));
    assert_eq!(ask(&server, "s", "one").await["status"], "completed");
    let cleared = server.post("/v1/sessions/s/clear", &json!({})).await;
    assert_eq!(cleared.status, 200, "{:?}", cleared.body);
    mock.push(Reply::text(&["two reply"]));
    assert_eq!(ask(&server, "s", "two").await["status"], "completed");
    let requests = mock.requests();
    assert_eq!(
        requests[0].body["messages"],
        json!([{"role": "user", "content": "one"}])
    );
    assert_eq!(
        requests[1].body["messages"],
        json!([{"role": "user", "content": "two"}])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_fail_with_their_codes_and_only_transient_ones_are_retried() {
    let mock = MockOpenai::start().await;
    // The key is set (PATH) but refused: its value must not leak into the message.
    let server = start(&mock, r#"api_key_env = "PATH""#).await;
    let long = "x".repeat(5000);
    let cases: Vec<(Reply, &str, usize, &str)> = vec![
        (
            Reply::openai_error(401, "Incorrect API key provided"),
            "upstream_auth",
            1,
            "Incorrect API key provided",
        ),
        (
            Reply::openai_error(403, "not allowed"),
            "upstream_auth",
            1,
            "not allowed",
        ),
        (
            Reply::openai_error(404, "The model does not exist"),
            "upstream_not_found",
            1,
            "test-model",
        ),
        (
            Reply::openai_error(400, "messages: bad"),
            "upstream_error",
            1,
            "messages: bad",
        ),
        // Not an OpenAI-shaped body: an excerpt of the raw body.
        (
            Reply::status(500, format!("boom {long}")),
            "upstream_error",
            3,
            "gave up after 3 attempts",
        ),
        (
            Reply::openai_error(429, "slow down").with_header("retry-after", "0"),
            "upstream_rate_limited",
            3,
            "slow down",
        ),
    ];
    for (n, (reply, code, attempts, needle)) in cases.into_iter().enumerate() {
        let session = format!("e{n}");
        llm_session(&server, &session, json!({})).await;
        let before = mock.request_count();
        for _ in 0..attempts {
            mock.push(reply.clone());
        }
        let done = ask(&server, &session, "hi").await;
        assert_failed(&done, code);
        let message = message_of(&done);
        assert!(message.contains(needle), "{message}");
        assert!(message.chars().count() < 800, "{message}");
        let key = std::env::var("PATH").expect("PATH");
        assert!(!message.contains(&key), "{message}");
        assert_eq!(mock.request_count() - before, attempts, "{code}: {message}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_retried_and_then_succeeds() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    mock.push(Reply::openai_error(429, "Rate limit reached").with_header("retry-after", "0"));
    mock.push(Reply::text(&["fine ", "now"]));
    let done = ask(&server, "s", "hi").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "fine now");
    assert_eq!(mock.request_count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_upstream_unreachable() {
    let port = unused_port().await;
    let base_url = format!("http://127.0.0.1:{port}/v1");
    let server = TestServer::start(&config(&base_url, "retries = 1")).await;
    llm_session(&server, "s", json!({})).await;
    let done = ask(&server, "s", "hi").await;
    assert_failed(&done, "upstream_unreachable");
    let message = message_of(&done);
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("gave up after 2 attempts"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_after_a_token_fails_without_retry() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    mock.push(Reply::Stream(vec![
        send(role_event()),
        send(content_event("Hel")),
        Step::Pause(Duration::from_millis(20)),
        Step::Cut,
    ]));
    // Were it retried, this complete reply would be taken.
    mock.push(Reply::text(&["retried"]));
    let done = ask(&server, "s", "hi").await;
    assert_failed(&done, "upstream_stream_cut");
    assert_eq!(done["response"], "Hel", "the partial reply is kept");
    assert_eq!(mock.request_count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_before_any_token_is_retried() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    mock.push(Reply::Stream(vec![send(role_event()), Step::Cut]));
    mock.push(Reply::text(&["second ", "try"]));
    let done = ask(&server, "s", "hi").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "second try");
    assert_eq!(mock.request_count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_the_body_counts_as_done_only_after_a_finish_reason() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    // A clean end of the body, but no `[DONE]` and no `finish_reason`: cut.
    mock.push(Reply::Stream(vec![
        send(role_event()),
        send(content_event("Hi")),
    ]));
    let done = ask(&server, "s", "one").await;
    assert_failed(&done, "upstream_stream_cut");
    assert_eq!(mock.request_count(), 1);
    // With a `finish_reason`, a missing `[DONE]` is forgiven.
    mock.push(Reply::Stream(vec![
        send(content_event("Hi")),
        send(finish_event("length")),
    ]));
    let done = ask(&server, "s", "two").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "Hi");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunks_are_upstream_protocol_errors() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    for (n, bad) in [
        "data: {not json}\n\n",
        "data: {\"choices\":{\"0\":{}}}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":42}}]}\n\n",
    ]
    .into_iter()
    .enumerate()
    {
        mock.push(Reply::Stream(vec![
            send(role_event()),
            send(bad),
            send(DONE_EVENT),
        ]));
        let done = ask(&server, "s", &format!("q{n}")).await;
        assert_failed(&done, "upstream_protocol");
        assert_eq!(mock.request_count(), n + 1, "not retried");
    }
    // An `error` object in the stream fails with the endpoint's message.
    mock.push(Reply::Stream(vec![send(
        "data: {\"error\":{\"message\":\"model overloaded\",\"type\":\"server_error\"}}\n\n",
    )]));
    let done = ask(&server, "s", "last").await;
    assert_failed(&done, "upstream_error");
    assert!(message_of(&done).contains("model overloaded"), "{done}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_split_anywhere_are_reassembled() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    // CRLF lines, a comment, an unknown field, one chunk's JSON over two `data:` lines, and
    // multi-byte characters, sent 3 bytes at a time (so some pieces split a character).
    let wire = [
        ": keep-alive\r\n\r\n".to_string(),
        role_event().replace('\n', "\r\n"),
        "event: message\r\n".into(),
        content_event("Grüß ").replace('\n', "\r\n"),
        "data: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"🙂 dönë\"}}]}\r\n\r\n"
            .into(),
        finish_event("stop"),
        DONE_EVENT.into(),
    ]
    .concat();
    let mut steps = Vec::new();
    for piece in wire.as_bytes().chunks(3) {
        steps.push(Step::Send(piece.to_vec()));
        steps.push(Step::Pause(Duration::from_millis(1)));
    }
    mock.push(Reply::Stream(steps));
    let done = ask(&server, "s", "hi").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "Grüß 🙂 dönë");
    let id = done["id"].as_str().expect("id");
    assert_eq!(deltas(&server, "s", id), ["Grüß ", "🙂 dönë"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_slow_stream_closes_the_upstream_connection() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "").await;
    llm_session(&server, "s", json!({})).await;
    let pieces = vec!["tick "; 100];
    mock.push(Reply::slow(&pieces, Duration::from_millis(100)));
    let answer = server.send("s", "count", "reject").await;
    assert_eq!(answer.status, 202);
    let id = answer.body["id"].as_str().expect("id").to_string();
    // Wait for the first delta to arrive.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now = server
            .get(&format!("/v1/sessions/s/interactions/{id}"))
            .await;
        if now.body["response"].as_str().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no delta in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled = server.post("/v1/sessions/s/cancel", &json!({})).await;
    assert_eq!(cancelled.status, 200, "{:?}", cancelled.body);
    assert_eq!(cancelled.body["cancelled"], json!([id]));
    let done = server.wait_final("s", &id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(
        mock.wait_client_closed(Duration::from_secs(5)).await,
        "the upstream connection is still open after the cancel"
    );
    check_log_invariants(&server.stored_events("s"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_list_shows_name_and_kind_only() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, r#"api_key_env = "PATH""#).await;
    let answer = server.get("/v1/agents").await;
    assert_eq!(answer.status, 200);
    let agents = answer.body["agents"].as_array().expect("agents");
    assert!(
        agents.contains(&json!({"name": "llm", "kind": "openai", "default": false})),
        "{agents:?}"
    );
    let text = answer.body.to_string();
    for secret in ["test-model", "127.0.0.1", "PATH", "base_url"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(mock.request_count(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_silent_times_out() {
    let mock = MockOpenai::start().await;
    let server = start(&mock, "idle_timeout_s = 0.3\nretries = 0").await;
    llm_session(&server, "s", json!({})).await;
    mock.push(Reply::Stream(vec![
        send(role_event()),
        send(content_event("Hel")),
        Step::Pause(Duration::from_secs(20)),
        send(content_event("lo")),
    ]));
    let done = ask(&server, "s", "hi").await;
    assert_failed(&done, "upstream_timeout");
    assert_eq!(done["response"], "Hel");
    assert!(
        mock.wait_client_closed(Duration::from_secs(5)).await,
        "the silent connection was dropped"
    );
    server.stop().await;
}
