//! `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.

mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    let server = TestServer::start_default().await;
    assert_eq!(server.get("/healthz").await.body, json!({"status": "ok"}));
    assert_eq!(server.get("/readyz").await.body, json!({"status": "ready"}));
    let done = server
        .post(
            "/v1/sessions/m/messages?wait=10",
            &json!({"content": "count me"}),
        )
        .await;
    assert_eq!(done.status, 200);
    let response = server
        .http
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .expect("metrics");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = response.text().await.expect("text");
    for name in [
        "baton_running_tasks",
        "baton_connections",
        "baton_subscribers",
        "baton_events_published_total",
        "baton_store_commits_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} in {text}"
        );
    }
    assert!(text.contains("baton_messages_accepted_total 1"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route() {
    let server = TestServer::start_default().await;
    let doc = server.get("/openapi.json").await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.body["openapi"], "3.0.3");
    let paths = doc.body["paths"].as_object().expect("paths");
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/sessions",
        "/v1/sessions/{id}",
        "/v1/sessions/{id}/messages",
        "/v1/sessions/{id}/interactions",
        "/v1/sessions/{id}/interactions/{iid}",
        "/v1/sessions/{id}/cancel",
        "/v1/sessions/{id}/clear",
        "/v1/sessions/{id}/context",
        "/v1/sessions/{id}/events",
        "/v1/sessions/{id}/ws",
    ] {
        assert!(paths.contains_key(path), "{path} is described");
    }
    // The agents a session may name are this server's configured ones.
    let agent = &doc.body["paths"]["/v1/sessions/{id}"]["put"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]["agent"];
    assert_eq!(
        agent["enum"],
        serde_json::json!(["default", "slow", null]),
        "{agent}"
    );
    // Every $ref points at something that exists.
    let text = doc.body.to_string();
    for reference in text.split("\"$ref\":\"#/").skip(1) {
        let pointer = format!(
            "/{}",
            &reference[..reference.find('"').expect("closing quote")]
        );
        assert!(
            doc.body.pointer(&pointer).is_some(),
            "dangling $ref {pointer}"
        );
    }
    server.stop().await;
}
