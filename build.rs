//! Marks the PostgreSQL test suite as runnable when `BATON_TEST_POSTGRES` is set; without it,
//! `cargo test` lists those tests as ignored instead of counting them as passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(baton_postgres_tests)");
    println!("cargo::rerun-if-env-changed=BATON_TEST_POSTGRES");
    if std::env::var("BATON_TEST_POSTGRES").is_ok_and(|url| !url.trim().is_empty()) {
        println!("cargo::rustc-cfg=baton_postgres_tests");
    }
}
