//! The README tells the truth: its curl walk-through, run command by command against a fresh
//! server started the way the Quick start starts it, gives every answer the README shows; and
//! every relative link in the README, BENCHMARKS.md and `docs/` leads to a file (and heading)
//! of this repository.
//!
//! The walk-through is the first ```sh block after the heading "A walk-through with curl".
//! In it, a line `# → ANSWER` (continued by lines `#` + at least two spaces) shows the output
//! of the command just above it, where `…` stands for any text; other comments are prose.
//! Every command must show its answer, except function definitions (`name() { … }`), which
//! are run before each command.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for the server to start, and for any one command.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The heading whose first ```sh block is the walk-through.
const WALKTHROUGH_HEADING: &str = "### A walk-through with curl";
/// The address the README uses, replaced by the test server's.
const README_ADDRESS: &str = "localhost:7420";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The walk-through

/// One command of the walk-through and the answer the README shows for it.
#[derive(Debug)]
struct Step {
    /// Line number in README.md, for messages.
    line: usize,
    command: String,
    /// The answer with `…` wildcards; `None` for a definition run before every command.
    expected: Option<String>,
}

/// The lines of the first ```sh block after `heading`, with their README line numbers.
fn shell_block_after(markdown: &str, heading: &str) -> Vec<(usize, String)> {
    let mut lines = markdown.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, line)| line.trim_end() == heading)
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    lines
        .by_ref()
        .find(|(_, line)| line.trim_end() == "```sh")
        .unwrap_or_else(|| panic!("no ```sh block after {heading:?} in README.md"));
    let block: Vec<(usize, String)> = lines
        .take_while(|(_, line)| line.trim_end() != "```")
        .map(|(i, line)| (i + 1, line.to_string()))
        .collect();
    assert!(!block.is_empty(), "the walk-through block is empty");
    block
}

fn is_definition(command: &str) -> bool {
    let head = command.trim_start();
    head.split_once("()").is_some_and(|(name, rest)| {
        !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && rest.trim_start().starts_with('{')
    })
}

/// Splits the block into commands (joining `\` continuations) and their shown answers.
fn parse_walkthrough(block: &[(usize, String)]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    // Whether the previous line was part of an answer (so `#  …` continues it).
    let mut in_answer = false;
    let mut pending: Option<(usize, String)> = None;
    for (number, line) in block {
        if let Some((start, mut command)) = pending.take() {
            command.push('\n');
            command.push_str(line);
            if line.trim_end().ends_with('\\') {
                pending = Some((start, command));
            } else {
                steps.push(Step {
                    line: start,
                    command,
                    expected: None,
                });
            }
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            in_answer = false;
        } else if let Some(answer) = trimmed.strip_prefix("# →") {
            let step = steps
                .last_mut()
                .filter(|step| step.expected.is_none() && !is_definition(&step.command))
                .unwrap_or_else(|| {
                    panic!("README.md line {number}: an answer that follows no command")
                });
            step.expected = Some(answer.trim().to_string());
            in_answer = true;
        } else if in_answer && trimmed.starts_with("#  ") {
            let step = steps.last_mut().expect("an answer belongs to a step");
            let expected = step.expected.as_mut().expect("continuing an answer");
            expected.push_str(trimmed.trim_start_matches('#').trim());
        } else if trimmed.starts_with('#') {
            in_answer = false;
        } else {
            in_answer = false;
            if trimmed.ends_with('\\') {
                pending = Some((*number, line.clone()));
            } else {
                steps.push(Step {
                    line: *number,
                    command: line.clone(),
                    expected: None,
                });
            }
        }
    }
    assert!(pending.is_none(), "the walk-through ends inside a command");
    for step in &steps {
        assert!(
            step.expected.is_some() || is_definition(&step.command),
            "README.md line {}: the command shows no answer (add a `# → …` line):\n{}",
            step.line,
            step.command
        );
    }
    steps
}

