//! Same-named sessions of two tenants stay fully separate under concurrent load: their
//! events, seqs, interactions, context and idempotency keys — on SQLite, and on PostgreSQL
//! with the traffic spread over two nodes. Everything is checked through the API, as each
//! tenant sees it, and against what each tenant's subscriber received.

mod common;

use std::collections::BTreeSet;

use baton::api::auth::key_sha256;
use common::access::{ACME_KEY, BETA_KEY, config};
use common::cluster::Cluster;
use common::pg::postgres_admin_url;
use common::stream::{Ws, ws_open_with};
use common::{BASE_CONFIG, TIMEOUT, TestServer};
use futures_util::future::join_all;
use serde_json::{Value, json};

const SESSIONS: [&str; 2] = ["demo", "shared.name"];
const MESSAGES_PER_WORKER: usize = 12;

/// One tenant's client: its key and the nodes it may reach.
#[derive(Clone)]
struct Tenant {
    name: &'static str,
    http: reqwest::Client,
    bases: Vec<String>,
}

impl Tenant {
    fn new(name: &'static str, key: &str, bases: &[String]) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            "authorization",
            format!("Bearer {key}").parse().expect("header"),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(TIMEOUT)
            .build()
            .expect("client");
        Self {
            name,
            http,
            bases: bases.to_vec(),
        }
    }

    fn base(&self, i: usize) -> &str {
        &self.bases[i % self.bases.len()]
    }

    async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base(i)));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn subscribe(&self, i: usize, session: &str, key: &str) -> Ws {
        let url = format!(
            "{}/v1/sessions/{session}/ws?after=0",
            self.base(i).replacen("http://", "ws://", 1)
        );
        let auth = format!("Bearer {key}");
        let socket = ws_open_with(&url, &[("authorization", &auth)])
            .await
            .expect("subscribe");
        Ws::from_socket(socket).await
    }
}

