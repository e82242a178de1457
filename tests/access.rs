//! Access control (API.md "Access control and tenants"): the access matrix — every route ×
//! every kind of caller → the status the contract gives — and every WebSocket op × caller.
//! The matrix lists the routes itself and is compared with what the server serves and what
//! its OpenAPI document describes, so a route added without its row fails here.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::access::{ACME_KEY, ADMIN_KEY, BETA_KEY, config, mint};
use common::stream::{Ws, ws_open_with, ws_url};
use common::{TIMEOUT, TestServer};
use reqwest::Method;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    OwnKey,
    OtherTenantKey,
    Admin,
    AdminAsOwner,
    Anonymous,
    UnknownKey,
    ReadToken,
    WriteToken,
    OtherSessionToken,
    ExpiredToken,
    TamperedToken,
    KeyInQuery,
}

const CALLERS: [Caller; 12] = [
    Caller::OwnKey,
    Caller::OtherTenantKey,
    Caller::Admin,
    Caller::AdminAsOwner,
    Caller::Anonymous,
    Caller::UnknownKey,
    Caller::ReadToken,
    Caller::WriteToken,
    Caller::OtherSessionToken,
    Caller::ExpiredToken,
    Caller::TamperedToken,
    Caller::KeyInQuery,
];

/// How a route treats callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Anyone, credentials or not.
    Open,
    /// Admin keys only.
    Metrics,
    /// Any valid credentials.
    AnyCaller,
    /// Keys only: the caller's tenant.
    TenantList,
    /// A session's reads: keys of its tenant, its tokens of any scope.
    Read,
    /// The WebSocket: like a read, but opening it creates the caller's own session.
    Ws,
    /// A write that creates the caller's session when absent: keys, its write tokens.
    WriteCreating,
    /// Cancel: a write that never creates a session.
    Cancel,
    /// `PUT` of the session: keys only; creates.
    PutSession,
    /// `DELETE`: keys only; never creates.
    Delete,
    /// Minting tokens: keys only; creates.
    Tokens,
}

struct Route {
    method: &'static str,
    path: &'static str,
    class: Class,
    /// The status of a successful call.
    ok: u16,
    body: Option<fn() -> Value>,
}

const fn route(method: &'static str, path: &'static str, class: Class, ok: u16) -> Route {
    Route {
        method,
        path,
        class,
        ok,
        body: None,
    }
}

const fn with_body(
    method: &'static str,
    path: &'static str,
    class: Class,
    ok: u16,
    body: fn() -> Value,
) -> Route {
    Route {
        method,
        path,
        class,
        ok,
        body: Some(body),
    }
}

/// Every route of the API, with how it treats callers.
const ROUTES: &[Route] = &[
    route("GET", "/healthz", Class::Open, 200),
    route("GET", "/readyz", Class::Open, 200),
    route("GET", "/openapi.json", Class::Open, 200),
    route("GET", "/metrics", Class::Metrics, 200),
    route("GET", "/v1/agents", Class::AnyCaller, 200),
    route("GET", "/v1/sessions", Class::TenantList, 200),
    with_body("PUT", "/v1/sessions/{id}", Class::PutSession, 200, || {
        json!({})
    }),
    route("GET", "/v1/sessions/{id}", Class::Read, 200),
    route("DELETE", "/v1/sessions/{id}", Class::Delete, 204),
    with_body(
        "POST",
        "/v1/sessions/{id}/messages",
        Class::WriteCreating,
        202,
        || json!({"content": "hello", "policy": "enqueue"}),
    ),
    route("GET", "/v1/sessions/{id}/interactions", Class::Read, 200),
    route(
        "GET",
        "/v1/sessions/{id}/interactions/{iid}",
        Class::Read,
        200,
    ),
    with_body(
        "POST",
        "/v1/sessions/{id}/cancel",
        Class::Cancel,
        200,
        || json!({}),
    ),
    // The cell's interaction is completed: an answer the contract allows is `409 not_waiting`.
    with_body(
        "POST",
        "/v1/sessions/{id}/interactions/{iid}/answer",
        Class::Cancel,
        409,
        || json!({"request_id": "r", "answer": true}),
    ),
    route("POST", "/v1/sessions/{id}/clear", Class::WriteCreating, 200),
    with_body(
        "POST",
        "/v1/sessions/{id}/tokens",
        Class::Tokens,
        201,
        || json!({"scope": "read", "ttl_s": 60}),
    ),
    route("GET", "/v1/sessions/{id}/events", Class::Read, 200),
    route("GET", "/v1/sessions/{id}/ws", Class::Ws, 101),
    route("GET", "/v1/sessions/{id}/context", Class::Read, 200),
    with_body(
        "PUT",
        "/v1/sessions/{id}/context",
        Class::WriteCreating,
        200,
        || json!({"a": 1}),
    ),
    with_body(
        "PATCH",
        "/v1/sessions/{id}/context",
        Class::WriteCreating,
        200,
        || json!({"b": 2}),
    ),
];

