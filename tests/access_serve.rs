//! Access control as an operator meets it, through the real `baton` binary: a server that
//! other machines could reach refuses to start without access control and says what to add;
//! `baton key new` prints a key and the block that makes it work; the CLI sends `--key`;
//! and no key, token or secret ever shows up in the logs or `/metrics`.

mod common;

use common::TIMEOUT;
use common::child::{baton, run, serve, terminate};

use serde_json::{Value, json};

const SECRET: &str = "a-token-secret-that-must-never-be-logged-31337";

/// `baton key new`: the key and the `[[auth.keys]]` block it printed.
fn new_key(tenant: &str, role: &str) -> (String, String) {
    let (code, stdout, stderr) =
        run(baton().args(["key", "new", "--tenant", tenant, "--role", role]));
    assert_eq!(code, 0, "{stderr}");
    let key = stdout
        .lines()
        .find(|l| l.starts_with("bk_"))
        .unwrap_or_else(|| panic!("no key in {stdout}"))
        .to_string();
    let block = stdout[stdout.find("[[auth.keys]]").expect("the block")..].to_string();
    assert!(
        !block.contains(&key),
        "the block holds the hash, never the key"
    );
    (key, block)
}

#[test]
fn a_reachable_listen_address_without_access_control_refuses_to_start() {
    let (code, stdout, stderr) = run(baton().args(["serve", "--listen", "0.0.0.0:0"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    for needed in [
        "[auth]",
        "mode = \"keys\"",
        "baton key new",
        "mode = \"none\"",
    ] {
        assert!(stderr.contains(needed), "says to add {needed}: {stderr}");
    }
    // Open on purpose: it starts.
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, url) = serve(
        &dir,
        "listen = \"0.0.0.0:0\"\n[auth]\nmode = \"none\"\n",
        &[],
    );
    assert!(url.starts_with("http://"), "{url}");
    drop(child);
}

#[test]
fn a_named_secret_that_is_not_set_refuses_to_start_without_echoing_values() {
    let (_, block) = new_key("acme", "tenant");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("baton.toml");
    std::fs::write(
        &path,
        format!("[auth]\ntoken_secret_env = [\"BATON_TEST_UNSET_SECRET\"]\n{block}"),
    )
    .expect("write");
    let (code, _, stderr) = run(baton()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env_remove("BATON_TEST_UNSET_SECRET"));
    assert_ne!(code, 0);
    assert!(stderr.contains("BATON_TEST_UNSET_SECRET"), "{stderr}");
    assert!(stderr.contains("not set"), "{stderr}");
    let (code, _, stderr) = run(baton()
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("BATON_TEST_UNSET_SECRET", "short-secret"));
    assert_ne!(code, 0);
    assert!(stderr.contains("too short"), "{stderr}");
    assert!(
        !stderr.contains("short-secret"),
        "the value is never echoed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_tokens_and_secrets_never_reach_the_logs_or_metrics() {
    let (tenant_key, tenant_block) = new_key("acme", "tenant");
    let (admin_key, admin_block) = new_key("ops", "admin");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[agents.default]\nkind = \"echo\"\n\n[auth]\n\
         token_secret_env = [\"BATON_TEST_SECRET\"]\n{tenant_block}\n{admin_block}"
    );
    let (child, url) = serve(&dir, &config, &[("BATON_TEST_SECRET", SECRET)]);
    let http = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .build()
        .expect("client");
    let bearer = |credential: &str| format!("Bearer {credential}");
    let sent = http
        .post(format!("{url}/v1/sessions/s/messages?wait=10"))
        .header("authorization", bearer(&tenant_key))
        .json(&json!({"content": "hello"}))
        .send()
        .await
        .expect("send");
    assert_eq!(sent.status(), 200);
    let minted: Value = http
        .post(format!("{url}/v1/sessions/s/tokens"))
        .header("authorization", bearer(&tenant_key))
        .json(&json!({"scope": "read"}))
        .send()
        .await
        .expect("mint")
        .json()
        .await
        .expect("token");
    let token = minted["token"].as_str().expect("token").to_string();
    // Good and bad credentials, in headers and in the URL.
    let wrong_key = format!("{tenant_key}x");
    for (path, credential) in [
        ("/v1/sessions/s", Some(token.as_str())),
        ("/v1/sessions/s", Some(wrong_key.as_str())),
        ("/v1/sessions/s/interactions", Some(admin_key.as_str())),
        ("/v1/sessions", Some(token.as_str())),
        ("/metrics", Some(tenant_key.as_str())),
    ] {
        let mut request = http.get(format!("{url}{path}"));
        if let Some(credential) = credential {
            request = request.header("authorization", bearer(credential));
        }
        request.send().await.expect("request");
    }
    for query in [
        format!("access_token={token}"),
        format!("access_token={tenant_key}"),
    ] {
        let answer = http
            .get(format!("{url}/v1/sessions/s/events?{query}"))
            .send()
            .await
            .expect("events");
        drop(answer);
    }
    let metrics = http
        .get(format!("{url}/metrics"))
        .header("authorization", bearer(&admin_key))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.expect("text");
    let log = terminate(child);
    assert!(
        log.contains("request refused by the access gate") && log.contains("request authenticated"),
        "the log tells about every request: {log}"
    );
    let signature = token.rsplit('.').next().expect("signature");
    for (what, secret) in [
        ("the tenant key", tenant_key.as_str()),
        ("the admin key", admin_key.as_str()),
        ("a token", token.as_str()),
        ("a token's signature", signature),
        ("the token secret", SECRET),
        ("the key's prefix", &tenant_key[..20]),
    ] {
        assert!(!log.contains(secret), "{what} is in the log");
        assert!(!metrics.contains(secret), "{what} is in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_key() {
    let (key, block) = new_key("acme", "tenant");
    let dir = tempfile::tempdir().expect("tempdir");
    let config =
        format!("listen = \"127.0.0.1:0\"\n[agents.default]\nkind = \"echo\"\n\n[auth]\n{block}");
    let (_child, url) = serve(&dir, &config, &[]);
    let (code, stdout, stderr) = run(baton()
        .args(["send", "s", "hello there", "--server", &url])
        .env("BATON_KEY", &key));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "hello there");
    let (code, stdout, stderr) =
        run(baton().args(["history", "s", "--server", &url, "--key", &key]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("hello there"), "{stdout}");
    let (code, _, stderr) = run(baton().args(["history", "s", "--server", &url]));
    assert_ne!(code, 0);
    assert!(stderr.contains("unauthorized"), "{stderr}");
    assert!(!stderr.contains(&key));
}