/// Whether `actual` matches `pattern`, in which `…` stands for any text (possibly none).
fn matches(pattern: &str, actual: &str) -> bool {
    let pieces: Vec<&str> = pattern.split('…').collect();
    let (first, rest) = pieces
        .split_first()
        .expect("split gives one piece at least");
    let Some(mut remaining) = actual.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for piece in middle {
        match remaining.find(piece) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    remaining.ends_with(last)
}

#[test]
fn answers_match_their_patterns() {
    assert!(matches("a…c", "abbbc"));
    assert!(matches("a…c", "ac"));
    assert!(matches("{\"cancelled\":[…]}", "{\"cancelled\":[]}"));
    assert!(matches("…x…", "yyxyy"));
    assert!(!matches("a…c", "abcd"));
    assert!(!matches("x 200", "x 202"));
    assert!(!matches("a…b…b", "ab"));
    assert!(!matches("abc", "abcd"));
}

/// The server binary as the Quick start runs it, on a free port and a fresh database; killed
/// when dropped, also when the test panics.
struct ChildServer {
    child: Child,
    address: String,
    stderr_path: PathBuf,
}

impl ChildServer {
    fn start(dir: &Path) -> Self {
        let stderr_path = dir.join("server.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create the stderr file");
        let mut command = common::child::baton();
        command
            .current_dir(repo_root())
            .args(["serve", "--config", "examples/baton.toml"])
            .args(["--listen", "127.0.0.1:0"])
            .arg("--database")
            .arg(format!("sqlite://{}", dir.join("baton.db").display()));
        // The caller's BATON_* variables would override the example's settings.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("BATON_") {
                command.env_remove(&name);
            }
        }
        let mut child = command
            .env("BATON_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start baton serve");
        let stdout = child.stdout.take().expect("the server's stdout");
        let url = common::child::listening_url(stdout);
        let mut server = Self {
            child,
            address: String::new(),
            stderr_path,
        };
        match url.as_deref().and_then(|url| url.strip_prefix("http://")) {
            Some(address) => server.address = address.to_string(),
            None => panic!(
                "the server did not print `baton listening on …` within {TIMEOUT:?}; its stderr:\n{}",
                server.stderr()
            ),
        }
        server
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished shell command.
struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `script` with bash, killing it past [`TIMEOUT`].
fn run_bash(script: &str, dir: &Path) -> Output {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        // Our own .curlrc (a time limit) instead of the user's; no proxy for loopback.
        .env("CURL_HOME", dir)
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bash") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("this command ran longer than {TIMEOUT:?}:\n{script}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

fn require_curl() {
    let found = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "curl is not installed: this test runs the README's curl walk-through, install curl \
         (e.g. `apt-get install curl`) to run it"
    );
}

#[test]
#[cfg_attr(
    not(baton_has_curl),
    ignore = "needs curl (e.g. `apt-get install curl`): the walk-through is curl commands"
)]
fn the_curl_walkthrough_gives_the_answers_the_readme_shows() {
    require_curl();
    let readme = read(&repo_root().join("README.md"));
    let steps = parse_walkthrough(&shell_block_after(&readme, WALKTHROUGH_HEADING));
    let checked: Vec<&Step> = steps.iter().filter(|s| s.expected.is_some()).collect();
    // The walk-through exists to show these; they must stay in it (and so stay true).
    for (what, needle) in [
        ("a refused message", "\"code\":\"session_busy\""),
        ("a queued message", "\"status\":\"queued\""),
    ] {
        assert!(
            checked
                .iter()
                .any(|s| s.expected.as_deref().is_some_and(|e| e.contains(needle))),
            "the walk-through no longer shows {what} ({needle})"
        );
    }
    assert!(
        checked.len() >= 10,
        "only {} checked commands found in the walk-through",
        checked.len()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".curlrc"), "max-time = 20\n").expect("write .curlrc");
    let server = ChildServer::start(dir.path());
    let mut definitions = String::new();
    for step in &steps {
        let command = step.command.replace(README_ADDRESS, &server.address);
        let Some(expected) = &step.expected else {
            definitions.push_str(&command);
            definitions.push('\n');
            continue;
        };
        let output = run_bash(&format!("{definitions}{command}"), dir.path());
        let actual = output.stdout.trim_end_matches('\n');
        assert!(
            output.status.success() && matches(expected, actual),
            "README.md line {}: the answer differs from the one shown.\ncommand:\n{}\n\
             shown:    {expected}\nanswered: {actual}\nexit: {}, stderr: {}\n\
             server stderr:\n{}",
            step.line,
            step.command,
            output.status,
            output.stderr,
            server.stderr()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Links

/// The documents whose links are checked: README.md, BENCHMARKS.md and docs/*.md.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("the docs folder")
        .map(|entry| entry.expect("a docs entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ holds no .md file");
    files.extend(docs);
    files
}

/// The markdown without fenced code blocks and inline code spans (links there are not links).
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            out.push('\n');
            continue;
        }
        if !fenced {
            let mut in_code = false;
            for c in line.chars() {
                if c == '`' {
                    in_code = !in_code;
                } else if !in_code {
                    out.push(c);
                }
            }
        }
        out.push('\n');
    }
    out
}

