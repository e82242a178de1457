//! TLS end to end, with certificates this suite makes itself: Baton serving HTTPS and WSS
//! (`tls_cert`/`tls_key`), and Baton connecting to PostgreSQL with `sslmode` and
//! `sslrootcert`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use baton::bus::Bus;
use baton::config::DatabaseLocation;
use baton::store::{PgOptions, SqliteOptions, Store};
use common::access::{ACME_KEY, config};
use common::{TIMEOUT, TestServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A self-signed certificate for `localhost` and 127.0.0.1: (cert PEM, key PEM).
fn certificate() -> (String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    (made.cert.pem(), made.key_pair.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_with_a_generated_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certificate();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, &cert).expect("cert");
    std::fs::write(&key_path, &key).expect("key");
    let mut config = config();
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    let server = TestServer::start_with_config(config).await;
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let port = server.url.rsplit(':').next().expect("port").to_string();

    // HTTPS, trusting only this certificate.
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).expect("pem"))
        .timeout(TIMEOUT)
        .build()
        .expect("client");
    let base = format!("https://localhost:{port}");
    let sent: Value = https
        .post(format!("{base}/v1/sessions/secure/messages?wait=10"))
        .bearer_auth(ACME_KEY)
        .json(&json!({"content": "over tls"}))
        .send()
        .await
        .expect("https request")
        .json()
        .await
        .expect("json");
    assert_eq!(sent["response"], "over tls", "{sent}");

    // WSS, the same way.
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()) {
        roots.add(der.expect("der")).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut request = format!("wss://localhost:{port}/v1/sessions/secure/ws?after=0")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {ACME_KEY}").parse().expect("header"),
    );
    let (mut socket, _) = tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            false,
            Some(tokio_tungstenite::Connector::Rustls(Arc::new(tls))),
        ),
    )
    .await
    .expect("in time")
    .expect("wss connects");
    socket
        .send(Message::text(
            r#"{"op":"message","content":"wss works","ref":1}"#,
        ))
        .await
        .expect("send");
    let mut completed = false;
    while !completed {
        let message = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).expect("json");
            completed = frame["type"] == "task.completed"
                && frame["data"]["interaction"]["response"] == "wss works";
        }
    }
    let _ = socket.close(None).await;

    // Plain HTTP on the TLS port gets no answer of Baton's.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("answer").status().is_success());
    // A client that does not trust the certificate is refused.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .timeout(TIMEOUT)
        .build()
        .expect("client")
        .get(format!("{base}/healthz"))
        .send()
        .await;
    assert!(untrusting.is_err(), "an unknown certificate is not trusted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_mismatched_certificate_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _) = certificate();
    let (_, other_key) = certificate();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, &cert).expect("cert");
    std::fs::write(&key_path, &other_key).expect("key");
    let mut config = config();
    config.listen = "127.0.0.1:0".into();
    config.database = format!("sqlite://{}/b.db", dir.path().display());
    config.tls_cert = Some(cert_path.clone());
    config.tls_key = Some(key_path);
    let error = match baton::server::ServerHandle::start(config.clone()).await {
        Ok(_) => panic!("a key that is not the certificate's was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("tls_cert"), "{error}");
    config.tls_key = Some(dir.path().join("missing.pem"));
    let error = match baton::server::ServerHandle::start(config).await {
        Ok(_) => panic!("a missing key file was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(error.contains("missing.pem"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL over TLS

/// The local server's certificate, which `.ci/run` makes sure exists (self-signed for
/// `localhost`: it is its own root).
fn postgres_root() -> String {
    std::env::var("BATON_TEST_POSTGRES_TLS_ROOT")
        .expect("BATON_TEST_POSTGRES_TLS_ROOT names the local PostgreSQL's certificate")
}

async fn open(url: &str) -> Result<Store, String> {
    Store::connect(
        &DatabaseLocation::Postgres(url.to_string()),
        SqliteOptions::default(),
        PgOptions {
            url: String::new(),
            pool_size: 2,
            lease: Duration::from_secs(5),
            limits: Default::default(),
        },
        Arc::new(Bus::default()),
    )
    .await
    .map_err(|e| e.to_string())
}

/// Whether every connection to `database` is encrypted, and how many there are.
async fn encrypted(admin: &common::cluster::Pg, database: &str) -> (bool, i64) {
    let rows = admin
        .rows(
            "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&database],
        )
        .await
        .expect("pg_stat_ssl");
    (rows[0].get(0), rows[0].get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_postgres_tls_tests),
    ignore = "needs PostgreSQL with TLS: set BATON_TEST_POSTGRES and BATON_TEST_POSTGRES_TLS_ROOT \
              (.ci/run sets both up)"
)]
async fn postgres_urls_honour_sslmode_and_sslrootcert() {
    let admin_url = common::pg::postgres_admin_url();
    let db = common::pg::TestDatabase::create(&admin_url).await;
    let admin = common::cluster::Pg::connect(&admin_url)
        .await
        .expect("admin connection");
    let root = postgres_root();
    // The name the certificate holds; the address stays the loopback one (localhost may
    // resolve to ::1 first, where the local server may want a password).
    let on_localhost = db.url.replace("@127.0.0.1:", "@localhost:");
    let on_localhost = if on_localhost.contains('?') {
        format!("{on_localhost}&hostaddr=127.0.0.1")
    } else {
        format!("{on_localhost}?hostaddr=127.0.0.1")
    };
    let with = |url: &str, query: &str| {
        if url.contains('?') {
            format!("{url}&{query}")
        } else {
            format!("{url}?{query}")
        }
    };

    let store = open(&with(&db.url, "sslmode=require"))
        .await
        .expect("require");
    store.get_session(session()).await.ok();
    let (all, count) = encrypted(&admin, &db.name).await;
    assert!(
        count > 0 && all,
        "sslmode=require: {count} connections, all TLS: {all}"
    );
    drop(store);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let store = open(&with(&db.url, "sslmode=disable"))
        .await
        .expect("disable");
    store.get_session(session()).await.ok();
    let (all, count) = encrypted(&admin, &db.name).await;
    assert!(count > 0 && !all, "sslmode=disable is plain");
    drop(store);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let full = with(
        &on_localhost,
        &format!("sslmode=verify-full&sslrootcert={root}"),
    );
    let store = open(&full)
        .await
        .expect("verify-full with the server's root");
    let (all, _) = encrypted(&admin, &db.name).await;
    assert!(all);
    drop(store);

    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca accepts.
    let by_ip = with(&db.url, &format!("sslmode=verify-full&sslrootcert={root}"));
    assert!(open(&by_ip).await.is_err(), "the name is checked");
    let ca_only = with(&db.url, &format!("sslmode=verify-ca&sslrootcert={root}"));
    open(&ca_only).await.expect("verify-ca ignores the name");

    // A root that did not sign the server's certificate is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let stranger = dir.path().join("stranger.pem");
    std::fs::write(&stranger, certificate().0).expect("write");
    let wrong = with(
        &on_localhost,
        &format!("sslmode=verify-ca&sslrootcert={}", stranger.display()),
    );
    let error = open(&wrong)
        .await
        .err()
        .expect("an unknown root is refused");
    assert!(
        error.to_lowercase().contains("certificate") || error.to_lowercase().contains("tls"),
        "{error}"
    );
}

fn session() -> baton::model::SessionId {
    baton::model::SessionId::new(&baton::model::Tenant::default_tenant(), "tls").expect("id")
}
