//! The console's files as the binary serves them: under 250 KB in all, gzipped for clients
//! that accept it, revalidated with an ETag, open without credentials even with access
//! control on, and `/` leads to them.

mod common;

use common::TestServer;
use common::access::config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_embedded_small_compressed_cached_and_open() {
    let total: usize = baton::api::console::files().map(|(_, size)| size).sum();
    assert!(total < 250 * 1024, "the console is {total} bytes");
    // Access control on: the files need no credentials (they hold no data).
    let server = TestServer::start_with_config(config()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let root = http
        .get(format!("{}/", server.url))
        .send()
        .await
        .expect("root");
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/console/");
    for (name, _) in baton::api::console::files() {
        let path = if name == "index.html" {
            "/console/".to_string()
        } else {
            format!("/console/{name}")
        };
        let plain = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("file");
        assert_eq!(plain.status(), 200, "{path}");
        assert!(plain.headers().get("content-encoding").is_none());
        let etag = plain.headers()["etag"].clone();
        assert_eq!(plain.headers()["cache-control"], "no-cache");
        let body = plain.bytes().await.expect("body");
        let gzipped = http
            .get(format!("{}{path}", server.url))
            .header("accept-encoding", "gzip, br")
            .send()
            .await
            .expect("file");
        assert_eq!(gzipped.headers()["content-encoding"], "gzip", "{path}");
        let packed = gzipped.bytes().await.expect("body");
        let mut unpacked = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&packed[..]),
            &mut unpacked,
        )
        .expect("gzip");
        assert_eq!(unpacked, body.to_vec(), "{path}");
        assert!(packed.len() < body.len(), "{path} compresses");
        let again = http
            .get(format!("{}{path}", server.url))
            .header("if-none-match", etag)
            .send()
            .await
            .expect("file");
        assert_eq!(again.status(), 304, "{path}");
    }
    let missing = http
        .get(format!("{}/console/nothing.js", server.url))
        .send()
        .await
        .expect("missing");
    assert_eq!(missing.status(), 404);
    server.stop().await;
}

/// `/favicon.ico`, which browsers ask for on their own, is an icon (not a 404), with the
/// console's security headers; the page names its icon under `/console/`, open with access
/// control on as the other files are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_has_an_icon() {
    let server = TestServer::start_default().await;
    let icon = reqwest::get(format!("{}/favicon.ico", server.url))
        .await
        .expect("favicon");
    assert_eq!(icon.status(), 200);
    let h = icon.headers().clone();
    assert_eq!(h["content-type"], "image/svg+xml");
    assert!(
        h["content-security-policy"]
            .to_str()
            .expect("ASCII")
            .contains("default-src 'none'")
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let body = icon.text().await.expect("body");
    assert!(
        body.starts_with("<svg") && body.trim_end().ends_with("</svg>"),
        "{body}"
    );
    server.stop().await;

    let server = TestServer::start_with_config(config()).await;
    let page = reqwest::get(format!("{}/console/", server.url))
        .await
        .expect("page")
        .text()
        .await
        .expect("page");
    assert!(
        page.contains(r#"<link rel="icon" href="/console/favicon.svg" type="image/svg+xml">"#),
        "{page}"
    );
    let linked = reqwest::get(format!("{}/console/favicon.svg", server.url))
        .await
        .expect("icon");
    assert_eq!(linked.status(), 200);
    assert_eq!(linked.headers()["content-type"], "image/svg+xml");
    assert_eq!(linked.text().await.expect("body"), body);
    server.stop().await;
}
