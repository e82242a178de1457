//! The web console: its files are embedded in the binary (no Node.js to build, nothing fetched
//! from a CDN) and served under `/console/`, gzipped once at start-up for clients that accept
//! it, with an `ETag` so a browser revalidates (`304`) instead of downloading again.

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;

use super::error::ApiError;

/// One embedded file, ready to serve.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    plain: &'static [u8],
    gzip: Vec<u8>,
    etag: HeaderValue,
}

const FILES: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../console/index.html"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/console.js"),
    ),
    (
        "baton.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../console/baton.js"),
    ),
    (
        "baton.d.ts",
        "application/typescript; charset=utf-8",
        include_bytes!("../console/baton.d.ts"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/console.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../console/favicon.svg"),
    ),
];

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|&(name, content_type, plain)| {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
            // Writing to memory cannot fail.
            let _ = encoder.write_all(plain);
            let gzip = encoder.finish().unwrap_or_default();
            let digest = ring::digest::digest(&ring::digest::SHA256, plain);
            let hex: String = digest.as_ref()[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Asset {
                name,
                content_type,
                plain,
                gzip,
                etag: HeaderValue::from_str(&format!("\"{hex}\""))
                    .unwrap_or(HeaderValue::from_static("\"0\"")),
            }
        })
        .collect()
});

/// The console's files and their sizes, uncompressed (for the size check).
pub fn files() -> impl Iterator<Item = (&'static str, usize)> {
    FILES.iter().map(|(name, _, bytes)| (*name, bytes.len()))
}

/// `GET /`: the console.
pub async fn root() -> Response {
    secured(Redirect::temporary("/console/").into_response())
}

/// The console's scripts and styles come from itself only (no inline script or style, no
/// other origin), it talks to its own origin only, and no other site may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Every console response carries the security headers.
fn secured(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /console/`.
pub async fn index(headers: HeaderMap) -> Response {
    secured(serve("index.html", &headers))
}

/// `GET /favicon.ico`, which browsers ask for on their own: the console's icon (an SVG, which
/// they take whatever the name says; the page itself links `/console/favicon.svg`).
pub async fn favicon(headers: HeaderMap) -> Response {
    secured(serve("favicon.svg", &headers))
}

/// `GET /console/{file}`.
pub async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    secured(serve(&name, &headers))
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return ApiError::not_found("no such console file").into_response();
    };
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|tag| tag.as_bytes() == asset.etag.as_bytes())
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let gzip = headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
        let mut response = if gzip {
            let mut r = Response::new(Body::from(asset.gzip.clone()));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            r
        } else {
            Response::new(Body::from(asset.plain))
        };
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        response
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, asset.etag.clone());
    // Revalidated each time (a 304 when unchanged): a new build's files are never mixed
    // with an old page's.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response
}