/// The status the contract gives `caller` on a route of `class` (whose success is `ok`).
fn expected(class: Class, ok: u16, caller: Caller) -> u16 {
    use Caller::*;
    if class == Class::Open {
        return 200;
    }
    if matches!(
        caller,
        Anonymous | UnknownKey | ExpiredToken | TamperedToken | KeyInQuery
    ) {
        return 401;
    }
    let token = matches!(caller, ReadToken | WriteToken | OtherSessionToken);
    match class {
        Class::Open => unreachable!(),
        Class::Metrics => match caller {
            Admin | AdminAsOwner => ok,
            _ => 403,
        },
        Class::AnyCaller => ok,
        Class::TenantList => {
            if token {
                403
            } else {
                ok
            }
        }
        Class::Read => match caller {
            OwnKey | AdminAsOwner | ReadToken | WriteToken => ok,
            OtherTenantKey | Admin => 404,
            _ => 403,
        },
        Class::Ws => match caller {
            OtherSessionToken => 403,
            _ => ok,
        },
        Class::WriteCreating => match caller {
            OwnKey | AdminAsOwner | WriteToken | OtherTenantKey | Admin => ok,
            _ => 403,
        },
        Class::Cancel => match caller {
            OwnKey | AdminAsOwner | WriteToken => ok,
            OtherTenantKey | Admin => 404,
            _ => 403,
        },
        Class::PutSession => match caller {
            OwnKey | AdminAsOwner => ok,
            OtherTenantKey | Admin => 201,
            _ => 403,
        },
        Class::Delete => match caller {
            OwnKey | AdminAsOwner => ok,
            OtherTenantKey | Admin => 404,
            _ => 403,
        },
        Class::Tokens => {
            if token {
                403
            } else {
                ok
            }
        }
    }
}

/// A valid token with one character of its signature changed.
fn tampered(token: &str) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let last = bytes.len() - 2;
    bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ASCII")
}

/// The state one matrix cell runs against: `acme`'s session with a completed interaction,
/// and the tokens of the callers.
#[derive(Clone)]
struct Cell {
    session: String,
    interaction: String,
    read_token: String,
    write_token: String,
    other_session_token: String,
}

async fn prepare(server: &TestServer, n: usize) -> Cell {
    let session = format!("m{n}");
    let own = [("authorization", format!("Bearer {ACME_KEY}"))];
    let own: Vec<(&str, &str)> = own.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sent = server
        .request(
            Method::POST,
            &format!("/v1/sessions/{session}/messages?wait=30"),
            Some(&json!({"content": "first"})),
            &own,
        )
        .await;
    assert_eq!(sent.status, 200, "{}", sent.body);
    Cell {
        interaction: sent.body["id"].as_str().expect("id").to_string(),
        read_token: mint(server, &session, "read", 600).await,
        write_token: mint(server, &session, "write", 600).await,
        other_session_token: mint(server, &format!("{session}-other"), "write", 600).await,
        session,
    }
}

