//! Scenario **auth**: what access control costs. The throughput load against two servers of
//! this build started side by side, one open and one with `[auth]` keys where every request
//! carries a key, measured in alternating rounds (open, keys, open, keys…) so that drift of
//! the machine hits both alike; and the cost of checking one credential in-process (an API
//! key's SHA-256 and constant-time comparison; a session token's HMAC).

use std::time::{Duration, Instant};

use super::spawn::spawn_baton;
use super::throughput::throughput;
use super::{BENCH_CONFIG, BenchOptions, Window};
use baton::api::auth::{Auth, Scope, key_sha256, new_key};
use baton::config::{AuthConfig, AuthMode, KeyConfig, KeyRole};
use baton::model::{SessionId, Tenant};

/// Alternating rounds of each configuration.
const ROUNDS: usize = 3;
/// Credentials checked per micro-benchmark.
const CHECKS: u32 = 200_000;

pub(super) async fn auth(options: &BenchOptions) -> anyhow::Result<String> {
    let (key, hash) = new_key()?;
    let keyed_config = format!(
        "{BENCH_CONFIG}\n[auth]\nmode = \"keys\"\n\n[[auth.keys]]\nid = \"bench\"\n\
         tenant = \"bench\"\nsha256 = \"{hash}\"\n"
    );
    let open = spawn_baton(BENCH_CONFIG, None).await?;
    let keyed = spawn_baton(&keyed_config, None).await?;
    let duration = Duration::from_secs_f64(options.duration_s);
    let mut out = String::from(
        "| round | open: messages/s | keys on every request: messages/s | keys / open |\n\
         |---|---|---|---|\n",
    );
    let (mut open_sum, mut keyed_sum) = (0.0, 0.0);
    for round in 1..=ROUNDS {
        eprintln!(
            "[auth] round {round}: open, then keys ({} s each)",
            options.duration_s
        );
        let a = throughput(
            &[open.url.as_str()],
            options.sessions,
            None,
            Window::after_warmup(duration),
        )
        .await?;
        let b = throughput(
            &[keyed.url.as_str()],
            options.sessions,
            Some(&key),
            Window::after_warmup(duration),
        )
        .await?;
        anyhow::ensure!(b.errors == 0, "requests with the key failed: {}", b.errors);
        open_sum += a.per_second;
        keyed_sum += b.per_second;
        out.push_str(&format!(
            "| {round} | {:.0} | {:.0} | {:.3} |\n",
            a.per_second,
            b.per_second,
            b.per_second / a.per_second
        ));
    }
    out.push_str(&format!(
        "| mean | {:.0} | {:.0} | {:.3} |\n\n",
        open_sum / ROUNDS as f64,
        keyed_sum / ROUNDS as f64,
        keyed_sum / open_sum
    ));
    drop((open, keyed));

    let (key_ns, token_ns) = check_costs()?;
    out.push_str(&format!(
        "| one credential checked in-process ({CHECKS} times) | ns each |\n|---|---|\n\
         | API key (SHA-256, compared with every configured key; 16 keys) | {key_ns:.0} |\n\
         | session token (HMAC-SHA256, expiry) | {token_ns:.0} |\n"
    ));
    Ok(out)
}

/// Nanoseconds per check of a key (among 16 configured) and of a token.
fn check_costs() -> anyhow::Result<(f64, f64)> {
    let mut keys = Vec::new();
    let mut last = String::new();
    for i in 0..16 {
        let (key, _) = new_key()?;
        keys.push(KeyConfig {
            id: format!("k{i}"),
            tenant: "bench".into(),
            role: KeyRole::Tenant,
            sha256: key_sha256(&key),
            rate_per_s: None,
        });
        last = key;
    }
    let config = AuthConfig {
        mode: AuthMode::Keys,
        token_secret_env: Vec::new(),
        token_secrets: vec!["a benchmark secret of enough bytes".into()],
        cors_origins: Vec::new(),
        keys,
    };
    let auth = Auth::from_config(Some(&config), |_| None)?;
    let session = SessionId::new(&Tenant::parse("bench")?, "s")?;
    let token = auth
        .mint("k15", &session, Scope::Write, 3600)
        .ok_or_else(|| anyhow::anyhow!("no token"))?
        .token;
    let time = |check: &dyn Fn() -> bool| {
        let started = Instant::now();
        for _ in 0..CHECKS {
            assert!(std::hint::black_box(check()));
        }
        started.elapsed().as_nanos() as f64 / f64::from(CHECKS)
    };
    let key_ns = time(&|| auth.resolve(std::hint::black_box(&last)).is_ok());
    let token_ns = time(&|| auth.verify_token(std::hint::black_box(&token)).is_ok());
    Ok((key_ns, token_ns))
}
