//! Bad requests: each gets its exact status and error code with the error shape
//! `{"error": {"code", "message"}}`, none changes stored state, and the server stays healthy.

mod common;

use common::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// One bad request of the table.
struct Case {
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    status: StatusCode,
    code: &'static str,
}

fn case(method: Method, path: &str, body: Option<&[u8]>, status: u16, code: &'static str) -> Case {
    Case {
        method,
        path: path.to_string(),
        body: body.map(<[u8]>::to_vec),
        status: StatusCode::from_u16(status).expect("status"),
        code,
    }
}

/// Sends a request with an optional raw JSON body; returns the status and the parsed body.
async fn call(
    server: &TestServer,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    // A fresh connection per request: a server that refuses a body early (413) closes the
    // connection without a `Connection: close`, and a pooled client could reuse it.
    let http = reqwest::Client::builder()
        .timeout(common::TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let mut request = http.request(method, format!("{}{path}", server.url));
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("request reaches the server");
    let status = response.status();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{path}: the answer ({status}) is not JSON: {e}: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// `{"error": {"code": str, "message": str, ...}}` and nothing else at the top level.
fn assert_error_shape(body: &Value, what: &str) {
    let top = body
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {body}"));
    assert_eq!(
        top.len(),
        1,
        "{what}: only `error` at the top level: {body}"
    );
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    assert!(error["code"].is_string(), "{what}: {body}");
    assert!(
        !error["message"].as_str().unwrap_or_default().is_empty(),
        "{what}: a message: {body}"
    );
}

async fn run_cases(server: &TestServer, cases: Vec<Case>) {
    for c in cases {
        let what = format!(
            "{} {} {}",
            c.method,
            c.path,
            c.body
                .as_ref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned())
                .unwrap_or_default()
        );
        let (status, body) = call(server, c.method.clone(), &c.path, c.body).await;
        assert_eq!(status, c.status, "{what}: {body}");
        assert_error_shape(&body, &what);
        assert_eq!(body["error"]["code"], c.code, "{what}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_exact_errors_and_change_nothing() {
    let server = TestServer::start_default().await;

    // Data that must survive the table untouched.
    let done = server
        .post(
            "/v1/sessions/keep/messages?wait=30",
            &json!({"content": "keep this"}),
        )
        .await;
    assert_eq!(done.status, StatusCode::OK, "{:?}", done.body);
    assert_eq!(done.body["status"], "completed");
    let ctx = server
        .put(
            "/v1/sessions/keep/context",
            &json!({"kept": {"deep": [1, 2]}}),
        )
        .await;
    assert_eq!(ctx.status, StatusCode::OK);
    let interactions_before = server.get("/v1/sessions/keep/interactions").await.body;
    let session_before = server.get("/v1/sessions/keep").await.body;

    let m = "/v1/sessions/keep/messages";
    let fresh = "/v1/sessions/fresh-never/messages";
    let big_content = "x".repeat(1024 * 1024 + 1);
    let oversize = serde_json::to_vec(&json!({"content": big_content})).expect("json");
    let mut cases = vec![
        // Message bodies.
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\""),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"not json at all"),
            400,
            "invalid_request",
        ),
        case(Method::POST, m, Some(b""), 400, "invalid_request"),
        case(Method::POST, m, Some(b"[1]"), 400, "invalid_request"),
        case(Method::POST, m, Some(b"\"hello\""), 400, "invalid_request"),
        case(Method::POST, m, Some(b"null"), 400, "invalid_request"),
        case(Method::POST, m, Some(b"{}"), 400, "invalid_request"),
        case(
            Method::POST,
            m,
            Some(b"{\"policy\": \"enqueue\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": 5}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": null}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": [\"a\"]}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"  \\n\\t \"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"metadata\": [1]}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"metadata\": \"x\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"metadata\": 3}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"polcy\": \"enqueue\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"policy\": \"maybe\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"policy\": 1}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            m,
            Some(b"{\"content\": \"hi\", \"policy\": \"Reject\"}"),
            400,
            "invalid_request",
        ),
        case(Method::POST, m, Some(&oversize), 413, "payload_too_large"),
        // The same on a session that does not exist: refused, and not created.
        case(
            Method::POST,
            fresh,
            Some(b"{\"content\": \"\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            fresh,
            Some(b"{\"content\": \"hi\", \"policy\": \"maybe\"}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            fresh,
            Some(b"{\"content\":"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            fresh,
            Some(&oversize),
            413,
            "payload_too_large",
        ),
        case(
            Method::PUT,
            "/v1/sessions/fresh-never/context",
            Some(b"[1]"),
            400,
            "invalid_request",
        ),
        // Session bodies and agents.
        case(
            Method::PUT,
            "/v1/sessions/fresh-never",
            Some(b"{\"agent\": \"nope\"}"),
            400,
            "unknown_agent",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep",
            Some(b"{\"agent\": \"nope\"}"),
            400,
            "unknown_agent",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep",
            Some(b"{\"agent\": 5}"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep",
            Some(b"{\"context\": [1]}"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep",
            Some(b"[1]"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep",
            Some(b"{\"agent\":"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/keep/context",
            Some(b"[1]"),
            400,
            "invalid_request",
        ),
        case(
            Method::PATCH,
            "/v1/sessions/keep/context",
            Some(b"\"x\""),
            400,
            "invalid_request",
        ),
        case(
            Method::PATCH,
            "/v1/sessions/keep/context",
            Some(b"{\"a\":"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/keep/cancel",
            Some(b"{\"interaction_id\": 5}"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/keep/cancel",
            Some(b"[1]"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/keep/cancel",
            Some(b"{\"interaction_id\": \"zzz\"}"),
            404,
            "not_found",
        ),
        // Paging parameters.
        case(
            Method::GET,
            "/v1/sessions?limit=0",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions?limit=abc",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions?limit=1001",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions?limit=-1",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/interactions?limit=0",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/interactions?limit=abc",
            None,
            400,
            "invalid_request",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/interactions?limit=1001",
            None,
            400,
            "invalid_request",
        ),
        // Unknown paths and methods.
        case(Method::GET, "/nope", None, 404, "not_found"),
        case(Method::GET, "/v2/sessions", None, 404, "not_found"),
        case(
            Method::GET,
            "/v1/sessions/keep/nope",
            None,
            404,
            "not_found",
        ),
        case(
            Method::DELETE,
            "/v1/sessions",
            None,
            405,
            "method_not_allowed",
        ),
        case(
            Method::POST,
            "/v1/sessions",
            Some(b"{}"),
            405,
            "method_not_allowed",
        ),
        case(
            Method::POST,
            "/v1/sessions/keep",
            Some(b"{}"),
            405,
            "method_not_allowed",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/messages",
            None,
            405,
            "method_not_allowed",
        ),
        case(
            Method::DELETE,
            "/v1/sessions/keep/context",
            None,
            405,
            "method_not_allowed",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/clear",
            None,
            405,
            "method_not_allowed",
        ),
        // Interactions that are not there.
        case(
            Method::GET,
            "/v1/sessions/keep/interactions/not-an-id",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/interactions/01900000-0000-7000-8000-000000000000",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/keep/interactions/01900000-0000-7000-8000-00000000000G",
            None,
            404,
            "not_found",
        ),
        // A missing session.
        case(Method::GET, "/v1/sessions/missing", None, 404, "not_found"),
        case(
            Method::DELETE,
            "/v1/sessions/missing",
            None,
            404,
            "not_found",
        ),
        case(
            Method::POST,
            "/v1/sessions/missing/cancel",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/missing/interactions",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/missing/interactions/not-an-id",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/missing/interactions/01900000-0000-7000-8000-000000000000",
            None,
            404,
            "not_found",
        ),
        case(
            Method::GET,
            "/v1/sessions/missing/context",
            None,
            404,
            "not_found",
        ),
    ];

    // Invalid session ids (after percent-decoding), on every route.
    let too_long = "a".repeat(129);
    for id in ["a%2Fb", "a%20b", too_long.as_str(), "%C3%A9", "a+b", "a*b"] {
        let base = format!("/v1/sessions/{id}");
        for (method, path, body) in [
            (Method::GET, base.clone(), None),
            (Method::PUT, base.clone(), Some(&b"{}"[..])),
            (Method::DELETE, base.clone(), None),
            (
                Method::POST,
                format!("{base}/messages"),
                Some(&b"{\"content\": \"hi\"}"[..]),
            ),
            (Method::GET, format!("{base}/interactions"), None),
            (
                Method::GET,
                format!("{base}/interactions/01900000-0000-7000-8000-000000000000"),
                None,
            ),
            (Method::POST, format!("{base}/cancel"), None),
            (Method::POST, format!("{base}/clear"), None),
            (Method::GET, format!("{base}/context"), None),
            (Method::PUT, format!("{base}/context"), Some(&b"{}"[..])),
            (Method::PATCH, format!("{base}/context"), Some(&b"{}"[..])),
        ] {
            cases.push(case(method, &path, body, 400, "invalid_session_id"));
        }
    }
    run_cases(&server, cases).await;

    // The longest valid id is not refused as invalid (it simply does not exist).
    let longest = "a".repeat(128);
    let (status, body) = call(
        &server,
        Method::GET,
        &format!("/v1/sessions/{longest}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Nothing changed.
    let interactions_after = server.get("/v1/sessions/keep/interactions").await.body;
    assert_eq!(interactions_after, interactions_before);
    let session_after = server.get("/v1/sessions/keep").await.body;
    assert_eq!(session_after, session_before);
    assert_eq!(session_after["last_seq"], session_before["last_seq"]);
    let context = server.get("/v1/sessions/keep/context").await;
    assert_eq!(context.body, json!({"kept": {"deep": [1, 2]}}));
    let sessions = server.get("/v1/sessions").await;
    let ids: Vec<&str> = sessions.body["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["keep"], "no bad request created a session");

    // And the server is healthy.
    let health = server.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    let again = server
        .post(
            "/v1/sessions/keep/messages?wait=30",
            &json!({"content": "still here"}),
        )
        .await;
    assert_eq!(again.status, StatusCode::OK, "{:?}", again.body);
    assert_eq!(again.body["status"], "completed");
    assert_eq!(again.body["response"], "still here");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_configurable() {
    let config = r#"
max_body_bytes = 1000

[agents.default]
kind = "echo"
delay_ms = 0
"#;
    let server = TestServer::start(config).await;
    let body = serde_json::to_vec(&json!({"content": "y".repeat(2000)})).expect("json");
    assert!(body.len() > 2000);
    for path in [
        "/v1/sessions/limited/messages",
        "/v1/sessions/limited/context",
        "/v1/sessions/limited",
    ] {
        let method = if path.ends_with("messages") {
            Method::POST
        } else {
            Method::PUT
        };
        let (status, answer) = call(&server, method.clone(), path, Some(body.clone())).await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{method} {path}: {answer}"
        );
        assert_error_shape(&answer, path);
        assert_eq!(answer["error"]["code"], "payload_too_large");
    }
    let absent = server.get("/v1/sessions/limited").await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND, "nothing was created");

    // A body under the limit is fine.
    let small = server
        .post(
            "/v1/sessions/limited/messages?wait=30",
            &json!({"content": "z".repeat(900)}),
        )
        .await;
    assert_eq!(small.status, StatusCode::OK, "{:?}", small.body);
    assert_eq!(small.body["status"], "completed");

    // Without a Content-Length (a streamed body), the limit holds all the same.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(100).map(|c| Ok(c.to_vec())).collect();
    let response = reqwest::Client::builder()
        .timeout(common::TIMEOUT)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
        .post(format!("{}/v1/sessions/limited/messages", server.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("request reaches the server");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.expect("JSON error");
    assert_eq!(answer["error"]["code"], "payload_too_large");
    let list = server.get("/v1/sessions/limited/interactions").await;
    assert_eq!(list.body["interactions"].as_array().map(Vec::len), Some(1));
    server.stop().await;
}

/// serde reads a JSON array as a struct's fields in order, so without a check of its own the
/// server would take `["hello"]` for `{"content": "hello"}`. The contract wants an object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_arrays_are_not_objects_even_when_their_elements_fit() {
    let server = TestServer::start_default().await;
    let created = server.put("/v1/sessions/arrays", &json!({})).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let before = server.get("/v1/sessions/arrays").await.body;
    let cases = vec![
        case(
            Method::POST,
            "/v1/sessions/arrays/messages",
            Some(b"[\"hello\"]"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/arrays/messages",
            Some(b"[\"hello\", \"enqueue\", {}]"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/array-new/messages",
            Some(b"[\"hello\"]"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/arrays",
            Some(b"[\"slow\", {\"a\": 1}]"),
            400,
            "invalid_request",
        ),
        case(
            Method::PUT,
            "/v1/sessions/arrays",
            Some(b"[null, null]"),
            400,
            "invalid_request",
        ),
        case(
            Method::POST,
            "/v1/sessions/arrays/cancel",
            Some(b"[null]"),
            400,
            "invalid_request",
        ),
    ];
    run_cases(&server, cases).await;
    let after = server.get("/v1/sessions/arrays").await.body;
    assert_eq!(after, before, "nothing changed");
    let list = server.get("/v1/sessions/arrays/interactions").await;
    assert_eq!(list.body["interactions"], json!([]));
    assert_eq!(
        server.get("/v1/sessions/array-new").await.status,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

/// A value outside an enumeration is refused in a user's words: the field's name and the
/// values it takes, never a type name of the server's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_enumerated_value_names_the_values_in_words() {
    let server = TestServer::start_default().await;
    let answer = server
        .post(
            "/v1/sessions/words/messages",
            &serde_json::json!({"content": "hi", "policy": "maybe"}),
        )
        .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    let message = answer.body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(
            "\"maybe\" is not a valid policy; expected one of: reject, enqueue, interrupt"
        ),
        "{message}"
    );
    assert!(!message.contains("Policy"), "{message}");
    server.stop().await;
}