/// Both tenants hammer the same session names at once, then each one's view is checked.
async fn run_and_check(acme: Tenant, beta: Tenant) {
    let tenants = [(acme, ACME_KEY), (beta, BETA_KEY)];
    // A subscriber per tenant and session, from the start.
    let mut subscribers = Vec::new();
    for (t, (tenant, key)) in tenants.iter().enumerate() {
        for (s, session) in SESSIONS.iter().enumerate() {
            subscribers.push((
                tenant.name,
                *session,
                tenant.subscribe(t + s, session, key).await,
            ));
        }
    }
    let mut work = Vec::new();
    for (tenant, _) in &tenants {
        for (s, session) in SESSIONS.iter().enumerate() {
            for worker in 0..2 {
                let tenant = tenant.clone();
                work.push(tokio::spawn(async move {
                    for m in 0..MESSAGES_PER_WORKER {
                        let i = s + worker + m;
                        // The same idempotency keys in both tenants.
                        let key = format!("k-{worker}-{m}");
                        let path = format!("/v1/sessions/{session}/messages");
                        let request = tenant
                            .http
                            .post(format!("{}{path}", tenant.base(i)))
                            .header("idempotency-key", &key)
                            .json(&json!({
                                "content": format!("{} says {m} from {worker}", tenant.name),
                                "policy": "enqueue",
                                "metadata": {"tenant": tenant.name},
                            }));
                        let response = request.send().await.expect("send");
                        let status = response.status().as_u16();
                        assert!(
                            status == 202 || status == 429,
                            "{} {session}: {status}",
                            tenant.name
                        );
                        let patch = json!({ format!("{}-{worker}-{m}", tenant.name): m });
                        let (status, _) = tenant
                            .call(
                                i + 1,
                                reqwest::Method::PATCH,
                                &format!("/v1/sessions/{session}/context"),
                                Some(patch),
                            )
                            .await;
                        assert_eq!(status, 200);
                    }
                }));
            }
        }
    }
    for result in join_all(work).await {
        result.expect("worker");
    }
    for (tenant, _) in &tenants {
        for session in SESSIONS {
            // Drain: wait until idle.
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                let (_, s) = tenant
                    .call(
                        0,
                        reqwest::Method::GET,
                        &format!("/v1/sessions/{session}"),
                        None,
                    )
                    .await;
                if s["running"].is_null() && s["queued"] == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{session} never idle: {s}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
    for (tenant, _) in &tenants {
        let other = if tenant.name == "acme" {
            "beta"
        } else {
            "acme"
        };
        let (status, list) = tenant
            .call(0, reqwest::Method::GET, "/v1/sessions", None)
            .await;
        assert_eq!(status, 200);
        let names: BTreeSet<&str> = list["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["id"].as_str().expect("id"))
            .collect();
        assert_eq!(
            names,
            SESSIONS.into_iter().collect(),
            "{} lists its own",
            tenant.name
        );
        for session in SESSIONS {
            let (_, interactions) = tenant
                .call(
                    1,
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{session}/interactions?limit=1000"),
                    None,
                )
                .await;
            let interactions = interactions["interactions"]
                .as_array()
                .expect("list")
                .clone();
            assert_eq!(
                interactions.len(),
                2 * MESSAGES_PER_WORKER,
                "{} {session}: one interaction per idempotency key, whatever the other tenant did",
                tenant.name
            );
            for interaction in &interactions {
                let content = interaction["content"].as_str().expect("content");
                assert!(
                    content.starts_with(tenant.name),
                    "{} sees {content}",
                    tenant.name
                );
                assert_eq!(interaction["metadata"]["tenant"], tenant.name);
                assert_eq!(interaction["session"], session);
                assert_eq!(interaction["status"], "completed", "{interaction}");
            }
            let (_, context) = tenant
                .call(
                    0,
                    reqwest::Method::GET,
                    &format!("/v1/sessions/{session}/context"),
                    None,
                )
                .await;
            let keys = context.as_object().expect("context");
            assert_eq!(keys.len(), 2 * MESSAGES_PER_WORKER);
            assert!(keys.keys().all(|k| k.starts_with(tenant.name)), "{context}");
            assert!(!context.to_string().contains(other));
        }
    }
    // Each subscriber saw its own session's log: seqs 1..=last_seq without gap, nothing of the
    // other tenant.
    for (tenant_name, session, mut ws) in subscribers {
        let tenant = &tenants
            .iter()
            .find(|(t, _)| t.name == tenant_name)
            .expect("tenant")
            .0;
        let (_, s) = tenant
            .call(
                0,
                reqwest::Method::GET,
                &format!("/v1/sessions/{session}"),
                None,
            )
            .await;
        let last = s["last_seq"].as_i64().expect("last_seq");
        let events = ws.events_through(last).await;
        let seqs: Vec<i64> = events
            .iter()
            .map(|e| e["seq"].as_i64().expect("seq"))
            .collect();
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<_>>(),
            "{tenant_name} {session}"
        );
        for event in &events {
            assert_eq!(event["session"], session);
            let text = event.to_string();
            let other = if tenant_name == "acme" {
                "beta"
            } else {
                "acme"
            };
            assert!(
                !text.contains(&format!("{other} says")),
                "{tenant_name} got {text}"
            );
        }
        ws.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_named_sessions_of_two_tenants_stay_separate_on_sqlite() {
    let server = TestServer::start_with_config(config()).await;
    let bases = vec![server.url.clone()];
    run_and_check(
        Tenant::new("acme", ACME_KEY, &bases),
        Tenant::new("beta", BETA_KEY, &bases),
    )
    .await;
    // Stored under each tenant's key.
    for tenant in ["acme", "beta"] {
        let events = server.stored_events(&format!("{tenant}/demo"));
        assert!(!events.is_empty());
        assert!(events.iter().all(|e| e["session"] == "demo"));
    }
    assert!(server.stored_events("default/demo").is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tests),
    ignore = "needs PostgreSQL: set BATON_TEST_POSTGRES to an admin URL"
)]
async fn same_named_sessions_of_two_tenants_stay_separate_on_two_postgres_nodes() {
    let admin = postgres_admin_url();
    let config = format!(
        "{BASE_CONFIG}\n[auth]\n\n[[auth.keys]]\nid = \"acme\"\ntenant = \"acme\"\nsha256 = \"{}\"\n\n\
         [[auth.keys]]\nid = \"beta\"\ntenant = \"beta\"\nsha256 = \"{}\"\n",
        key_sha256(ACME_KEY),
        key_sha256(BETA_KEY)
    );
    let cluster = Cluster::start(&admin, 2, &config).await;
    let bases: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    run_and_check(
        Tenant::new("acme", ACME_KEY, &bases),
        Tenant::new("beta", BETA_KEY, &bases),
    )
    .await;
    for tenant in ["acme", "beta"] {
        let events = cluster.pg.stored_events(&format!("{tenant}/demo")).await;
        assert!(!events.is_empty());
    }
}
