//! The Python client (`clients/python`) against this build's server: its own suite —
//! `mypy --strict` over the package and its tests, then pytest (every client method sync and
//! async, every error class from its real cause, paging, TLS, the event stream resuming across
//! restarts and dropped connections) — run in the package's virtual environment
//! (`clients/python/run-tests.sh` makes it on first use, which needs PyPI).

use std::process::Command;

#[test]
#[cfg_attr(
    not(baton_has_python_venv),
    ignore = "needs python3 with its venv module (Debian's python3-venv)"
)]
fn the_python_clients_suite_passes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/run-tests.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("BATON_BIN", env!("CARGO_BIN_EXE_baton"))
        .output()
        .expect("run clients/python/run-tests.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "clients/python/run-tests.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // pytest's closing line, for the record in cargo's output.
    println!("{}", stdout.lines().last().unwrap_or_default());
}
