//! Marks the tests that need something outside Rust as runnable only where it is there, so
//! that elsewhere `cargo test` lists them as ignored instead of counting them as passed: the
//! PostgreSQL suite needs `BATON_TEST_POSTGRES`, the README walk-through needs `curl`, the
//! Python client's suite `python3` with its `venv` module.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(baton_postgres_tests)");
    println!("cargo::rustc-check-cfg=cfg(baton_has_curl)");
    println!("cargo::rustc-check-cfg=cfg(baton_postgres_tls_tests)");
    println!("cargo::rustc-check-cfg=cfg(baton_has_chromium)");
    println!("cargo::rustc-check-cfg=cfg(baton_has_python_venv)");
    println!("cargo::rerun-if-env-changed=BATON_TEST_POSTGRES_TLS_ROOT");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=BATON_TEST_POSTGRES");
    println!("cargo::rerun-if-env-changed=PATH");
    if std::env::var("BATON_TEST_POSTGRES").is_ok_and(|url| !url.trim().is_empty()) {
        println!("cargo::rustc-cfg=baton_postgres_tests");
        if std::env::var("BATON_TEST_POSTGRES_TLS_ROOT").is_ok_and(|p| !p.trim().is_empty()) {
            println!("cargo::rustc-cfg=baton_postgres_tls_tests");
        }
    }
    // The console's browser tests: Debian's chromium and its driver.
    let chromium = find_in_path("chromium").or_else(|| find_in_path("chromium-browser"));
    match (chromium, find_in_path("chromedriver")) {
        (Some(browser), Some(driver)) => {
            println!("cargo::rerun-if-changed={}", browser.display());
            println!("cargo::rerun-if-changed={}", driver.display());
            println!("cargo::rustc-cfg=baton_has_chromium");
        }
        _ => println!("cargo::rerun-if-changed=/usr/bin/chromedriver"),
    }
    match find_in_path("curl") {
        Some(curl) => {
            println!("cargo::rerun-if-changed={}", curl.display());
            println!("cargo::rustc-cfg=baton_has_curl");
        }
        // Looked for again once it is installed there.
        None => println!("cargo::rerun-if-changed=/usr/bin/curl"),
    }
    // The Python client's suite (tests/python_client.rs): python3 able to make a venv.
    let python = find_in_path("python3");
    let venv = python.as_ref().is_some_and(|python| {
        std::process::Command::new(python)
            .args(["-c", "import venv, ensurepip"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    match python {
        Some(python) if venv => {
            println!("cargo::rerun-if-changed={}", python.display());
            println!("cargo::rustc-cfg=baton_has_python_venv");
        }
        _ => println!("cargo::rerun-if-changed=/usr/bin/python3"),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
