//! The session context: `GET`/`PUT`/`PATCH .../context` (RFC 7396 merge patch), the context and
//! agent given to `PUT /v1/sessions/{id}`, and refusals that leave everything unchanged.

mod common;

use std::sync::Arc;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn context(server: &TestServer, session: &str) -> Value {
    let answer = server.get(&format!("/v1/sessions/{session}/context")).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    answer.body
}

/// The data of the last `context.updated` event stored for the session.
fn last_context_event(server: &TestServer, session: &str) -> Value {
    server
        .stored_events(session)
        .iter()
        .rev()
        .find(|e| e["type"] == "context.updated")
        .map(|e| e["data"]["context"].clone())
        .expect("a context.updated event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_missing_session_are_not_found_and_create_nothing() {
    let server = TestServer::start_default().await;
    let answer = server.get("/v1/sessions/ghost/context").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{:?}", answer.body);
    assert_eq!(answer.code(), Some("not_found"));
    let answer = server.get("/v1/sessions/ghost").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_replaces_the_context_and_creates_the_session() {
    let server = TestServer::start_default().await;
    let session = "ctx-put";
    let first = json!({"a": 1, "b": {"c": [1, 2]}});
    let answer = server
        .put(&format!("/v1/sessions/{session}/context"), &first)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, first);
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.status, StatusCode::OK, "PUT created the session");
    assert_eq!(state.body["context"], first);
    assert_eq!(state.body["agent"], "default");
    assert_eq!(context(&server, session).await, first);

    let second = json!({"z": null, "y": "text"});
    let answer = server
        .put(&format!("/v1/sessions/{session}/context"), &second)
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.body, second,
        "replaced, not merged (null kept on PUT)"
    );
    assert_eq!(context(&server, session).await, second);
    assert_eq!(last_context_event(&server, session), second);

    let empty = server
        .put(&format!("/v1/sessions/{session}/context"), &json!({}))
        .await;
    assert_eq!(empty.status, StatusCode::OK);
    assert_eq!(empty.body, json!({}));
    assert_eq!(context(&server, session).await, json!({}));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_is_a_json_merge_patch() {
    let server = TestServer::start_default().await;
    let session = "ctx-patch";
    // PATCH creates the session too.
    let start = json!({
        "a": 1,
        "b": {"c": 2, "d": 3, "keep": true},
        "arr": [1, 2, 3],
        "gone": true,
        "scalar": 5
    });
    let answer = server
        .patch(&format!("/v1/sessions/{session}/context"), &start)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, start);

    let patch = json!({
        "b": {"c": 20, "d": null, "e": {"f": 1}},
        "arr": [9],
        "gone": null,
        "missing": null,
        "new": "x",
        "scalar": {"now": "object", "drop": null},
        "fresh": {"p": null, "q": 1}
    });
    let expected = json!({
        "a": 1,
        "b": {"c": 20, "keep": true, "e": {"f": 1}},
        "arr": [9],
        "new": "x",
        "scalar": {"now": "object"},
        "fresh": {"q": 1}
    });
    let answer = server
        .patch(&format!("/v1/sessions/{session}/context"), &patch)
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.body, expected);
    assert_eq!(context(&server, session).await, expected);
    assert_eq!(last_context_event(&server, session), expected);

    // An object replaced by a scalar, and an empty patch that changes nothing.
    let answer = server
        .patch(
            &format!("/v1/sessions/{session}/context"),
            &json!({"b": "flat"}),
        )
        .await;
    assert_eq!(answer.body["b"], "flat");
    let before = context(&server, session).await;
    let answer = server
        .patch(&format!("/v1/sessions/{session}/context"), &json!({}))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_object_and_malformed_bodies_are_refused_and_change_nothing() {
    let server = TestServer::start_default().await;
    let session = "ctx-refuse";
    let original = json!({"keep": "me"});
    server
        .put(&format!("/v1/sessions/{session}/context"), &original)
        .await;
    let last_seq = server.get(&format!("/v1/sessions/{session}")).await.body["last_seq"].clone();

    let bodies: [&[u8]; 7] = [
        b"[1]",
        b"\"x\"",
        b"3",
        b"null",
        b"true",
        b"{\"a\":",
        b"not json",
    ];
    for method in [Method::PUT, Method::PATCH] {
        for body in bodies {
            for target in [session, "ctx-never"] {
                let answer = server
                    .request_raw(
                        method.clone(),
                        &format!("/v1/sessions/{target}/context"),
                        body.to_vec(),
                    )
                    .await;
                let shown = String::from_utf8_lossy(body);
                assert_eq!(
                    answer.status,
                    StatusCode::BAD_REQUEST,
                    "{method} {shown}: {:?}",
                    answer.body
                );
                assert_eq!(answer.code(), Some("invalid_request"), "{method} {shown}");
                assert!(answer.body["error"]["message"].is_string());
            }
        }
        // An empty body is not an object either.
        let answer = server
            .request_raw(
                method.clone(),
                &format!("/v1/sessions/{session}/context"),
                Vec::new(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{method} empty");
        assert_eq!(answer.code(), Some("invalid_request"));
    }
    assert_eq!(context(&server, session).await, original);
    let state = server.get(&format!("/v1/sessions/{session}")).await;
    assert_eq!(state.body["last_seq"], last_seq, "nothing was written");
    let never = server.get("/v1/sessions/ctx-never").await;
    assert_eq!(
        never.status,
        StatusCode::NOT_FOUND,
        "a refused write creates nothing"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_session_creates_once_keeps_the_agent_and_replaces_a_given_context() {
    let server = TestServer::start_default().await;
    let path = "/v1/sessions/ctx-session";

    let created = server
        .put(path, &json!({"agent": "slow", "context": {"x": 1}}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.body["id"], "ctx-session");
    assert_eq!(created.body["agent"], "slow");
    assert_eq!(created.body["context"], json!({"x": 1}));
    assert_eq!(created.body["epoch"], 0);

    // Again, without agent: 200, the agent stays, the context stays.
    let again = server.put(path, &json!({})).await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["agent"], "slow");
    assert_eq!(again.body["context"], json!({"x": 1}));
    assert_eq!(again.body["created_at"], created.body["created_at"]);
    let no_body = server.request(Method::PUT, path, None, &[]).await;
    assert_eq!(no_body.status, StatusCode::OK, "{:?}", no_body.body);
    assert_eq!(no_body.body["agent"], "slow");

    // A given context replaces the whole context.
    let replaced = server.put(path, &json!({"context": {"y": {"z": 2}}})).await;
    assert_eq!(replaced.status, StatusCode::OK);
    assert_eq!(replaced.body["context"], json!({"y": {"z": 2}}));
    assert_eq!(replaced.body["agent"], "slow");
    assert_eq!(
        context(&server, "ctx-session").await,
        json!({"y": {"z": 2}})
    );
    assert_eq!(
        last_context_event(&server, "ctx-session"),
        json!({"y": {"z": 2}})
    );

    // An unknown agent is refused, on an existing and on a new session, changing nothing.
    let last_seq = replaced.body["last_seq"].clone();
    let unknown = server
        .put(path, &json!({"agent": "nope", "context": {"bad": true}}))
        .await;
    assert_eq!(
        unknown.status,
        StatusCode::BAD_REQUEST,
        "{:?}",
        unknown.body
    );
    assert_eq!(unknown.code(), Some("unknown_agent"));
    let state = server.get(path).await;
    assert_eq!(state.body["agent"], "slow");
    assert_eq!(state.body["context"], json!({"y": {"z": 2}}));
    assert_eq!(state.body["last_seq"], last_seq);
    let unknown_new = server
        .put("/v1/sessions/ctx-unknown", &json!({"agent": "nope"}))
        .await;
    assert_eq!(unknown_new.status, StatusCode::BAD_REQUEST);
    assert_eq!(unknown_new.code(), Some("unknown_agent"));
    assert_eq!(
        server.get("/v1/sessions/ctx-unknown").await.status,
        StatusCode::NOT_FOUND
    );

    // A given agent changes it.
    let switched = server.put(path, &json!({"agent": "default"})).await;
    assert_eq!(switched.status, StatusCode::OK);
    assert_eq!(switched.body["agent"], "default");
    assert_eq!(switched.body["context"], json!({"y": {"z": 2}}));

    // A context that is not an object is refused.
    let bad = server.put(path, &json!({"context": [1]})).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{:?}", bad.body);
    assert_eq!(bad.code(), Some("invalid_request"));
    assert_eq!(
        context(&server, "ctx-session").await,
        json!({"y": {"z": 2}})
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_lose_no_update() {
    let server = Arc::new(TestServer::start_default().await);
    let session = "ctx-concurrent";
    let mut handles = Vec::new();
    for i in 0..30 {
        let server = Arc::clone(&server);
        handles.push(tokio::spawn(async move {
            server
                .patch(
                    &format!("/v1/sessions/{session}/context"),
                    &json!({format!("k{i}"): i, "shared": {format!("s{i}"): true}}),
                )
                .await
        }));
    }
    for handle in handles {
        let answer = handle.await.expect("patch task");
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }
    let ctx = context(&server, session).await;
    for i in 0..30 {
        assert_eq!(ctx[format!("k{i}")], json!(i), "{ctx}");
        assert_eq!(ctx["shared"][format!("s{i}")], json!(true), "{ctx}");
    }
    // The last context.updated event carries the final context.
    assert_eq!(last_context_event(&server, session), ctx);
    let updates = server
        .stored_events(session)
        .iter()
        .filter(|e| e["type"] == "context.updated")
        .count();
    assert_eq!(updates, 30, "one context.updated per patch");
    Arc::try_unwrap(server)
        .ok()
        .expect("no other owner")
        .stop()
        .await;
}
