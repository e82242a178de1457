//! Session tokens over time, limits per key, browsers (CORS) and the settled edges of
//! API.md "Access control and tenants".

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::access::{ACME_KEY, ADMIN_KEY, BETA_KEY, config, mint};
use common::stream::{Ws, WsFrame, ws_open_with, ws_url};
use common::{TIMEOUT, TestServer};
use reqwest::Method;
use serde_json::{Value, json};

fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

async fn as_acme(server: &TestServer, method: Method, path: &str, body: Option<&Value>) -> Value {
    let answer = server
        .request(method, path, body, &[("authorization", &bearer(ACME_KEY))])
        .await;
    assert!(answer.status.is_success(), "{path}: {}", answer.body);
    answer.body
}

/// An expiring token closes its WebSocket with 4001; a new token and `after=` resume it with
/// nothing lost, events made in between included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_the_websocket_and_a_new_one_resumes_it() {
    let server = TestServer::start_with_config(config()).await;
    let token = mint(&server, "t", "read", 2).await;
    let socket = ws_open_with(&ws_url(&server, "t", &format!("access_token={token}")), &[])
        .await
        .expect("opens with the token");
    let mut ws = Ws::from_socket(socket).await;
    let mut seen = BTreeSet::new();
    as_acme(
        &server,
        Method::POST,
        "/v1/sessions/t/messages?wait=10",
        Some(&json!({"content": "before expiry"})),
    )
    .await;
    let close = loop {
        match ws.next_frame().await {
            WsFrame::Json(frame) if frame["kind"] == "event" => {
                seen.insert(frame["seq"].as_i64().expect("seq"));
            }
            WsFrame::Close(close) => break close,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close, Some((4001, "token expired".to_string())));
    let last = *seen.last().expect("events came before the expiry");
    // Meanwhile the session goes on.
    as_acme(
        &server,
        Method::POST,
        "/v1/sessions/t/messages?wait=10",
        Some(&json!({"content": "while away"})),
    )
    .await;
    // The old token is refused now, with the HTTP status of a request.
    let refused = ws_open_with(&ws_url(&server, "t", &format!("access_token={token}")), &[])
        .await
        .expect_err("an expired token cannot open");
    assert_eq!(refused.status, 401);
    let fresh = mint(&server, "t", "read", 600).await;
    let socket = ws_open_with(
        &ws_url(&server, "t", &format!("after={last}&access_token={fresh}")),
        &[],
    )
    .await
    .expect("resumes with a new token");
    let mut ws = Ws::from_socket(socket).await;
    let head = ws.hello_last_seq();
    for event in ws.events_through(head).await {
        assert!(
            seen.insert(event["seq"].as_i64().expect("seq")),
            "no duplicate"
        );
    }
    let stored: BTreeSet<i64> = server
        .stored_events("acme/t")
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .filter(|seq| *seq > 0)
        .collect();
    let from_first: BTreeSet<i64> = stored
        .iter()
        .copied()
        .filter(|s| *s >= *seen.first().unwrap())
        .collect();
    assert_eq!(seen, from_first, "every event after the first seen, once");
    ws.close().await;
    server.stop().await;
}

