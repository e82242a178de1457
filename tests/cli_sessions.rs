//! The session commands: `baton sessions` (paged), `baton delete`, `baton cancel` and
//! `baton answer`, over the HTTP API, with the same options as every remote command.

#[path = "common/cli_child.rs"]
mod cli_child;
mod common;

use std::time::Duration;

use cli_child::{run, text};
use common::TestServer;
use common::access::{self, ACME_KEY, BETA_KEY};
use serde_json::{Value, json};

/// The first column of each line: the session ids printed.
fn ids(stdout: &[u8]) -> Vec<String> {
    text(stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lists_every_session_and_pages_on_request() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    for id in ["s-a", "s-b", "s-c"] {
        let put = server.put(&format!("/v1/sessions/{id}"), &json!({})).await;
        assert_eq!(put.status, 201);
    }
    // All of them, following the pages, in the server's order (by id).
    let all = run(&["sessions", "--server", &url], &[]).await;
    assert!(all.status.success(), "{all:?}");
    assert_eq!(ids(&all.stdout), ["s-a", "s-b", "s-c"]);
    assert!(text(&all.stdout).contains("default"), "the agent is shown");

    // One page; the next is named on stderr.
    let page = run(&["sessions", "--limit", "2", "--server", &url], &[]).await;
    assert!(page.status.success(), "{page:?}");
    assert_eq!(ids(&page.stdout), ["s-a", "s-b"]);
    let hint = text(&page.stderr);
    let cursor = hint
        .split("--after ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no next page named: {hint:?}"))
        .to_string();
    let next = run(
        &[
            "sessions", "--limit", "2", "--after", &cursor, "--server", &url,
        ],
        &[],
    )
    .await;
    assert!(next.status.success(), "{next:?}");
    assert_eq!(ids(&next.stdout), ["s-c"]);
    assert!(text(&next.stderr).is_empty(), "last page: {next:?}");

    // JSON lines: the Session objects.
    let json = run(&["sessions", "--json", "--server", &url], &[]).await;
    let sessions: Vec<Value> = text(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(sessions.len(), 3);
    assert_eq!(sessions[0]["id"], "s-a");
    server.stop().await;
}

/// The access options work as on every remote command: a tenant key sees its own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_a_key_lists_its_tenant_only() {
    let server = TestServer::start_with_config(access::config()).await;
    let url = server.url.clone();
    let put = server
        .request(
            reqwest::Method::PUT,
            "/v1/sessions/mine",
            Some(&json!({})),
            &[("authorization", &format!("Bearer {ACME_KEY}"))],
        )
        .await;
    assert_eq!(put.status, 201);
    let acme = run(&["sessions", "--server", &url], &[("BATON_KEY", ACME_KEY)]).await;
    assert!(acme.status.success(), "{acme:?}");
    assert_eq!(ids(&acme.stdout), ["mine"]);
    let beta = run(&["sessions", "--server", &url, "--key", BETA_KEY], &[]).await;
    assert!(beta.status.success(), "{beta:?}");
    assert!(ids(&beta.stdout).is_empty(), "{beta:?}");
    let anonymous = run(&["sessions", "--server", &url], &[]).await;
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(text(&anonymous.stderr).starts_with("error: unauthorized: "));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_session() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    server.send("gone", "hello", "reject").await;
    let out = run(&["delete", "gone", "--server", &url], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("gone"), "{out:?}");
    assert_eq!(server.get("/v1/sessions/gone").await.status, 404);
    let again = run(&["delete", "gone", "--server", &url], &[]).await;
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        text(&again.stderr).starts_with("error: not_found: "),
        "{again:?}"
    );
    server.stop().await;
}

async fn wait_until(server: &TestServer, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    loop {
        let answer = server.get(path).await;
        if ready(&answer.body) {
            return answer.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_running_reply() {
    let server = TestServer::start_default().await;
    let url = server.url.clone();
    server
        .put("/v1/sessions/long", &json!({"agent": "slow"}))
        .await;
    let sent = server
        .send("long", &vec!["w"; 100].join(" "), "reject")
        .await;
    let id = sent.body["id"].as_str().expect("id").to_string();
    wait_until(&server, "/v1/sessions/long", |s| !s["running"].is_null()).await;

    let out = run(&["cancel", "long", "--server", &url], &[]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains(&id),
        "names what it cancelled: {out:?}"
    );
    let done = server.wait_final("long", &id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(done["cancel_reason"], "cancel");

    let idle = run(&["cancel", "long", "--server", &url], &[]).await;
    assert!(idle.status.success(), "{idle:?}");
    assert!(text(&idle.stdout).contains("nothing to cancel"), "{idle:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_resumes_a_waiting_interaction() {
    let server = TestServer::start(common::APPROVAL).await;
    let url = server.url.clone();
    for (session, answer) in [("plain", "yes"), ("json", r#"{"approved": true}"#)] {
        server
            .put(
                &format!("/v1/sessions/{session}"),
                &json!({"agent": "careful"}),
            )
            .await;
        let sent = server.send(session, "drop the table", "reject").await;
        let id = sent.body["id"].as_str().expect("id").to_string();
        let path = format!("/v1/sessions/{session}/interactions/{id}");
        wait_until(&server, &path, |i| i["status"] == "waiting").await;

        let out = run(&["answer", session, &id, answer, "--server", &url], &[]).await;
        assert!(out.status.success(), "{out:?}");
        let done = server.wait_final(session, &id).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert!(
            done["response"].as_str().unwrap_or("").contains("Approved"),
            "{answer} is a yes: {done}"
        );
        // Not waiting any more: the server's refusal, as every error.
        let again = run(&["answer", session, &id, "yes", "--server", &url], &[]).await;
        assert_eq!(again.status.code(), Some(1), "{again:?}");
        assert!(
            text(&again.stderr).starts_with("error: not_waiting: "),
            "{again:?}"
        );
    }
    server.stop().await;
}
