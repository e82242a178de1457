//! Starting the servers under test — `baton serve` (this very binary) or the Python peer —
//! each in a temporary folder of its own, waiting until they serve, and reading their
//! resident memory.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A fresh folder under the system's temporary directory, removed (with what is in it) when
/// dropped.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> std::io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "baton-bench-{}-{n}-{nanos:08x}",
                std::process::id()
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process started by the benchmark; killed when dropped (before its folder goes).
pub(super) struct Spawned {
    child: Child,
    pub(super) url: String,
    _dir: ScratchDir,
}

impl Spawned {
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// Starts `baton serve` with `config` on `database`, or on a fresh SQLite file when `None`.
pub(super) async fn spawn_baton(config: &str, database: Option<&str>) -> anyhow::Result<Spawned> {
    let dir = ScratchDir::new()?;
    let config_file = dir.0.join("bench.toml");
    std::fs::write(&config_file, config)?;
    let database = database.map_or_else(
        || format!("sqlite://{}", dir.0.join("bench.db").display()),
        str::to_string,
    );
    let exe = std::env::current_exe().context("locating the baton binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(&config_file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--database")
        .arg(&database)
        .env("BATON_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting baton serve")?;
    let stdout = child.stdout.take().context("baton's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("baton listening on ") {
                return Ok(url.trim().to_string());
            }
        }
        bail!("baton exited before listening")
    })
    .await
    .context("baton did not start in 30 s")??;
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Spawned {
        child,
        url,
        _dir: dir,
    })
}

/// Starts the peer's `server.py` with `config`, on a fresh data folder.
pub(super) async fn spawn_peer(
    peer_dir: &Path,
    python: &Path,
    config: &str,
) -> anyhow::Result<Spawned> {
    let dir = ScratchDir::new()?;
    let config_file = dir.0.join("bench.toml");
    std::fs::write(&config_file, config)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(python)
        .arg(peer_dir.join("server.py"))
        .arg("--config")
        .arg(&config_file)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data")
        .arg(dir.0.join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the peer with {}", python.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&url).await?;
    Ok(Spawned {
        child,
        url,
        _dir: dir,
    })
}

pub(super) async fn wait_healthy(url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{url}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not become healthy in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resident memory of a process, in KiB (Linux).
pub(super) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