/// An SSE stream opened with a token ends when the token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_ends_the_event_stream() {
    let server = TestServer::start_with_config(config()).await;
    let token = mint(&server, "e", "read", 1).await;
    let response = server
        .http
        .get(format!(
            "{}/v1/sessions/e/events?access_token={token}",
            server.url
        ))
        .send()
        .await
        .expect("stream opens");
    assert_eq!(response.status(), 200);
    let body = tokio::time::timeout(TIMEOUT, response.text())
        .await
        .expect("the stream ends after the expiry")
        .expect("body");
    assert!(body.contains(": token expired"), "{body:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_rate_gets_429_with_retry_after() {
    let mut config = config();
    config.auth.as_mut().expect("auth").keys[0].rate_per_s = Some(2.0);
    let server = TestServer::start_with_config(config).await;
    let acme = bearer(ACME_KEY);
    let beta = bearer(BETA_KEY);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let answer = server
            .request(
                Method::GET,
                "/v1/sessions",
                None,
                &[("authorization", &acme)],
            )
            .await;
        if answer.status == 429 {
            assert_eq!(answer.code(), Some("rate_limited"));
            let retry: u64 = answer.headers["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("whole seconds");
            assert!(retry >= 1);
        }
        statuses.push(answer.status.as_u16());
    }
    // The bucket starts full: a burst of twice the rate, then refusals.
    assert_eq!(&statuses[..4], &[200; 4], "{statuses:?}");
    assert!(statuses[4..].contains(&429), "{statuses:?}");
    // Another key has its own bucket.
    let other = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &beta)],
        )
        .await;
    assert_eq!(other.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let later = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(later.status, 200, "refilled");
    let metrics = server
        .http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        metrics.contains(&format!(
            "baton_key_rate_limited_total{{key=\"acme-backend\"}} {limited}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "baton_key_requests_total{{key=\"acme-backend\"}} {}",
            statuses.len() - limited + 1
        )),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_of_the_configured_origins_pass_preflight() {
    let mut config = config();
    config.auth.as_mut().expect("auth").cors_origins = vec!["https://app.example.com".into()];
    let server = TestServer::start_with_config(config).await;
    let preflight = server
        .http
        .request(
            Method::OPTIONS,
            format!("{}/v1/sessions/c/messages", server.url),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,idempotency-key",
        )
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    for header in ["authorization", "content-type", "idempotency-key"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    assert!(headers.get("access-control-allow-credentials").is_none());
    let real = server
        .http
        .post(format!("{}/v1/sessions/c/messages", server.url))
        .header("origin", "https://app.example.com")
        .header("authorization", bearer(ACME_KEY))
        .json(&json!({"content": "hi"}))
        .send()
        .await
        .expect("request");
    assert_eq!(real.status(), 202);
    assert_eq!(
        real.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let stranger = server
        .http
        .get(format!("{}/v1/sessions", server.url))
        .header("origin", "https://evil.example.net")
        .header("authorization", bearer(ACME_KEY))
        .send()
        .await
        .expect("request");
    assert!(
        stranger
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_requests_create_nothing() {
    let server = TestServer::start_with_config(config()).await;
    let acme = bearer(ACME_KEY);
    for body in [
        json!({"ttl_s": 1.5}),
        json!({"ttl_s": 0}),
        json!({"ttl_s": 86401}),
        json!({"ttl_s": "60"}),
        json!({"scope": "admin"}),
        json!({"scope": "read", "extra": true}),
    ] {
        let answer = server
            .request(
                Method::POST,
                "/v1/sessions/never/tokens",
                Some(&body),
                &[("authorization", &acme)],
            )
            .await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.code(), Some("invalid_request"));
    }
    let absent = server
        .request(
            Method::GET,
            "/v1/sessions/never",
            None,
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(absent.status, 404, "nothing was created");
    // A token's fields.
    let minted = as_acme(&server, Method::POST, "/v1/sessions/fresh/tokens", None).await;
    assert_eq!(minted["session"], "fresh");
    assert_eq!(minted["scope"], "write");
    assert!(
        minted["expires_at"]
            .as_str()
            .expect("expires_at")
            .ends_with('Z')
    );
    let created = as_acme(&server, Method::GET, "/v1/sessions/fresh", None).await;
    assert_eq!(created["id"], "fresh", "minting creates the session");
    server.stop().await;

    // Without a secret: 400, and nothing created.
    let mut config = config();
    config.auth.as_mut().expect("auth").token_secrets.clear();
    let server = TestServer::start_with_config(config).await;
    let answer = server
        .request(
            Method::POST,
            "/v1/sessions/x/tokens",
            None,
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    let absent = server
        .request(
            Method::GET,
            "/v1/sessions/x",
            None,
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(absent.status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_tenant_is_for_admin_keys_only() {
    let server = TestServer::start_with_config(config()).await;
    as_acme(&server, Method::PUT, "/v1/sessions/mine", Some(&json!({}))).await;
    let token = mint(&server, "mine", "write", 600).await;
    for (credential, tenant) in [
        (ACME_KEY, "acme"),
        (ACME_KEY, "beta"),
        (token.as_str(), "acme"),
    ] {
        let answer = server
            .request(
                Method::GET,
                "/v1/sessions/mine",
                None,
                &[
                    ("authorization", &bearer(credential)),
                    ("baton-tenant", tenant),
                ],
            )
            .await;
        assert_eq!(answer.status, 403, "{tenant}: {}", answer.body);
        assert_eq!(answer.code(), Some("forbidden"));
    }
    let admin = bearer(ADMIN_KEY);
    let listed = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &admin), ("baton-tenant", "acme")],
        )
        .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body["sessions"][0]["id"], "mine");
    let own = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &admin)],
        )
        .await;
    assert_eq!(own.body["sessions"], json!([]), "the admin's own tenant");
    let bad = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &admin), ("baton-tenant", "Not A Tenant")],
        )
        .await;
    assert_eq!(bad.status, 400);
    // access_token anywhere but ws and events is ignored: that request is anonymous.
    let ignored = server
        .get(&format!("/v1/sessions/mine?access_token={token}"))
        .await;
    assert_eq!(ignored.status, 401);
    assert_eq!(ignored.headers["www-authenticate"], "Bearer");
    server.stop().await;
}
