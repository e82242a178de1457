//! Access control fixtures: two tenant keys, an admin key and a token secret.

use baton::api::auth::key_sha256;
use baton::config::Config;
use reqwest::Method;
use serde_json::json;

use super::{BASE_CONFIG, TestServer};

pub const ACME_KEY: &str = "bk_test-acme-key-000000000000000000000000000";
pub const BETA_KEY: &str = "bk_test-beta-key-000000000000000000000000000";
pub const ADMIN_KEY: &str = "bk_test-admin-key-00000000000000000000000000";
pub const SECRET: &str = "test-token-secret-0123456789abcdef";

/// Two tenant keys (`acme`, `beta`) and an admin key (tenant `ops`), with a token secret.
pub fn config() -> Config {
    let toml = format!(
        r#"{BASE_CONFIG}
[auth]
mode = "keys"

[[auth.keys]]
id = "acme-backend"
tenant = "acme"
sha256 = "{}"

[[auth.keys]]
id = "beta-backend"
tenant = "beta"
sha256 = "{}"

[[auth.keys]]
id = "operator"
tenant = "ops"
role = "admin"
sha256 = "{}"
"#,
        key_sha256(ACME_KEY),
        key_sha256(BETA_KEY),
        key_sha256(ADMIN_KEY)
    );
    let mut config = Config::from_toml(&toml).expect("config parses");
    config.auth.as_mut().expect("[auth]").token_secrets = vec![SECRET.into()];
    config
}

/// Mints a token with the `acme` key.
pub async fn mint(server: &TestServer, session: &str, scope: &str, ttl_s: u64) -> String {
    let answer = server
        .request(
            Method::POST,
            &format!("/v1/sessions/{session}/tokens"),
            Some(&json!({"scope": scope, "ttl_s": ttl_s})),
            &[("authorization", &format!("Bearer {ACME_KEY}"))],
        )
        .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    answer.body["token"].as_str().expect("token").to_string()
}
