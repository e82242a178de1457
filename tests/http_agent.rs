//! The `http` agent against a real agent service inside the test (axum on a loopback port):
//! the request is exactly the `command` kind's JSON with Baton's headers and the static ones;
//! the answer's JSON lines (NDJSON or an event stream) become the interaction; an ask is
//! answered and the service is called again with the answers; refusals, broken bodies and
//! protocol errors are named; a connection reset before any byte is retried and an unreachable
//! service is `upstream_unreachable`; a cancel closes the request; with `secret_env` every
//! request carries a Standard Webhooks signature the service can verify; connections are pooled
//! and kept alive; an `https://` service is trusted through `ca_file`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use common::{TIMEOUT, TestServer};
use serde_json::{Value, json};

/// One request as the service received it.
#[derive(Debug, Clone)]
struct Seen {
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }
}

#[derive(Clone, Default)]
struct Service {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Requests being answered now, and the most at once.
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    /// Answers whose body was dropped before it ended (the client went away).
    abandoned: Arc<AtomicUsize>,
}

/// Counts an answer's body dropped before its end.
struct Abandoned(Arc<AtomicUsize>, bool);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn line(value: Value) -> String {
    format!("{value}\n")
}

fn answer(kind: &str, chunks: Vec<Result<String, std::io::Error>>) -> Response {
    Response::builder()
        .header("content-type", kind)
        .body(Body::from_stream(futures_util::stream::iter(
            chunks.into_iter().map(|c| c.map(Bytes::from)),
        )))
        .expect("response")
}

async fn agent(
    State(service): State<Service>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        query: uri.query().map(str::to_string),
        headers,
        body,
    };
    let request = seen.json();
    service.seen.lock().expect("lock").push(seen);
    let content = request["interaction"]["content"]
        .as_str()
        .unwrap_or_default();
    let ndjson = "application/x-ndjson";
    let delta = |text: &str| line(json!({"type": "delta", "text": text}));
    match content {
        "hello there" => answer(
            ndjson,
            vec![
                Ok(delta("hello ")),
                Ok("\n".into()),
                Ok(delta("there")),
                Ok(line(json!({"type": "result"}))),
            ],
        ),
        "as events" => answer(
            "text/event-stream",
            vec![
                Ok(": keep-alive\n\n".into()),
                Ok(format!(
                    "data: {}\n",
                    json!({"type": "delta", "text": "as "})
                )),
                Ok(format!(
                    "\nevent: output\ndata: {}\n\n",
                    json!({"type": "delta", "text": "events"})
                )),
                Ok(format!("data: {}\n\n", json!({"type": "result"}))),
            ],
        ),
        "no end line" => answer(ndjson, vec![Ok(delta("no end ")), Ok(delta("line"))]),
        "refuse" => Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::from("down for maintenance"))
            .expect("response"),
        "garbage" => answer(
            ndjson,
            vec![Ok(delta("some ")), Ok("this is not json\n".into())],
        ),
        // The head and a line go out, then the service falls over mid-body.
        "break" => {
            let first = delta("cut ");
            let body = futures_util::stream::unfold(0, move |n| {
                let first = first.clone();
                async move {
                    match n {
                        0 => Some((Ok(Bytes::from(first)), 1)),
                        1 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            Some((Err(std::io::Error::other("the service fell over")), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::builder()
                .header("content-type", ndjson)
                .body(Body::from_stream(body))
                .expect("response")
        }
        "fail" => answer(
            ndjson,
            vec![
                Ok(delta("partial ")),
                Ok(line(
                    json!({"type": "error", "message": "model overloaded", "code": "overloaded"}),
                )),
            ],
        ),
        "may I?" => {
            let answers = request["answers"].as_array().cloned().unwrap_or_default();
            match answers.last() {
                None => answer(
                    ndjson,
                    vec![
                        Ok(delta("asking… ")),
                        Ok(line(json!({"type": "ask", "data": {"question": "May I?"}}))),
                    ],
                ),
                Some(last) => answer(
                    ndjson,
                    vec![
                        Ok(delta(&format!("answered {}", last["answer"]))),
                        Ok(line(json!({"type": "result"}))),
                    ],
                ),
            }
        }
        "forever" => {
            let guard = Abandoned(Arc::clone(&service.abandoned), false);
            let words = futures_util::stream::unfold((0u64, guard), |(n, guard)| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let chunk = line(json!({"type": "delta", "text": format!("w{n} ")}));
                Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), (n + 1, guard)))
            });
            Response::builder()
                .header("content-type", ndjson)
                .body(Body::from_stream(words))
                .expect("response")
        }
        // Held until 200 are in flight at once (or 10 s pass), then answered.
        "slow" => {
            let now = service.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            service.most_in_flight.fetch_max(now, Ordering::SeqCst);
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            while service.most_in_flight.load(Ordering::SeqCst) < 200
                && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            service.in_flight.fetch_sub(1, Ordering::SeqCst);
            answer(ndjson, vec![Ok(delta("done"))])
        }
        // Slow to say anything, but alive: a blank line now and then.
        "keep-alive" => {
            let body = futures_util::stream::unfold(0, |n| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let chunk = match n {
                    0..6 => "\n".to_string(),
                    6 => line(json!({"type": "delta", "text": "worth the wait"})),
                    _ => return None,
                };
                Some((Ok::<_, std::io::Error>(Bytes::from(chunk)), n + 1))
            });
            Response::builder()
                .header("content-type", ndjson)
                .body(Body::from_stream(body))
                .expect("response")
        }
        "long line" => answer(ndjson, vec![Ok(delta(&"x".repeat(100)))]),
        "too much" => answer(
            ndjson,
            (0..20).map(|i| Ok(delta(&format!("{i:02}")))).collect(),
        ),
        // A head, then silence.
        "silent" => {
            let body = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Some((Ok::<_, std::io::Error>(Bytes::from("\n")), ()))
            });
            Response::builder()
                .header("content-type", ndjson)
                .body(Body::from_stream(body))
                .expect("response")
        }
        _ => answer(
            ndjson,
            vec![Ok(line(json!({"type": "result", "response": "?"})))],
        ),
    }
}

