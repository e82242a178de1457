//! Test databases on the PostgreSQL named by `BATON_TEST_POSTGRES` (an admin URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`): each test gets a database of its own,
//! dropped when it ends. Without the variable the PostgreSQL tests are skipped, saying so.

use std::sync::Once;

/// The variable naming the admin URL.
pub const VAR: &str = "BATON_TEST_POSTGRES";

/// The admin URL, if the PostgreSQL suite is enabled.
pub fn admin_url() -> Option<String> {
    std::env::var(VAR).ok().filter(|v| !v.trim().is_empty())
}

/// Whether to run PostgreSQL tests; prints once per test binary how to enable them if not.
pub fn enabled() -> bool {
    static SKIP_NOTICE: Once = Once::new();
    if admin_url().is_some() {
        return true;
    }
    SKIP_NOTICE.call_once(|| {
        eprintln!(
            "PostgreSQL suite skipped: set {VAR}=postgres://postgres@127.0.0.1:5432/postgres to run it"
        );
    });
    false
}

/// A database created for one test; dropped (with any connection left) on drop.
pub struct TestDatabase {
    /// The URL of the test database itself.
    pub url: String,
    pub name: String,
    admin: String,
}

impl TestDatabase {
    /// Creates a fresh database; `None` when the suite is not enabled. Panics when enabled
    /// but unreachable: CI must fail then.
    pub async fn create() -> Option<Self> {
        let admin = admin_url()?;
        let name = format!("baton_test_{}", uuid_hex());
        let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{VAR} is set but PostgreSQL is not reachable: {e}"));
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        drop(client);
        let _ = driver.await;
        let url = with_database(&admin, &name);
        Some(Self { url, name, admin })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // A runtime of its own: this may run inside (or after) the test's runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

/// `admin` with its database path replaced by `name`.
pub fn with_database(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

fn uuid_hex() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{:x}{:x}{n:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}
