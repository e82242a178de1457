//! What the operating system says about processes and pipes (Linux `/proc`), to check that
//! agents leave nothing behind.

use std::path::Path;
use std::time::Duration;

use super::TIMEOUT;

/// `(pid, state, ppid, pgrp)` of every process.
fn processes() -> Vec<(i32, char, i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            let pgrp = fields.next()?.parse().ok()?;
            Some((pid, state, ppid, pgrp))
        })
        .collect()
}

/// Whether any process (zombies included) is still in process group `group`.
pub fn group_alive(group: i32) -> bool {
    processes().iter().any(|&(_, _, _, pgrp)| pgrp == group)
}

/// Zombie children of this process.
pub fn zombie_children() -> usize {
    let me = std::process::id() as i32;
    processes()
        .iter()
        .filter(|&&(_, state, ppid, _)| ppid == me && state == 'Z')
        .count()
}

/// Pipes this process holds open.
pub fn open_pipes() -> usize {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    fds.flatten()
        .filter(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("pipe:"))
        })
        .count()
}

/// The process groups that agent scripts recorded as files named by their pid in `dir`.
pub fn recorded_groups(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` until it holds; panics with `what` after [`TIMEOUT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
