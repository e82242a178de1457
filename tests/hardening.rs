//! Hardening (API.md "Access control and tenants", "Hardening, settled"): what one key, one
//! token or one agent can do to everyone else. Tokens are bound to their minting key and to
//! the longest lifetime; tokens and WebSocket ops draw from their key's rate bucket; contexts
//! are bounded; a tenant's sessions and streams are bounded, and streams never take short
//! requests' slots; the console's responses carry security headers; a refusal sent before the
//! body was read closes its connection; JSON numbers come back as sent.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton::config::Config;
use common::access::{ACME_KEY, BETA_KEY, SECRET, config, mint};
use common::stream::{Ws, ws_open_with, ws_url};
use common::{TIMEOUT, TestServer};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

/// A token signed with the test secret, whatever its fields: what a leaked secret would let
/// anyone make.
fn forge(tenant: &str, session: &str, scope: &str, expires_at: u64, key: &str) -> String {
    let payload = format!("{tenant}/{session}/{scope}/{expires_at}/{key}");
    let signed = format!("bt1.{}", URL_SAFE_NO_PAD.encode(payload));
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = ring::hmac::sign(&secret, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

async fn as_caller(
    server: &TestServer,
    credential: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> common::Answer {
    server
        .request(
            method,
            path,
            body,
            &[("authorization", &bearer(credential))],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_with_a_far_expiry_is_refused() {
    let server = TestServer::start_with_config(config()).await;
    mint(&server, "s", "read", 60).await;
    let path = "/v1/sessions/s";
    // The same fields, signed with the real secret: an hour is fine, more than a day is not.
    let near = forge("acme", "s", "read", unix_now() + 3600, "acme-backend");
    assert_eq!(
        as_caller(&server, &near, Method::GET, path, None)
            .await
            .status,
        200
    );
    for expiry in [unix_now() + 86_400 + 120, u64::MAX] {
        let far = forge("acme", "s", "read", expiry, "acme-backend");
        let answer = as_caller(&server, &far, Method::GET, path, None).await;
        assert_eq!(answer.status, 401, "expiry {expiry}: {}", answer.body);
        assert_eq!(answer.code(), Some("unauthorized"));
    }
    // A token naming a key that is not configured is refused too.
    let unknown = forge("acme", "s", "read", unix_now() + 60, "no-such-key");
    assert_eq!(
        as_caller(&server, &unknown, Method::GET, path, None)
            .await
            .status,
        401
    );
    server.stop().await;
}

/// `config()` with a second key of tenant `acme`, `acme-frontend`, unless `without` it.
fn with_frontend_key(present: bool) -> Config {
    let mut config = config();
    if present {
        let auth = config.auth.as_mut().expect("[auth]");
        let mut key = auth.keys[0].clone();
        key.id = "acme-frontend".into();
        key.sha256 = baton::api::auth::key_sha256("bk_test-acme-frontend-0000000000000000000000");
        auth.keys.push(key);
    }
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_key_revokes_its_tokens_at_restart() {
    let frontend = "bk_test-acme-frontend-0000000000000000000000";
    let server = TestServer::start_with_config(with_frontend_key(true)).await;
    let body = json!({"scope": "write", "ttl_s": 3600});
    let minted = as_caller(
        &server,
        frontend,
        Method::POST,
        "/v1/sessions/s/tokens",
        Some(&body),
    )
    .await;
    assert_eq!(minted.status, 201, "{}", minted.body);
    let of_frontend = minted.body["token"].as_str().expect("token").to_string();
    let of_backend = mint(&server, "s", "write", 3600).await;
    for token in [&of_frontend, &of_backend] {
        let answer = as_caller(&server, token, Method::GET, "/v1/sessions/s", None).await;
        assert_eq!(answer.status, 200);
    }
    let dir = server.stop_keeping_data().await;
    let server = TestServer::restart_with_config(with_frontend_key(false), dir).await;
    let revoked = as_caller(&server, &of_frontend, Method::GET, "/v1/sessions/s", None).await;
    assert_eq!(revoked.status, 401, "{}", revoked.body);
    let refused = ws_open_with(
        &ws_url(&server, "s", &format!("access_token={of_frontend}")),
        &[],
    )
    .await
    .expect_err("the upgrade is refused");
    assert_eq!(refused.status, 401);
    // The other key's token still works: only the removed key's tokens are revoked.
    let kept = as_caller(&server, &of_backend, Method::GET, "/v1/sessions/s", None).await;
    assert_eq!(kept.status, 200, "{}", kept.body);
    server.stop().await;
}

/// `config()` with the `acme` key limited to `rate` requests per second (bursts of 2×).
fn rate_limited(rate: f64) -> Config {
    let mut config = config();
    config.auth.as_mut().expect("[auth]").keys[0].rate_per_s = Some(rate);
    config.ws_ops_per_second = 10_000.0;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_requests_draw_from_its_minting_keys_bucket() {
    let server = TestServer::start_with_config(rate_limited(2.0)).await;
    let token = mint(&server, "s", "write", 600).await;
    let started = Instant::now();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..30 {
        let answer = as_caller(&server, &token, Method::GET, "/v1/sessions/s", None).await;
        match answer.status.as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(answer.code(), Some("rate_limited"));
                assert!(answer.headers.contains_key("retry-after"));
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    // The bucket held 4, the mint took one; it refills at 2/s while these run.
    let refilled = (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(
        ok <= 3 + refilled,
        "{ok} answered in {:?}",
        started.elapsed()
    );
    assert!(limited > 0);
    // The key itself is limited too: one bucket for both.
    let key = as_caller(&server, ACME_KEY, Method::GET, "/v1/sessions/s", None).await;
    let other = as_caller(&server, BETA_KEY, Method::GET, "/v1/sessions", None).await;
    assert_eq!(other.status, 200, "another key is not limited");
    if started.elapsed() < Duration::from_millis(400) {
        assert_eq!(key.status, 429);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ops_draw_from_their_keys_bucket() {
    let server = TestServer::start_with_config(rate_limited(2.0)).await;
    let token = mint(&server, "w", "write", 600).await;
    for headers in [
        vec![("authorization", bearer(ACME_KEY))],
        vec![("authorization", bearer(&token))],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let socket = match ws_open_with(&ws_url(&server, "w", ""), &headers).await {
            Ok(socket) => socket,
            // The upgrade itself is a request of the key: wait for the bucket.
            Err(refused) if refused.status == 429 => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                ws_open_with(&ws_url(&server, "w", ""), &headers)
                    .await
                    .expect("upgrade after a pause")
            }
            Err(refused) => panic!("refused {}: {}", refused.status, refused.body),
        };
        let mut ws = Ws::from_socket(socket).await;
        let started = Instant::now();
        let (mut ok, mut limited) = (0, 0);
        for _ in 0..30 {
            let reference = ws.fresh_ref();
            let (reply, _) = ws
                .request(&json!({"op": "context", "ref": reference}))
                .await;
            if reply["ok"] == true {
                ok += 1;
            } else {
                assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
                limited += 1;
            }
        }
        let refilled = (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
        assert!(ok <= 4 + refilled, "{ok} ops answered");
        assert!(limited > 0, "the key's bucket limits its WebSocket ops");
        ws.close().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    server.stop().await;
}

/// `config()` with contexts of at most 1 KiB and two sessions per tenant.
fn bounded() -> Config {
    let mut config = config();
    config.max_context_bytes = 1024;
    config.max_sessions_per_tenant = Some(2);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_past_the_limit_is_refused_and_changes_nothing() {
    let server = TestServer::start_with_config(bounded()).await;
    let own = ACME_KEY;
    let small = json!({"keep": "me"});
    let put = as_caller(
        &server,
        own,
        Method::PUT,
        "/v1/sessions/c/context",
        Some(&small),
    )
    .await;
    assert_eq!(put.status, 200);
    let big = json!({"blob": "x".repeat(2000)});
    let before = as_caller(&server, own, Method::GET, "/v1/sessions/c", None).await;
    for (method, path, body) in [
        (Method::PUT, "/v1/sessions/c/context", big.clone()),
        (Method::PATCH, "/v1/sessions/c/context", big.clone()),
        (Method::PUT, "/v1/sessions/c", json!({"context": big})),
    ] {
        let answer = as_caller(&server, own, method.clone(), path, Some(&body)).await;
        assert_eq!(answer.status, 413, "{method} {path}: {}", answer.body);
        assert_eq!(answer.code(), Some("context_too_large"));
    }
    let after = as_caller(&server, own, Method::GET, "/v1/sessions/c", None).await;
    assert_eq!(
        before.body, after.body,
        "nothing changed, not even last_seq"
    );
    // Over the WebSocket: the same refusal as a reply.
    let token = mint(&server, "c", "write", 600).await;
    let headers = [("authorization", bearer(&token))];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut ws = Ws::from_socket(
        ws_open_with(&ws_url(&server, "c", ""), &headers)
            .await
            .expect("upgrade"),
    )
    .await;
    for op in [
        json!({"op": "context", "set": {"blob": "x".repeat(2000)}}),
        json!({"op": "context", "patch": {"blob": "x".repeat(2000)}}),
    ] {
        let mut op = op;
        op["ref"] = ws.fresh_ref();
        let (reply, _) = ws.request(&op).await;
        assert_eq!(reply["ok"], false, "{reply}");
        assert_eq!(reply["error"]["code"], "context_too_large", "{reply}");
    }
    ws.close().await;
    let context = as_caller(&server, own, Method::GET, "/v1/sessions/c/context", None).await;
    assert_eq!(context.body, small);
    // A new session whose first write is too large is not created either.
    let answer = as_caller(
        &server,
        own,
        Method::PUT,
        "/v1/sessions/fresh/context",
        Some(&big),
    )
    .await;
    assert_eq!(answer.status, 413);
    let absent = as_caller(&server, own, Method::GET, "/v1/sessions/fresh", None).await;
    assert_eq!(absent.status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_context_patch_past_the_limit_fails_its_task() {
    let toml = format!(
        r#"max_context_bytes = 1024
{}

[agents.patcher]
kind = "command"
program = "python3"
args = ["-c", "import json,sys; sys.stdin.readline(); print(json.dumps({{'type':'delta','text':'before '}})); print(json.dumps({{'type':'context','patch':{{'small':1}}}})); print(json.dumps({{'type':'context','patch':{{'blob':'x'*5000}}}})); print(json.dumps({{'type':'delta','text':'after'}})); print(json.dumps({{'type':'result'}}))"]
"#,
        common::BASE_CONFIG
    );
    let server = TestServer::start(&toml).await;
    let created = server
        .put("/v1/sessions/p", &json!({"agent": "patcher"}))
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let sent = server
        .post("/v1/sessions/p/messages?wait=30", &json!({"content": "go"}))
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    assert_eq!(sent.body["status"], "failed", "{}", sent.body);
    assert_eq!(
        sent.body["error"]["code"], "context_too_large",
        "{}",
        sent.body
    );
    assert_eq!(
        sent.body["response"], "before ",
        "what came before the patch stands"
    );
    let context = server.get("/v1/sessions/p/context").await;
    assert_eq!(
        context.body,
        json!({"small": 1}),
        "the refused patch changed nothing"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_session_limit_creates_no_more() {
    let server = TestServer::start_with_config(bounded()).await;
    for name in ["a", "b"] {
        let answer = as_caller(
            &server,
            ACME_KEY,
            Method::PUT,
            &format!("/v1/sessions/{name}"),
            Some(&json!({})),
        )
        .await;
        assert_eq!(answer.status, 201);
    }
    let token = mint(&server, "a", "write", 600).await;
    // Every way of creating a session is refused; nothing is created.
    for (method, path, body) in [
        (Method::PUT, "/v1/sessions/c", Some(json!({}))),
        (
            Method::POST,
            "/v1/sessions/c/messages",
            Some(json!({"content": "hi"})),
        ),
        (Method::POST, "/v1/sessions/c/clear", None),
        (Method::PUT, "/v1/sessions/c/context", Some(json!({"k": 1}))),
        (
            Method::PATCH,
            "/v1/sessions/c/context",
            Some(json!({"k": 1})),
        ),
        (Method::POST, "/v1/sessions/c/tokens", Some(json!({}))),
    ] {
        let answer = as_caller(&server, ACME_KEY, method.clone(), path, body.as_ref()).await;
        assert_eq!(answer.status, 429, "{method} {path}: {}", answer.body);
        assert_eq!(answer.code(), Some("tenant_limit"));
    }
    let headers = [("authorization", bearer(ACME_KEY))];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let refused = ws_open_with(&ws_url(&server, "c", ""), &headers)
        .await
        .expect_err("the upgrade is refused");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["code"], "tenant_limit");
    assert_eq!(
        as_caller(&server, ACME_KEY, Method::GET, "/v1/sessions/c", None)
            .await
            .status,
        404
    );
    // Its existing sessions work on; other tenants are not limited by it.
    let sent = as_caller(
        &server,
        &token,
        Method::POST,
        "/v1/sessions/a/messages?wait=30",
        Some(&json!({"content": "hi"})),
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    let theirs = as_caller(
        &server,
        BETA_KEY,
        Method::PUT,
        "/v1/sessions/c",
        Some(&json!({})),
    )
    .await;
    assert_eq!(theirs.status, 201);
    // A delete frees a place.
    assert_eq!(
        as_caller(&server, ACME_KEY, Method::DELETE, "/v1/sessions/b", None)
            .await
            .status,
        204
    );
    let now = as_caller(
        &server,
        ACME_KEY,
        Method::PUT,
        "/v1/sessions/c",
        Some(&json!({})),
    )
    .await;
    assert_eq!(now.status, 201);
    server.stop().await;
}

/// Posts a first message to each `(client, messages URL, Authorization)` at once; the
/// statuses, in order.
async fn race_new_sessions(
    targets: impl Iterator<Item = (reqwest::Client, String, Option<String>)>,
) -> Vec<u16> {
    let racers: Vec<_> = targets
        .map(|(http, url, authorization)| {
            tokio::spawn(async move {
                let mut request = http.post(url).json(&json!({"content": "hi"}));
                if let Some(authorization) = authorization {
                    request = request.header("authorization", authorization);
                }
                request.send().await.expect("answer").status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for racer in racers {
        statuses.push(racer.await.expect("racer"));
    }
    statuses
}

/// Exactly `limit` of the racing creations were accepted; every other one was `429`.
fn assert_exactly_created(statuses: Vec<u16>, limit: usize) {
    let created = statuses.iter().filter(|s| **s == 202).count();
    assert_eq!(created, limit, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 429),
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creations_never_pass_the_session_limit() {
    let mut config = bounded();
    config.max_sessions_per_tenant = Some(5);
    let server = TestServer::start_with_config(config).await;
    let targets = (0..20).map(|i| {
        let url = format!("{}/v1/sessions/r{i}/messages", server.url);
        (server.http.clone(), url, Some(bearer(ACME_KEY)))
    });
    assert_exactly_created(race_new_sessions(targets).await, 5);
    let list = as_caller(
        &server,
        ACME_KEY,
        Method::GET,
        "/v1/sessions?limit=100",
        None,
    )
    .await;
    assert_eq!(list.body["sessions"].as_array().expect("sessions").len(), 5);
    server.stop().await;
}

/// One HTTP/1.1 request on a fresh connection, its head and body as text (`Connection:
/// close` asked for, so the read ends).
async fn raw(server: &TestServer, request: &str) -> String {
    let address = server.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_at_the_tenant_limit_leave_short_requests_and_other_tenants_served() {
    let mut config = config();
    config.max_connections_per_tenant = Some(3);
    config.max_http_connections = 2;
    let server = TestServer::start_with_config(config).await;
    for name in ["s", "t"] {
        as_caller(
            &server,
            ACME_KEY,
            Method::PUT,
            &format!("/v1/sessions/{name}"),
            Some(&json!({})),
        )
        .await;
    }
    // Three SSE streams of acme: more than the HTTP connections served at once.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let response = server
            .http
            .get(format!("{}/v1/sessions/s/events", server.url))
            .header("authorization", bearer(ACME_KEY))
            .send()
            .await
            .expect("stream");
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    // The fourth (SSE or WebSocket) is refused for the tenant...
    let fourth = as_caller(
        &server,
        ACME_KEY,
        Method::GET,
        "/v1/sessions/s/events",
        None,
    )
    .await;
    assert_eq!(fourth.status, 429, "{}", fourth.body);
    assert_eq!(fourth.code(), Some("tenant_limit"));
    let headers = [("authorization", bearer(ACME_KEY))];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let refused = ws_open_with(&ws_url(&server, "t", ""), &headers)
        .await
        .expect_err("over the tenant's limit");
    assert_eq!(refused.status, 429);
    // ... while health, readiness, the tenant's short requests and another tenant's streams
    // are served.
    for path in ["/healthz", "/readyz"] {
        let answer = raw(
            &server,
            &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    assert_eq!(
        as_caller(&server, ACME_KEY, Method::GET, "/v1/sessions/s", None)
            .await
            .status,
        200
    );
    let beta = as_caller(
        &server,
        BETA_KEY,
        Method::PUT,
        "/v1/sessions/s",
        Some(&json!({})),
    )
    .await;
    assert_eq!(beta.status, 201);
    let beta_headers = [("authorization", bearer(BETA_KEY))];
    let beta_headers: Vec<(&str, &str)> =
        beta_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ws = Ws::from_socket(
        ws_open_with(&ws_url(&server, "s", ""), &beta_headers)
            .await
            .expect("another tenant's WebSocket"),
    )
    .await;
    ws.close().await;
    let sse = server
        .http
        .get(format!("{}/v1/sessions/s/events", server.url))
        .header("authorization", bearer(BETA_KEY))
        .send()
        .await
        .expect("another tenant's stream");
    assert_eq!(sse.status(), 200);
    drop(sse);
    // A stream that ends frees its place.
    drop(streams.pop());
    let mut again = None;
    for _ in 0..50 {
        let response = server
            .http
            .get(format!("{}/v1/sessions/s/events", server.url))
            .header("authorization", bearer(ACME_KEY))
            .send()
            .await
            .expect("stream");
        if response.status() == 200 {
            again = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        again.is_some(),
        "the place of a closed stream is given back"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_carries_security_headers() {
    let server = TestServer::start_default().await;
    for path in [
        "/",
        "/console/",
        "/console/console.js",
        "/console/no-such-file",
    ] {
        let response = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("answer");
        let h = response.headers();
        let csp = h
            .get("content-security-policy")
            .unwrap_or_else(|| panic!("{path}: no CSP"))
            .to_str()
            .expect("ASCII");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("style-src 'self'"), "{csp}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_the_body_is_read_closes_the_connection() {
    let server = TestServer::start_with_config(config()).await;
    let body = r#"{"content": "hello"}"#;
    // No credentials: refused by the gate, body unread.
    let refused = raw(
        &server,
        &format!(
            "POST /v1/sessions/s/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{refused}"
    );
    // A read token writing: refused by the route's access check, body unread.
    let token = mint(&server, "s", "read", 600).await;
    let forbidden = raw(
        &server,
        &format!(
            "POST /v1/sessions/s/messages HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(forbidden.starts_with("HTTP/1.1 403"), "{forbidden}");
    assert!(
        forbidden
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{forbidden}"
    );
    // An answer after the body was read keeps the connection.
    let response = server
        .http
        .post(format!("{}/v1/sessions/s/messages", server.url))
        .header("authorization", bearer(ACME_KEY))
        .json(&json!({"content": "hello"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("connection").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_come_back_exactly_as_sent() {
    let server = TestServer::start_default().await;
    let numbers = r#"{"big":123456789012345678901234567890,"frac":1.10,"exp":1e+400,"neg":-0.0000000000000000000001}"#;
    let texts = [
        "123456789012345678901234567890",
        "1.10",
        "1e+400",
        "-0.0000000000000000000001",
    ];
    // A form that would be rewritten (`1E5` reads back as `1e+5`) is refused, and changes
    // nothing.
    for body in [
        r#"{"n": 1E5}"#,
        r#"{"content": "hi", "metadata": {"n": 1e400}}"#,
    ] {
        let path = if body.contains("content") {
            "/v1/sessions/n/messages"
        } else {
            "/v1/sessions/n/context"
        };
        let refused = server
            .request_raw(Method::PUT, path, body.as_bytes().to_vec())
            .await;
        let refused = if refused.status == 405 {
            server
                .request_raw(Method::POST, path, body.as_bytes().to_vec())
                .await
        } else {
            refused
        };
        assert_eq!(refused.status, 400, "{body}: {}", refused.body);
    }
    assert_eq!(
        server.get("/v1/sessions/n").await.status,
        404,
        "nothing was created"
    );
    let message = format!(r#"{{"content":"hi","metadata":{numbers}}}"#);
    let context_put = server
        .request_raw(
            Method::PUT,
            "/v1/sessions/n/context",
            numbers.as_bytes().to_vec(),
        )
        .await;
    assert_eq!(context_put.status, 200);
    let sent = server
        .request_raw(
            Method::POST,
            "/v1/sessions/n/messages?wait=30",
            message.into_bytes(),
        )
        .await;
    assert_eq!(sent.status, 200);
    let iid = sent.body["id"].as_str().expect("id").to_string();
    for path in [
        "/v1/sessions/n/context".to_string(),
        format!("/v1/sessions/n/interactions/{iid}"),
        "/v1/sessions/n".to_string(),
    ] {
        let text = server
            .http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("answer")
            .text()
            .await
            .expect("text");
        for number in texts {
            assert!(text.contains(number), "{path}: {number} not in {text}");
        }
    }
    // Over the WebSocket too, replayed from the store.
    let mut ws = Ws::connect(&server, "n", "replay=true").await;
    let events = ws.events_until(|e| e["type"] == "task.completed").await;
    let text = serde_json::to_string(&events).expect("json");
    for number in texts {
        assert!(text.contains(number), "ws: {number} not in {text}");
    }
    ws.close().await;
    server.stop().await;
}

/// The session bound across nodes: creations racing on two PostgreSQL nodes never pass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn racing_creations_on_two_nodes_never_pass_the_session_limit() {
    let admin = common::pg::postgres_admin_url();
    let config = format!("max_sessions_per_tenant = 5\n{}", common::BASE_CONFIG);
    let cluster = common::cluster::Cluster::start(&admin, 2, &config).await;
    let apis = cluster.apis();
    let targets = (0..24).map(|i| {
        let api = &apis[i % 2];
        let url = format!("{}/v1/sessions/r{i}/messages", api.base);
        (api.http.clone(), url, None)
    });
    assert_exactly_created(race_new_sessions(targets).await, 5);
    let rows = cluster
        .pg
        .rows("SELECT count(*) FROM sessions", &[])
        .await
        .expect("count");
    let stored: i64 = rows[0].get(0);
    assert_eq!(stored, 5, "five sessions stored");
}