/// The service on a loopback port; its address.
async fn start_service(service: Service) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route("/agent", axum::routing::post(agent))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind service");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A front that resets its first connection before answering anything, then forwards.
async fn flaky_front(to: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind front");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut inbound, _)) = listener.accept().await {
            if std::mem::take(&mut first) {
                drop(inbound);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// A front that forwards every connection and counts them.
async fn counting_front(to: std::net::SocketAddr, count: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind front");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

fn config(service: std::net::SocketAddr, front: std::net::SocketAddr, gone: u16) -> String {
    format!(
        "[agents.default]\nkind = \"echo\"\n\n\
         [agents.svc]\nkind = \"http\"\nurl = \"http://{service}/agent?team=a\"\n\
         idle_timeout_s = 5\nheaders = {{ authorization = \"Bearer service-token\" }}\n\n\
         [agents.flaky]\nkind = \"http\"\nurl = \"http://{front}/agent\"\nretries = 2\n\n\
         [agents.gone]\nkind = \"http\"\nurl = \"http://127.0.0.1:{gone}/agent\"\nretries = 1\n\n\
         [agents.impatient]\nkind = \"http\"\nurl = \"http://{service}/agent\"\nidle_timeout_s = 0.3\n\n\
         [agents.narrow]\nkind = \"http\"\nurl = \"http://{service}/agent\"\nmax_line_bytes = 64\n\
         max_output_bytes = 400\n"
    )
}

struct Setup {
    server: TestServer,
    service: Service,
}

async fn setup() -> Setup {
    let service = Service::default();
    let addr = start_service(service.clone()).await;
    let front = flaky_front(addr).await;
    let gone = common::mock_openai::unused_port().await;
    let server = TestServer::start(&config(addr, front, gone)).await;
    Setup { server, service }
}

/// Sends `content` to a new session of `agent`; the interaction's id.
async fn send(server: &TestServer, session: &str, agent: &str, content: &str) -> String {
    let put = server
        .put(&format!("/v1/sessions/{session}"), &json!({"agent": agent}))
        .await;
    assert!(put.status.is_success(), "{:?}", put.body);
    let sent = server.send(session, content, "reject").await;
    assert_eq!(sent.status, StatusCode::ACCEPTED, "{:?}", sent.body);
    sent.body["id"].as_str().expect("id").to_string()
}

async fn run(server: &TestServer, session: &str, agent: &str, content: &str) -> Value {
    let id = send(server, session, agent, content).await;
    server.wait_final(session, &id).await
}

fn deltas(server: &TestServer, session: &str) -> Vec<String> {
    server
        .stored_events(session)
        .iter()
        .filter(|e| e["type"] == "task.delta")
        .map(|e| e["data"]["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_gets_the_command_request_and_streams_the_reply() {
    let Setup { server, service } = setup().await;
    let done = run(&server, "plain", "svc", "hello there").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "hello there");
    assert_eq!(deltas(&server, "plain"), ["hello ", "there"]);
    let seen = service.seen.lock().expect("lock")[0].clone();
    assert_eq!(
        seen.query.as_deref(),
        Some("team=a"),
        "the url's query is kept"
    );
    assert_eq!(seen.header("content-type"), "application/json");
    assert_eq!(seen.header("authorization"), "Bearer service-token");
    assert_eq!(
        seen.header("baton-interaction"),
        done["id"].as_str().unwrap()
    );
    assert_eq!(seen.header("baton-run"), "1");
    assert_eq!(seen.header("baton-attempt"), "1");
    assert!(
        seen.headers.get("webhook-signature").is_none(),
        "no secret, no signature"
    );
    let body = seen.json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "session",
        "interaction",
        "history",
        "context",
        "answers",
        "response",
    ] {
        assert!(keys.contains(&key), "{key} in {keys:?}");
    }
    assert_eq!(body["interaction"]["content"], "hello there");
    assert_eq!(body["answers"], json!([]));
    assert_eq!(body["response"], "");
    // The next message carries the first as history.
    let sent = server.send("plain", "as events", "reject").await;
    let id = sent.body["id"].as_str().expect("id").to_string();
    let second = server.wait_final("plain", &id).await;
    assert_eq!(
        second["response"], "as events",
        "an event stream reads the same"
    );
    let seen = service.seen.lock().expect("lock")[1].json();
    assert_eq!(seen["history"][0]["response"], "hello there");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_way_an_answer_can_end_is_named() {
    let Setup { server, service } = setup().await;
    let done = run(&server, "no-end", "svc", "no end line").await;
    assert_eq!(
        done["status"], "completed",
        "a clean end without a result: {done}"
    );
    assert_eq!(done["response"], "no end line");
    let refused = run(&server, "refused", "svc", "refuse").await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "agent_error");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("503") && message.contains("down for maintenance"),
        "{message}"
    );
    let garbage = run(&server, "garbage", "svc", "garbage").await;
    assert_eq!(garbage["error"]["code"], "agent_protocol", "{garbage}");
    assert!(
        garbage["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 2"),
        "{garbage}"
    );
    assert_eq!(
        garbage["response"], "some ",
        "what came before the failure is kept"
    );
    let broken = run(&server, "broken", "svc", "break").await;
    assert_eq!(broken["status"], "failed", "{broken}");
    assert_eq!(broken["error"]["code"], "agent_error");
    assert_eq!(broken["response"], "cut ");
    // Once an answer began (a refusal, a broken body), nothing is retried.
    let contents: Vec<String> = service
        .seen
        .lock()
        .expect("lock")
        .iter()
        .map(|s| {
            s.json()["interaction"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    for once in ["refuse", "break"] {
        assert_eq!(
            contents.iter().filter(|c| *c == once).count(),
            1,
            "{once}: {contents:?}"
        );
    }
    // The session carries on: the next message runs.
    let next = server.send("broken", "hello there", "reject").await;
    let next = server
        .wait_final("broken", next.body["id"].as_str().expect("id"))
        .await;
    assert_eq!(next["status"], "completed", "{next}");
    let failed = run(&server, "failed", "svc", "fail").await;
    assert_eq!(failed["error"]["code"], "overloaded", "{failed}");
    assert_eq!(failed["error"]["message"], "model overloaded");
    let long = run(&server, "long-line", "narrow", "long line").await;
    assert_eq!(long["error"]["code"], "agent_protocol", "{long}");
    assert!(
        long["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than the limit of 64 bytes"),
        "{long}"
    );
    let much = run(&server, "too-much", "narrow", "too much").await;
    assert_eq!(much["error"]["code"], "output_limit", "{much}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_is_answered_and_the_service_called_again_with_the_answers() {
    let Setup { server, service } = setup().await;
    let id = send(&server, "ask", "svc", "may I?").await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let waiting = loop {
        let now = server
            .get(&format!("/v1/sessions/ask/interactions/{id}"))
            .await
            .body;
        if now["status"] == "waiting" {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waiting: {now}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(waiting["request"]["data"], json!({"question": "May I?"}));
    let answered = server
        .post(
            &format!("/v1/sessions/ask/interactions/{id}/answer"),
            &json!({"request_id": waiting["request"]["id"], "answer": "yes"}),
        )
        .await;
    assert!(answered.status.is_success(), "{:?}", answered.body);
    let done = server.wait_final("ask", &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "asking… answered \"yes\"");
    let seen = service.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("baton-run"), "2");
    let rerun = seen[1].json();
    assert_eq!(rerun["answers"][0]["answer"], "yes");
    assert_eq!(rerun["response"], "asking… ");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_at_all_is_retried_then_unreachable() {
    let Setup { server, service } = setup().await;
    let done = run(&server, "flaky", "flaky", "hello there").await;
    assert_eq!(done["status"], "completed", "the reset was retried: {done}");
    let seen = service.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1, "the reset request never reached the service");
    assert_eq!(seen[0].header("baton-attempt"), "2");
    let gone = run(&server, "gone", "gone", "hello there").await;
    assert_eq!(gone["status"], "failed", "{gone}");
    assert_eq!(gone["error"]["code"], "upstream_unreachable");
    assert!(
        gone["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 attempts"),
        "{gone}"
    );
    server.stop().await;
}

/// How a run is stopped from outside.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Cancel,
    Clear,
    Interrupt,
    Delete,
    Shutdown,
}

/// Cancel, clear, interrupt, delete and shutdown each close the request, and the service sees
/// its client go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_stopping_a_run_closes_the_request() {
    let Setup { server, service } = setup().await;
    let mut server = Some(server);
    for (n, how) in [
        Stop::Cancel,
        Stop::Clear,
        Stop::Interrupt,
        Stop::Delete,
        Stop::Shutdown,
    ]
    .into_iter()
    .enumerate()
    {
        let live = server
            .as_ref()
            .expect("the server runs until the shutdown case");
        let session = format!("stop-{how:?}").to_lowercase();
        let id = send(live, &session, "svc", "forever").await;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while deltas(live, &session).len() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "{how:?}: no deltas");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let path = format!("/v1/sessions/{session}");
        match how {
            Stop::Cancel => {
                let answer = live.post(&format!("{path}/cancel"), &json!({})).await;
                assert!(answer.status.is_success(), "{:?}", answer.body);
                assert_eq!(live.wait_final(&session, &id).await["status"], "cancelled");
            }
            Stop::Clear => {
                let answer = live.post(&format!("{path}/clear"), &json!({})).await;
                assert!(answer.status.is_success(), "{:?}", answer.body);
            }
            Stop::Interrupt => {
                let answer = live.send(&session, "hello there", "interrupt").await;
                assert!(answer.status.is_success(), "{:?}", answer.body);
                let next = answer.body["id"].as_str().expect("id").to_string();
                assert_eq!(
                    live.wait_final(&session, &next).await["status"],
                    "completed"
                );
            }
            Stop::Delete => {
                let answer = live.delete(&path).await;
                assert!(answer.status.is_success(), "{:?}", answer.body);
            }
            Stop::Shutdown => server.take().expect("running").stop().await,
        }
        while service.abandoned.load(Ordering::SeqCst) < n + 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{how:?}: the service never saw its client go"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Polls the interaction at `url` until its status is `status`; the interaction then.
async fn until_status(http: &reqwest::Client, url: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now: Value = http
            .get(url)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        if now["status"] == status {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {status}: {now}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Verifies a Standard Webhooks signature as a receiver would: the HMAC of
/// "id.timestamp.body" with the base64 key after `whsec_`.
fn verify(secret: &str, seen: &Seen) -> bool {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("key");
    let signed = [
        seen.header("webhook-id").as_bytes(),
        b".",
        seen.header("webhook-timestamp").as_bytes(),
        b".",
        &seen.body,
    ]
    .concat();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let expected =
        base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, &signed).as_ref());
    seen.header("webhook-signature")
        .split(' ')
        .any(|s| s == format!("v1,{expected}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_signed_for_the_service_to_verify() {
    let service = Service::default();
    let addr = start_service(service.clone()).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[agents.default]\nkind = \"http\"\nurl = \"http://{addr}/agent\"\n\
         secret_env = \"AGENT_SECRET\"\n"
    );
    let (child, url) = common::child::serve(&dir, &config, &[("AGENT_SECRET", secret)]);
    let http = reqwest::Client::new();
    let sent: Value = http
        .post(format!("{url}/v1/sessions/signed/messages"))
        .json(&json!({"content": "may I?"}))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let id = sent["id"].as_str().expect("id").to_string();
    let interaction = format!("{url}/v1/sessions/signed/interactions/{id}");
    let waiting = until_status(&http, &interaction, "waiting").await;
    http.post(format!("{interaction}/answer"))
        .json(&json!({"request_id": waiting["request"]["id"], "answer": true}))
        .send()
        .await
        .expect("answer");
    until_status(&http, &interaction, "completed").await;
    let seen = service.seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("webhook-id"), format!("{id}.1"));
    assert_eq!(
        seen[1].header("webhook-id"),
        format!("{id}.2.1"),
        "a re-run has its own id"
    );
    for request in &seen {
        assert!(verify(secret, request), "{:?}", request.headers);
        let at: u64 = request
            .header("webhook-timestamp")
            .parse()
            .expect("a timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(at) < 60, "a current timestamp");
    }
    let log = common::child::terminate(child);
    assert!(
        !log.contains(secret) && !log.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "the secret never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_answer_fails_after_the_idle_timeout() {
    let Setup { server, .. } = setup().await;
    let done = run(&server, "silent", "impatient", "silent").await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "agent_error");
    let message = done["error"]["message"].as_str().unwrap();
    assert!(message.contains("idle_timeout_s"), "{message}");
    // Blank lines keep a slow answer alive: 0.6 s of them, never 0.3 s of silence.
    let alive = run(&server, "alive", "impatient", "keep-alive").await;
    assert_eq!(alive["status"], "completed", "{alive}");
    assert_eq!(alive["response"], "worth the wait");
    server.stop().await;
}

/// Connections are kept alive and pooled: one after another reuse one connection, and 200
/// sessions at once have 200 requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_pooled_and_every_session_runs_at_once() {
    let service = Service::default();
    let addr = start_service(service.clone()).await;
    let connections = Arc::new(AtomicUsize::new(0));
    let front = counting_front(addr, Arc::clone(&connections)).await;
    let server = TestServer::start(&format!(
        "[agents.default]\nkind = \"http\"\nurl = \"http://{front}/agent\"\n"
    ))
    .await;
    for i in 0..10 {
        let done = run(
            &server,
            &format!("one-by-one-{i}"),
            "default",
            "hello there",
        )
        .await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one kept-alive connection"
    );
    let ids: Vec<(String, String)> = futures_util::future::join_all((0..200).map(|i| {
        let server = &server;
        async move {
            let session = format!("at-once-{i}");
            let id = send(server, &session, "default", "slow").await;
            (session, id)
        }
    }))
    .await;
    for (session, id) in &ids {
        let done = server.wait_final(session, id).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    assert_eq!(service.most_in_flight.load(Ordering::SeqCst), 200);
    server.stop().await;
}

/// A TLS front with `cert`/`key` (PEM) that forwards the plain bytes to `to`.
async fn tls_front(to: std::net::SocketAddr, cert: &str, key: &str) -> u16 {
    use rustls_pki_types::pem::PemObject as _;
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind front");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut inbound) = acceptor.accept(inbound).await else {
                    return;
                };
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// An `https://` service whose certificate a private CA issued: trusted through `ca_file`,
/// refused without it (no attempt reaches it: `upstream_unreachable`, saying why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_service_is_trusted_through_its_ca_file() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut params = CertificateParams::new(vec!["Baton test CA".to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca = params.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("signed");
    let service = Service::default();
    let addr = start_service(service.clone()).await;
    let port = tls_front(addr, &cert.pem(), &key.serialize_pem()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("ca file");
    let server = TestServer::start(&format!(
        "[agents.default]\nkind = \"echo\"\n\n\
         [agents.trusting]\nkind = \"http\"\nurl = \"https://localhost:{port}/agent\"\n\
         ca_file = \"{}\"\n\n\
         [agents.wary]\nkind = \"http\"\nurl = \"https://localhost:{port}/agent\"\nretries = 0\n",
        ca_file.display()
    ))
    .await;
    let done = run(&server, "trusting", "trusting", "hello there").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["response"], "hello there");
    let refused = run(&server, "wary", "wary", "hello there").await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["error"]["code"], "upstream_unreachable");
    let message = refused["error"]["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("certificate"), "{message}");
    assert_eq!(service.seen.lock().expect("lock").len(), 1);
    server.stop().await;
}