/// Link targets: inline `[text](target)` and reference definitions `[label]: target`.
fn link_targets(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut targets = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
        }
    }
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with('[')
            && let Some((_, target)) = line.split_once("]: ")
        {
            targets.push(target.split_whitespace().next().unwrap_or("").to_string());
        }
    }
    targets
}

/// GitHub's anchors for the headings of a markdown file.
fn anchors(markdown: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.push(anchor);
    }
    seen
}

#[test]
fn anchors_follow_github() {
    let doc = "# Baton API reference (v1)\n## `/clear`\n### Why an interaction fails\n## A\n## A\n```sh\n# not a heading\n```\n";
    assert_eq!(
        anchors(doc),
        [
            "baton-api-reference-v1",
            "clear",
            "why-an-interaction-fails",
            "a",
            "a-1"
        ]
    );
}

#[test]
fn relative_links_resolve_inside_the_repository() {
    let root = repo_root().canonicalize().expect("the repository root");
    let mut broken = Vec::new();
    let mut checked = 0;
    for document in documents() {
        let text = read(&document);
        let name = document.strip_prefix(&root).unwrap_or(&document).display();
        if text.contains("../shared") {
            broken.push(format!(
                "{name}: mentions ../shared, which users of this repository do not have"
            ));
        }
        for target in link_targets(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                document.clone()
            } else {
                document.parent().expect("a folder").join(path)
            };
            let Ok(file) = file.canonicalize() else {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            };
            if !file.starts_with(&root) {
                broken.push(format!("{name}: {target}: outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_markdown = file.extension().is_some_and(|ext| ext == "md");
                if !is_markdown || !anchors(&read(&file)).iter().any(|a| a == anchor) {
                    broken.push(format!("{name}: {target}: no heading with that anchor"));
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no relative link found: is the link parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// What the README states of the build, the tests, the licence and the CLI

/// The text of the section under `heading` (up to the next heading of the same level or above).
fn section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no heading {heading:?}"));
    let level = heading.split(' ').next().unwrap_or("##").len();
    let body = &markdown[start + heading.len() + 2..];
    let end = body
        .match_indices('\n')
        .map(|(at, _)| at + 1)
        .find(|&at| {
            let hashes = body[at..].chars().take_while(|c| *c == '#').count();
            (1..=level).contains(&hashes) && body[at + hashes..].starts_with(' ')
        })
        .unwrap_or(body.len());
    &body[..end]
}

/// The lines of the first block fenced with `fence` (e.g. "```text") after the line holding
/// `marker`.
fn block_after(markdown: &str, marker: &str, fence: &str) -> Vec<String> {
    let mut lines = markdown.lines().skip_while(|l| !l.contains(marker));
    assert!(lines.next().is_some(), "no line with {marker:?}");
    lines
        .skip_while(|l| l.trim() != fence)
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .map(str::to_string)
        .collect()
}

/// The `rust-version` of Cargo.toml.
fn rust_version() -> String {
    read(&repo_root().join("Cargo.toml"))
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("Cargo.toml has a rust-version")
}

#[test]
fn key_new_prints_what_the_readme_shows() {
    let readme = read(&repo_root().join("README.md"));
    let shown = block_after(&readme, "baton key new --tenant acme", "```text");
    assert!(!shown.is_empty(), "no ```text block after `baton key new`");
    let id = shown
        .iter()
        .find_map(|l| l.strip_prefix("id = "))
        .map(|v| v.trim_matches('"').to_string())
        .expect("the block shows an id");
    let out = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["key", "new", "--tenant", "acme", "--id", &id])
        .env("BATON_LOG", "warn")
        .output()
        .expect("run baton key new");
    assert!(out.status.success(), "{out:?}");
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        printed.len(),
        shown.len(),
        "{printed:#?}\nvs the README's\n{shown:#?}"
    );
    for (printed, shown) in printed.iter().zip(&shown) {
        // The key and its hash differ every time: their shape must not.
        let random = ["bk_", "sha256 = \""]
            .into_iter()
            .any(|prefix| shown.starts_with(prefix));
        if random {
            let prefix = &shown[..shown.find(['_', '"']).expect("a prefix") + 1];
            assert!(printed.starts_with(prefix), "{printed:?} vs {shown:?}");
            assert_eq!(printed.len(), shown.len(), "{printed:?} vs {shown:?}");
        } else {
            assert_eq!(printed, shown);
        }
    }
}

#[test]
fn the_tests_section_names_what_each_skipped_suite_needs() {
    let readme = read(&repo_root().join("README.md"));
    let tests = section(&readme, "## Tests");
    for needed in [
        "`chromium`",
        "`chromium-driver`",
        "`curl`",
        "`BATON_TEST_POSTGRES`",
        "`BATON_TEST_POSTGRES_TLS_ROOT`",
    ] {
        assert!(
            tests.contains(needed),
            "the Tests section does not name {needed}"
        );
    }
    // Every variable build.rs gates a suite on.
    let build = read(&repo_root().join("build.rs"));
    for variable in build
        .split("rerun-if-env-changed=")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|name| *name != "PATH")
    {
        assert!(
            tests.contains(variable),
            "the Tests section does not name {variable}"
        );
    }
    let version = rust_version();
    let minimum = format!("{version} or newer");
    assert!(
        tests.contains(&minimum),
        "the Tests section does not say Rust {minimum}"
    );
    assert!(
        section(&readme, "## Quick start").contains(&format!("Rust {minimum}")),
        "the Quick start does not say Rust {minimum}"
    );
}

#[test]
fn every_cargo_install_uses_the_lock_file() {
    let mut seen = 0;
    for document in documents() {
        // Installing baton itself (other tools, such as flamegraph, are not ours to lock).
        for line in read(&document)
            .lines()
            .filter(|l| l.contains("cargo install --path"))
        {
            seen += 1;
            assert!(line.contains("--locked"), "{}: {line}", document.display());
        }
    }
    assert!(seen > 0, "the README says how to install baton");
}

#[test]
fn the_licence_cargo_toml_names_is_in_the_repository() {
    let cargo = read(&repo_root().join("Cargo.toml"));
    assert!(
        cargo.lines().any(|l| l == "license = \"MIT\""),
        "Cargo.toml names MIT"
    );
    let licence = read(&repo_root().join("LICENSE"));
    assert!(licence.starts_with("MIT License\n"), "{licence}");
    assert!(
        licence.contains("Copyright (c) The Baton authors"),
        "{licence}"
    );
}

#[test]
fn benchmarks_describe_their_peer_and_cite_no_tracker_numbers() {
    let text = read(&repo_root().join("BENCHMARKS.md"));
    let peer = section(&text, "## The peer");
    for words in ["seed-py", "Python", "FastAPI", "server.py", "--peer"] {
        assert!(
            peer.contains(words),
            "the peer's description lacks {words:?}"
        );
    }
    for (number, line) in text.lines().enumerate() {
        let lower = line.to_lowercase();
        let tracker = lower.contains("issue")
            || line
                .match_indices('#')
                .any(|(at, _)| line[at + 1..].starts_with(|c: char| c.is_ascii_digit()));
        assert!(!tracker, "BENCHMARKS.md:{}: {line}", number + 1);
    }
}

#[test]
fn the_docs_say_json_field_order_is_not_significant_and_tokens_create_the_session() {
    let flat = |path: &str| {
        let text = read(&repo_root().join(path));
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let readme = flat("README.md");
    assert!(readme.contains("the order of a JSON object's fields is not significant"));
    assert!(readme.contains("Minting a token creates the session if it does not exist yet"));
    assert!(flat("docs/api.md").contains("**Field order is not significant.**"));
}

/// The one-line summary the README gives for `cargo test` (and `.ci/run` ends with) counts
/// what ran, failed and was skipped, with the reasons, from cargo's own output.
#[test]
fn the_test_summary_counts_ran_failed_and_skipped_with_reasons() {
    let readme = read(&repo_root().join("README.md"));
    let command = "cargo test 2>&1 | tee /dev/stderr | awk -f .ci/summary.awk";
    assert!(readme.contains(command), "the README gives `{command}`");
    let ci = read(&repo_root().join(".ci/run"));
    assert!(
        ci.contains("awk -f .ci/summary.awk"),
        ".ci/run ends with it"
    );
    let sample = "test a ... ok\n\
                  test b ... ignored, needs PostgreSQL\n\
                  test c ... ignored, needs PostgreSQL\n\
                  test d ... ignored, needs chromium\n\
                  test result: ok. 4 passed; 1 failed; 3 ignored; 0 measured; 0 filtered out\n\
                  test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n";
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("log"), sample).expect("log");
    let out = std::process::Command::new("awk")
        .arg("-f")
        .arg(repo_root().join(".ci/summary.awk"))
        .arg(dir.path().join("log"))
        .output()
        .expect("awk runs");
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("4 passed, 1 failed, 3 skipped (")
            && line.contains("2: needs PostgreSQL")
            && line.contains("1: needs chromium"),
        "{line}"
    );
}
