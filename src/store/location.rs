//! Where the database lives: the `database` URL parsed into an SQLite file or a PostgreSQL
//! connection URL, and SQLite's durability setting.

use std::path::PathBuf;

use anyhow::bail;
use serde::Deserialize;

/// SQLite's `synchronous` pragma in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync per commit: a process crash loses nothing, a power loss may lose the last commits.
    #[default]
    Normal,
    /// fsync per (group) commit: durable across power loss.
    Full,
}

/// A parsed `database` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseLocation {
    SqliteFile(PathBuf),
    /// A `postgres://` (or `postgresql://`) connection URL.
    Postgres(String),
}

impl DatabaseLocation {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                bail!("database {url:?}: the SQLite URL names no file");
            }
            return Ok(Self::SqliteFile(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let parsed = postgres_url(url).map_err(|e| anyhow::anyhow!(e))?;
            if let Err(e) = parsed.parse::<tokio_postgres::Config>() {
                bail!("database URL: {e}");
            }
            return Ok(Self::Postgres(url.to_string()));
        }
        bail!("database {url:?}: expected sqlite://PATH or postgres://USER@HOST/DB")
    }
}

/// A PostgreSQL URL as tokio-postgres reads it (`sslmode` mapped, `sslrootcert` taken out),
/// or why it is not one.
pub fn postgres_url(url: &str) -> Result<String, String> {
    super::postgres::tls::PgUrl::parse(url).map(|u| u.url)
}