/// Performs the request of `route` as `caller`; the status (101 for an accepted upgrade).
async fn call(
    server: &TestServer,
    route: &Route,
    caller: Caller,
    cell: &Cell,
    expired: &str,
) -> u16 {
    let path = route
        .path
        .replace("{id}", &cell.session)
        .replace("{iid}", &cell.interaction);
    let token = match caller {
        Caller::ReadToken => Some(cell.read_token.clone()),
        Caller::WriteToken => Some(cell.write_token.clone()),
        Caller::OtherSessionToken => Some(cell.other_session_token.clone()),
        Caller::ExpiredToken => Some(expired.to_string()),
        Caller::TamperedToken => Some(tampered(&cell.write_token)),
        _ => None,
    };
    let mut headers: Vec<(&str, String)> = Vec::new();
    match caller {
        Caller::OwnKey => headers.push(("authorization", format!("Bearer {ACME_KEY}"))),
        Caller::OtherTenantKey => headers.push(("authorization", format!("Bearer {BETA_KEY}"))),
        Caller::Admin => headers.push(("authorization", format!("Bearer {ADMIN_KEY}"))),
        Caller::AdminAsOwner => {
            headers.push(("authorization", format!("Bearer {ADMIN_KEY}")));
            headers.push(("baton-tenant", "acme".into()));
        }
        Caller::UnknownKey => headers.push(("authorization", "Bearer bk_not-a-key".into())),
        Caller::Anonymous | Caller::KeyInQuery => {}
        _ => headers.push((
            "authorization",
            format!("Bearer {}", token.clone().expect("a token caller")),
        )),
    }
    let query = if caller == Caller::KeyInQuery {
        format!("access_token={ACME_KEY}")
    } else {
        String::new()
    };
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if route.class == Class::Ws {
        let url = ws_url(server, &cell.session, &query);
        return match ws_open_with(&url, &headers).await {
            Ok(socket) => {
                let ws = Ws::from_socket(socket).await;
                ws.close().await;
                101
            }
            Err(refused) => {
                assert!(
                    refused.body["error"]["code"].is_string(),
                    "a refused upgrade has the JSON error body: {}",
                    refused.body
                );
                refused.status.as_u16()
            }
        };
    }
    let url = if query.is_empty() {
        format!("{}{path}", server.url)
    } else {
        format!("{}{path}?{query}", server.url)
    };
    let method = Method::from_bytes(route.method.as_bytes()).expect("method");
    let mut request = server.http.request(method, url);
    if let Some(body) = route.body {
        request = request.json(&body());
    }
    for (name, value) in &headers {
        request = request.header(*name, *value);
    }
    // Streams answer with their headers first: the status is all this needs.
    let response = tokio::time::timeout(TIMEOUT, request.send())
        .await
        .expect("answer in time")
        .expect("request reaches the server");
    let status = response.status().as_u16();
    if status >= 400 {
        let body: Value = response.json().await.expect("an error has a JSON body");
        let code = body["error"]["code"].as_str().expect("error code");
        let want = match status {
            401 => "unauthorized",
            403 => "forbidden",
            404 => "not_found",
            // Only the bounds answer 429 to the matrix's callers (no key has a rate).
            429 => "tenant_limit",
            _ => code,
        };
        assert_eq!(code, want, "{body}");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_covers_every_route_served_and_described() {
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(listed.len(), ROUTES.len(), "a route is listed twice");
    let served: BTreeSet<(String, String)> = baton::api::route_list()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        listed, served,
        "the access matrix lists exactly the routes served"
    );
    let described: BTreeSet<(String, String)> =
        serde_json::from_str::<Value>(baton::api::http::OPENAPI).expect("OpenAPI parses")["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("path item")
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(|method| (method.to_uppercase(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
    assert_eq!(
        listed, described,
        "the OpenAPI document describes every route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_every_caller_as_the_contract_says() {
    let server = TestServer::start_with_config(config()).await;
    let expired = mint(&server, "expiring", "write", 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut failures = Vec::new();
    let mut n = 0;
    for route in ROUTES {
        for caller in CALLERS {
            n += 1;
            let cell = prepare(&server, n).await;
            let want = expected(route.class, route.ok, caller);
            let got = call(&server, route, caller, &cell, &expired).await;
            if got != want {
                failures.push(format!(
                    "{} {} as {caller:?}: {got}, expected {want}",
                    route.method, route.path
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    server.stop().await;
}

/// Another tenant's session is absent: the same status and body as one that never existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_session_looks_exactly_like_a_missing_one() {
    let server = TestServer::start_with_config(config()).await;
    let acme = format!("Bearer {ACME_KEY}");
    let beta = format!("Bearer {BETA_KEY}");
    let sent = server
        .request(
            Method::POST,
            "/v1/sessions/secret/messages?wait=30",
            Some(&json!({"content": "hi"})),
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(sent.status, 200);
    let iid = sent.body["id"].as_str().expect("id");
    for (method, path, body) in [
        (Method::GET, "/v1/sessions/{s}".to_string(), None),
        (Method::GET, "/v1/sessions/{s}/interactions".into(), None),
        (
            Method::GET,
            format!("/v1/sessions/{{s}}/interactions/{iid}"),
            None,
        ),
        (Method::GET, "/v1/sessions/{s}/context".into(), None),
        (Method::GET, "/v1/sessions/{s}/events".into(), None),
        (
            Method::POST,
            "/v1/sessions/{s}/cancel".into(),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/sessions/{s}/cancel".into(),
            Some(json!({"interaction_id": iid})),
        ),
        (Method::DELETE, "/v1/sessions/{s}".into(), None),
    ] {
        let theirs = server
            .request(
                method.clone(),
                &path.replace("{s}", "secret"),
                body.as_ref(),
                &[("authorization", &beta)],
            )
            .await;
        let never = server
            .request(
                method.clone(),
                &path.replace("{s}", "never-existed"),
                body.as_ref(),
                &[("authorization", &beta)],
            )
            .await;
        assert_eq!(theirs.status, 404, "{method} {path}: {}", theirs.body);
        assert_eq!(
            (theirs.status, &theirs.body),
            (never.status, &never.body),
            "{method} {path}"
        );
    }
    // Beta's list does not show it; acme's session is untouched.
    let list = server
        .request(
            Method::GET,
            "/v1/sessions",
            None,
            &[("authorization", &beta)],
        )
        .await;
    assert_eq!(list.body["sessions"], json!([]), "{}", list.body);
    let mine = server
        .request(
            Method::GET,
            "/v1/sessions/secret/interactions",
            None,
            &[("authorization", &acme)],
        )
        .await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["interactions"][0]["id"], iid, "{}", mine.body);
    server.stop().await;
}

/// Every WebSocket op as each caller that can open the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ops_follow_the_tokens_scope() {
    let server = TestServer::start_with_config(config()).await;
    let read = mint(&server, "w", "read", 600).await;
    let write = mint(&server, "w", "write", 600).await;
    let ops = [
        json!({"op": "message", "content": "hi", "policy": "enqueue"}),
        json!({"op": "cancel"}),
        json!({"op": "context", "patch": {"k": 1}}),
        json!({"op": "context"}),
        json!({"op": "clear"}),
    ];
    let own = format!("Bearer {ACME_KEY}");
    let read_header = format!("Bearer {read}");
    let write_header = format!("Bearer {write}");
    let read_query = format!("access_token={read}");
    let write_query = format!("access_token={write}");
    let admin = format!("Bearer {ADMIN_KEY}");
    // (name, headers, query, whether its ops may write)
    type WsCaller<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str, bool);
    let callers: Vec<WsCaller> = vec![
        ("own key", vec![("authorization", own.as_str())], "", true),
        (
            "admin as acme",
            vec![("authorization", admin.as_str()), ("baton-tenant", "acme")],
            "",
            true,
        ),
        (
            "write token",
            vec![("authorization", write_header.as_str())],
            "",
            true,
        ),
        (
            "write token in the query",
            vec![],
            write_query.as_str(),
            true,
        ),
        (
            "read token",
            vec![("authorization", read_header.as_str())],
            "",
            false,
        ),
        (
            "read token in the query",
            vec![],
            read_query.as_str(),
            false,
        ),
    ];
    for (name, headers, query, writes) in callers {
        let socket = ws_open_with(&ws_url(&server, "w", query), &headers)
            .await
            .unwrap_or_else(|r| panic!("{name}: refused {} {}", r.status, r.body));
        let mut ws = Ws::from_socket(socket).await;
        for op in &ops {
            let mut op = op.clone();
            let reference = ws.fresh_ref();
            op["ref"] = reference;
            let (reply, _) = ws.request(&op).await;
            if writes {
                assert_eq!(reply["ok"], true, "{name} {op}: {reply}");
            } else {
                assert_eq!(reply["ok"], false, "{name} {op}: {reply}");
                assert_eq!(reply["error"]["code"], "forbidden", "{name} {op}: {reply}");
                // Said in a user's words, not the protocol's ("only ping").
                let message = reply["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("can only read") && !message.contains("only ping"),
                    "{name} {op}: {message}"
                );
            }
        }
        ws.ping().await;
        ws.close().await;
    }
    server.stop().await;
}

/// Paths that match no route need credentials too; with them, they are simply not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_behind_the_gate_too() {
    let server = TestServer::start_with_config(config()).await;
    for path in ["/v1/nothing", "/v1/sessions/s/nothing", "/elsewhere"] {
        let anonymous = server.get(path).await;
        assert_eq!(anonymous.status, 401, "{path}");
        let known = server
            .request(
                Method::GET,
                path,
                None,
                &[("authorization", &format!("Bearer {ACME_KEY}"))],
            )
            .await;
        assert_eq!(known.status, 404, "{path}");
    }
    // A known path with another method: 405 once authenticated.
    let wrong = server
        .request(
            Method::POST,
            "/v1/sessions",
            None,
            &[("authorization", &format!("Bearer {ACME_KEY}"))],
        )
        .await;
    assert_eq!(wrong.status, 405);
    server.stop().await;
}

/// The bounds' refusals on every route they apply to, for every caller that gets that far:
/// with every tenant at `max_sessions_per_tenant`, a route that would create a session is
/// `429 tenant_limit`; a context past `max_context_bytes` is `413 context_too_large` on every
/// route that writes one. Callers refused for their credentials are refused as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounds_refuse_on_every_route_they_apply_to() {
    let mut config = config();
    config.max_sessions_per_tenant = Some(1);
    config.max_context_bytes = 512;
    let server = TestServer::start_with_config(config).await;
    let expired = mint(&server, "m0", "write", 1).await;
    // acme's one session is m0 (minting created it); beta's and ops' one session each.
    for key in [BETA_KEY, ADMIN_KEY] {
        let created = server
            .request(
                Method::PUT,
                "/v1/sessions/taken",
                Some(&json!({})),
                &[("authorization", &format!("Bearer {key}"))],
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.body);
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cell = Cell {
        session: "m0".into(),
        interaction: "00000000000000000000000000000000".into(),
        read_token: mint(&server, "m0", "read", 600).await,
        write_token: mint(&server, "m0", "write", 600).await,
        other_session_token: mint(&server, "m0", "write", 600).await,
    };
    let mut failures = Vec::new();
    let creating = |class: Class| {
        matches!(
            class,
            Class::WriteCreating | Class::PutSession | Class::Tokens | Class::Ws
        )
    };
    for route in ROUTES.iter().filter(|r| creating(r.class)) {
        for caller in [
            Caller::OwnKey,
            Caller::AdminAsOwner,
            Caller::OtherTenantKey,
            Caller::Admin,
            Caller::Anonymous,
            Caller::ReadToken,
        ] {
            // A session none of them has: creating it is past every tenant's bound.
            let fresh = Cell {
                session: "absent".into(),
                ..cell.clone()
            };
            // The tokens are m0's: another session is theirs to refuse first.
            let want = match expected(route.class, route.ok, caller) {
                401 => 401,
                _ if caller == Caller::ReadToken => 403,
                403 => 403,
                _ => 429,
            };
            let got = call(&server, route, caller, &fresh, &expired).await;
            if got != want {
                failures.push(format!(
                    "tenant_limit: {} {} as {caller:?}: {got}, expected {want}",
                    route.method, route.path
                ));
            }
        }
    }
    // Context writes past the bound, on the existing session.
    let big = json!({"blob": "x".repeat(1000)});
    for (method, path, body) in [
        (Method::PUT, "/v1/sessions/m0/context", big.clone()),
        (Method::PATCH, "/v1/sessions/m0/context", big.clone()),
        (Method::PUT, "/v1/sessions/m0", json!({"context": big})),
    ] {
        for (caller, credential) in [
            ("own key", ACME_KEY.to_string()),
            ("write token", cell.write_token.clone()),
            ("read token", cell.read_token.clone()),
        ] {
            let answer = server
                .request(
                    method.clone(),
                    path,
                    Some(&body),
                    &[("authorization", &format!("Bearer {credential}"))],
                )
                .await;
            let token_put = caller.ends_with("token") && path == "/v1/sessions/m0";
            let want = if caller == "read token" || token_put {
                (403, "forbidden")
            } else {
                (413, "context_too_large")
            };
            if (answer.status.as_u16(), answer.code().unwrap_or("")) != want {
                failures.push(format!(
                    "context_too_large: {method} {path} as {caller}: {} {}",
                    answer.status, answer.body
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    server.stop().await;
}
