//! Test databases on the PostgreSQL named by `BATON_TEST_POSTGRES` (an admin URL, e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`): each test gets a database of its own,
//! dropped when it ends. Without the variable (at build time: see `build.rs`) the PostgreSQL
//! tests are marked ignored.

use super::TIMEOUT;
use super::cluster::Pg;

/// The variable that names the PostgreSQL admin URL.
pub const POSTGRES_ENV: &str = "BATON_TEST_POSTGRES";

/// The admin URL. The PostgreSQL tests are compiled as ignored unless the variable was set
/// when they were built, so one that runs without it (`--ignored`) says what it misses.
pub fn postgres_admin_url() -> String {
    admin_url_from(std::env::var(POSTGRES_ENV).ok()).unwrap_or_else(|| {
        panic!(
            "set {POSTGRES_ENV}=postgres://postgres@127.0.0.1:5432/postgres (an admin URL) \
             to run the PostgreSQL suite"
        )
    })
}

/// The admin URL a variable's value names: unset or blank means none.
pub fn admin_url_from(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `admin_url` with its database replaced by `database` (query parameters kept).
pub fn database_url(admin_url: &str, database: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin_url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let head = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{head}/{database}?{query}"),
        None => format!("{head}/{database}"),
    }
}

/// A database of its own for one test, dropped (`WITH (FORCE)`) when the guard drops, panics
/// included.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    /// The URL the nodes get.
    pub url: String,
}

impl TestDatabase {
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = format!("baton_test_{}", uuid::Uuid::now_v7().simple());
        let admin = Pg::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("{POSTGRES_ENV}: {e}"));
        tokio::time::timeout(
            TIMEOUT,
            admin
                .client
                .batch_execute(&format!("CREATE DATABASE {name}")),
        )
        .await
        .expect("CREATE DATABASE in time")
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDatabase {
            admin_url: admin_url.to_string(),
            url: database_url(admin_url, &name),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // A thread of its own with a runtime of its own: this may run inside the test's
        // runtime, or while a panic unwinds it.
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            runtime.block_on(async {
                let admin = Pg::connect(&admin_url).await?;
                tokio::time::timeout(
                    TIMEOUT,
                    admin
                        .client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")),
                )
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop database {}: {e}", self.name),
            Err(_) => eprintln!("warning: dropping database {} panicked", self.name),
        }
    }
}
