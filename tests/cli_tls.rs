//! The command-line clients over HTTPS and WSS to a server whose certificate a private CA
//! issued: trusted with `--cacert FILE` or `SSL_CERT_FILE`, and, when the certificate is not
//! right, an error that says what is wrong with it in words. The suite makes its own
//! certificates.

#[path = "common/cli_child.rs"]
mod cli_child;
mod common;

use cli_child::{run, text};
use common::TestServer;
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};

const NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A CA (cert, key) able to sign.
fn authority() -> (Certificate, KeyPair) {
    let mut params = CertificateParams::new(NAMES.map(String::from).to_vec()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    (params.self_signed(&key).expect("CA"), key)
}

/// A server certificate for `names`, issued by `ca`: (cert PEM, key PEM).
fn issued(ca: &(Certificate, KeyPair), names: &[&str]) -> (String, String) {
    let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("params");
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.0, &ca.1).expect("signed");
    (cert.pem(), key.serialize_pem())
}

/// A server with this certificate and key, and the `https://localhost:PORT` URL to it.
async fn serve(dir: &tempfile::TempDir, cert: &str, key: &str) -> (TestServer, String) {
    let cert_path = dir.path().join("server-cert.pem");
    let key_path = dir.path().join("server-key.pem");
    std::fs::write(&cert_path, cert).expect("cert");
    std::fs::write(&key_path, key).expect("key");
    let mut config = baton::config::Config::from_toml(common::BASE_CONFIG).expect("config");
    config.tls_cert = Some(cert_path);
    config.tls_key = Some(key_path);
    let server = TestServer::start_with_config(config).await;
    let port = server.url.rsplit(':').next().expect("port").to_string();
    (server, format!("https://localhost:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_with_cacert_or_ssl_cert_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = authority();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.0.pem()).expect("ca");
    let ca_file = ca_path.to_str().expect("path");
    let (cert, key) = issued(&ca, &NAMES);
    let (server, url) = serve(&dir, &cert, &key).await;

    // Not trusted by default: said in words, with the way out.
    for args in [
        vec!["send", "tls", "hello", "--server", &url],
        vec!["history", "tls", "--server", &url],
    ] {
        let out = run(&args, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("UnknownIssuer"), "{stderr}");
        assert!(
            stderr.contains("not issued by a certificate authority this client trusts"),
            "{stderr}"
        );
        assert!(stderr.contains("--cacert"), "{stderr}");
    }

    // WSS (send) and HTTPS (history, sessions) with --cacert.
    let sent = run(
        &[
            "send", "tls", "over tls", "--server", &url, "--cacert", ca_file,
        ],
        &[],
    )
    .await;
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(text(&sent.stdout).trim(), "over tls");
    let history = run(
        &[
            "history", "tls", "--json", "--server", &url, "--cacert", ca_file,
        ],
        &[],
    )
    .await;
    assert!(history.status.success(), "{history:?}");
    assert!(text(&history.stdout).contains("over tls"), "{history:?}");

    // The same with SSL_CERT_FILE.
    let env = [("SSL_CERT_FILE", ca_file)];
    let sent = run(&["send", "tls", "again", "--server", &url], &env).await;
    assert!(sent.status.success(), "{sent:?}");
    let listed = run(&["sessions", "--server", &url], &env).await;
    assert!(listed.status.success(), "{listed:?}");
    assert!(text(&listed.stdout).starts_with("tls"), "{listed:?}");

    // A file that is not there, or holds no certificate: said before connecting.
    let missing = dir.path().join("missing.pem");
    let out = run(
        &[
            "history",
            "tls",
            "--server",
            &url,
            "--cacert",
            missing.to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("missing.pem"), "{out:?}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let out = run(
        &[
            "history",
            "tls",
            "--server",
            &url,
            "--cacert",
            empty.to_str().expect("path"),
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no certificate"), "{out:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_wrong_with_a_certificate_is_said_in_words() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = authority();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.0.pem()).expect("ca");
    let ca_file = ca_path.to_str().expect("path");

    // The CA's own certificate served as the server's.
    let (server, url) = serve(&dir, &ca.0.pem(), &ca.1.serialize_pem()).await;
    for command in ["send", "history"] {
        let args: Vec<&str> = match command {
            "send" => vec!["send", "s", "x", "--server", &url, "--cacert", ca_file],
            _ => vec!["history", "s", "--server", &url, "--cacert", ca_file],
        };
        let out = run(&args, &[]).await;
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("CaUsedAsEndEntity"), "{stderr}");
        assert!(
            stderr.contains("is a CA certificate"),
            "{command}: {stderr}"
        );
    }
    server.stop().await;

    // A certificate for another name.
    let (cert, key) = issued(&ca, &["elsewhere.example"]);
    let (server, url) = serve(&dir, &cert, &key).await;
    let out = run(
        &["history", "s", "--server", &url, "--cacert", ca_file],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("not valid for the name localhost"),
        "{stderr}"
    );
    server.stop().await;
}
