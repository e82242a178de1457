//! The web console in real headless Chromium (Debian's `chromium` and `chromium-driver`;
//! `.ci/run` installs them), driven only through its `data-testid` hooks: a reply streaming
//! word by word, two pages that stay identical, a restart mid-response, answering a waiting
//! interaction, read tokens and tenants, `baton.js`'s resume and ref matching, the id
//! input's validation, a missing session offered rather than created, Operations for admins
//! only, readable times, a readable transcript, a narrow window, and no browser left behind.
//! Screenshots go to the test's output folder (`target/tmp/console`).

mod common;

use std::time::Duration;

use common::access::{ACME_KEY, ADMIN_KEY, BETA_KEY, config as access_config, mint};
use common::browser::{Browser, Driver};
use common::{TIMEOUT, TestServer};
use serde_json::{Value, json};

const APPROVAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/approval_agent.py");

fn console_config() -> String {
    format!(
        r#"
queue_limit = 100

[agents.default]
kind = "echo"

[agents.slow]
kind = "echo"
delay_ms = 60

[agents.fast]
kind = "echo"
delay_ms = 5

[agents.careful]
kind = "command"
program = "python3"
args = ["{APPROVAL}"]
"#
    )
}

/// A `command` agent that echoes its message word by word, and before the fifth word waits
/// until the file named by its argument exists.
const GATED_AGENT: &str = r#"
import json, os, sys, time
words = json.load(sys.stdin)["interaction"]["content"].split(" ")
for n, word in enumerate(words):
    if n == 4:
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.02)
    text = word if n == len(words) - 1 else word + " "
    print(json.dumps({"type": "delta", "text": text}), flush=True)
print(json.dumps({"type": "result"}), flush=True)
"#;

/// A `command` agent that reports a tool it used (progress), then asks the client to run one
/// (an OpenAI-style tool call), and once answered says so.
const TOOL_AGENT: &str = r#"
import json, sys
request = json.load(sys.stdin)
def emit(**output):
    print(json.dumps(output), flush=True)
if not request.get("answers"):
    emit(type="progress", data={"tool": "search", "input": {"query": "weather in Paris"}})
    emit(type="delta", text="Let me check. ")
    emit(type="ask", data={"tool_calls": [{"id": "call_1", "name": "get_location",
                                           "arguments": json.dumps({"precision": "city"})}]})
else:
    emit(type="delta", text="Sunny in " + str(request["answers"][-1]["answer"]["tool_outputs"][0]["output"]) + ".")
    emit(type="result")
"#;

/// Where the screenshots go (`target/tmp/console`), for a reviewer to look at.
fn output(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("console")
        .join(name)
}

async fn open_session(browser: &Browser, server: &TestServer, id: &str) {
    browser
        .goto(&format!("{}/console/#/s/{id}", server.url))
        .await;
    browser.until_connection("live").await;
}

async fn send(browser: &Browser, text: &str, policy: &str) {
    browser.type_into("[data-testid=composer]", text).await;
    browser
        .script(
            "document.querySelector('[data-testid=policy]').value = arguments[0];",
            json!([policy]),
        )
        .await;
    browser.click("[data-testid=send]").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_reply_grows_word_by_word_and_completes() {
    let server = TestServer::start(&console_config()).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    // The root leads to the console; a new session with the slow agent.
    browser.goto(&format!("{}/", server.url)).await;
    browser.find("[data-testid=session-list]").await;
    browser
        .type_into("[data-testid=new-session] input", "growing")
        .await;
    browser
        .script(
            "document.querySelector('[data-testid=agent-select]').value = 'slow';",
            json!([]),
        )
        .await;
    browser.click("[data-testid=new-session] button").await;
    browser.until_connection("live").await;
    let words: Vec<String> = (1..=12).map(|i| format!("word{i}")).collect();
    send(&browser, &words.join(" "), "reject").await;
    browser
        .until(
            "it runs",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'running';",
        )
        .await;
    // A second message with reject while it runs: the error shows inline, with its code.
    send(&browser, "too early", "reject").await;
    let shown = browser
        .until(
            "session_busy shown",
            "const e = document.querySelector('[data-testid=error]').textContent;\
             return e.includes('session_busy') && e;",
        )
        .await;
    // The code once, with the server's message.
    let shown = shown.as_str().expect("text");
    assert_eq!(shown.matches("session_busy").count(), 1, "{shown}");
    assert!(shown.contains("the session is busy"), "{shown}");
    // The response is seen growing: several distinct lengths before the end.
    let mut lengths = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let shown = browser.transcript().await;
        if let Some(last) = shown.as_array().and_then(|a| a.last()) {
            let length = last["response"].as_str().unwrap_or("").len();
            if lengths.last() != Some(&length) {
                lengths.push(length);
            }
            if last["status"] == "completed" {
                assert_eq!(last["response"], words.join(" "));
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never completed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        lengths.len() >= 4,
        "the response grew in steps: {lengths:?}"
    );
    browser.screenshot(&output("session-view.png")).await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn two_pages_on_one_session_stay_identical() {
    let server = TestServer::start(&console_config()).await;
    server
        .put("/v1/sessions/twin", &json!({"agent": "slow"}))
        .await;
    let driver = Driver::start().await;
    let one = driver.browser().await;
    let two = driver.browser().await;
    open_session(&one, &server, "twin").await;
    open_session(&two, &server, "twin").await;
    send(
        &one,
        "first message here with enough words to be seen running for a while",
        "reject",
    )
    .await;
    one.until(
        "it runs",
        "return [...document.querySelectorAll('[data-testid=interaction]')]\
           .some(e => e.dataset.status === 'running');",
    )
    .await;
    one.click("[data-testid=cancel]").await;
    send(
        &two,
        "second message with enough words to be seen running for a while too",
        "reject",
    )
    .await;
    two.script("window.confirm = () => true;", json!([])).await;
    two.until(
        "the second runs",
        "return [...document.querySelectorAll('[data-testid=interaction]')]\
           .some(e => e.dataset.status === 'running');",
    )
    .await;
    two.click("[data-testid=clear]").await;
    // The clear reaches both pages: their transcripts empty.
    for page in [&one, &two] {
        page.until(
            "the transcript is cleared",
            "const log = [...document.querySelectorAll('[data-testid=event-log] summary')];\
             return log.some(s => s.textContent.includes('session.cleared'))\
               || document.querySelector('[data-testid=error]').textContent;",
        )
        .await;
    }
    let error = two.text_of("error").await;
    assert_eq!(error, "", "the clear was refused");
    for (page, text) in [(&one, "a b c"), (&two, "d e f"), (&one, "g h i")] {
        page.until(
            "the composer is empty",
            "return document.querySelector('[data-testid=composer]').value === '';",
        )
        .await;
        send(page, text, "enqueue").await;
    }
    // Both pages converge on what the server stored.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let stored = server.get("/v1/sessions/twin/interactions?limit=100").await;
        let mut stored: Vec<Value> = stored.body["interactions"]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| json!({"id": i["id"], "status": i["status"], "response": i["response"]}))
            .collect();
        stored.reverse();
        let done = stored.len() == 3 && stored.iter().all(|i| i["status"] == "completed");
        let (a, b) = (one.transcript().await, two.transcript().await);
        if done && a == json!(stored) && b == json!(stored) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pages differ: {a}\n{b}\nstored {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_seq = server.get("/v1/sessions/twin").await.body["last_seq"]
        .as_i64()
        .expect("last_seq");
    one.until(
        "the log is complete",
        &format!(
            "const s = [...document.querySelectorAll('[data-testid=event-log] summary')];\
             return s.length && s[s.length - 1].textContent.startsWith('#{last_seq} ');"
        ),
    )
    .await;
    two.until(
        "the log is complete",
        &format!(
            "const s = [...document.querySelectorAll('[data-testid=event-log] summary')];\
             return s.length && s[s.length - 1].textContent.startsWith('#{last_seq} ');"
        ),
    )
    .await;
    assert_eq!(one.logged_seqs().await, two.logged_seqs().await);
    one.close().await;
    two.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_restart_mid_response_reconnects_without_duplicates_or_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("baton.db");
    // The reply stops after four words until the test opens the gate, so the restart always
    // finds it running, however loaded the machine.
    let gate = dir.path().join("gate");
    let agent = dir.path().join("gated_agent.py");
    std::fs::write(&agent, GATED_AGENT).expect("write the agent");
    let mut config = baton::config::Config::from_toml(&format!(
        "{}\n[agents.gated]\nkind = \"command\"\nprogram = \"python3\"\nargs = [{:?}, {:?}]\n",
        console_config(),
        agent.display().to_string(),
        gate.display().to_string(),
    ))
    .expect("config");
    config.listen = "127.0.0.1:0".into();
    config.database = format!("sqlite://{}", db.display());
    let handle = baton::server::ServerHandle::start(config.clone())
        .await
        .expect("server");
    let url = handle.url();
    let http = reqwest::Client::new();
    http.put(format!("{url}/v1/sessions/restart"))
        .json(&json!({"agent": "gated"}))
        .send()
        .await
        .expect("put");
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{url}/console/#/s/restart")).await;
    browser.until_connection("live").await;
    send(
        &browser,
        "one two three four five six seven eight nine ten",
        "reject",
    )
    .await;
    browser
        .until(
            "four words shown, the rest held at the gate",
            "const r = document.querySelector('[data-testid=response]');\
             return r && r.textContent === 'one two three four ';",
        )
        .await;
    // Restart on the same address.
    config.listen = handle.addr.to_string();
    tokio::time::timeout(TIMEOUT, handle.stop())
        .await
        .expect("stops")
        .expect("stops cleanly");
    browser.until_connection("reconnecting").await;
    let handle = baton::server::ServerHandle::start(config)
        .await
        .expect("restart");
    std::fs::write(&gate, "open").expect("open the gate");
    browser.until_connection("live").await;
    // The next message completes; the page then matches the store exactly.
    send(&browser, "after the restart", "enqueue").await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let stored: Value = http
            .get(format!("{url}/v1/sessions/restart/interactions"))
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        let mut stored: Vec<Value> = stored["interactions"]
            .as_array()
            .expect("list")
            .iter()
            .map(|i| json!({"id": i["id"], "status": i["status"], "response": i["response"]}))
            .collect();
        stored.reverse();
        let shown = browser.transcript().await;
        if stored.len() == 2 && stored[1]["status"] == "completed" && shown == json!(stored) {
            assert_eq!(
                stored[0]["status"], "cancelled",
                "shutdown cancelled the first"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page {shown} is not the store {stored:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seqs = browser.logged_seqs().await;
    let mut sorted = seqs.clone();
    sorted.dedup();
    assert_eq!(seqs, sorted, "no event twice");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap: {seqs:?}"
    );
    browser.close().await;
    tokio::time::timeout(TIMEOUT, handle.stop())
        .await
        .expect("stops")
        .expect("stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_waiting_interaction_is_answered_from_the_page() {
    let server = TestServer::start(&console_config()).await;
    server
        .put("/v1/sessions/ask", &json!({"agent": "careful"}))
        .await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    open_session(&browser, &server, "ask").await;
    send(&browser, "delete the backups", "reject").await;
    browser.find("[data-testid=answer-form]").await;
    let form = browser.text_of("answer-form").await;
    assert!(form.contains("May I delete the backups?"), "{form}");
    let options = browser
        .script(
            "return [...document.querySelectorAll('[data-testid=answer-form] button')]\
               .map(b => b.textContent);",
            json!([]),
        )
        .await;
    for option in ["yes", "no"] {
        assert!(
            options
                .as_array()
                .expect("buttons")
                .iter()
                .any(|b| b == option),
            "an option button {option}: {options}"
        );
    }
    assert!(
        !form.contains("{\""),
        "the request as text, not JSON: {form}"
    );
    browser
        .type_into("[data-testid=answer-form] input", "yes")
        .await;
    // The first button is the submit button, as before the options were shown.
    browser.click("[data-testid=answer-form] button").await;
    let done = browser
        .until(
            "completed",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'completed' &&\
               i.querySelector('[data-testid=response]').textContent;",
        )
        .await;
    assert_eq!(done, "Plan: delete the backups. Approved: done.");
    assert_eq!(
        browser
            .script(
                "return !!document.querySelector('[data-testid=answer-form]');",
                json!([])
            )
            .await,
        json!(false),
        "the form is gone once answered"
    );
    browser.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn read_tokens_cannot_write_and_other_tenants_see_nothing() {
    let server = TestServer::start_with_config(access_config()).await;
    let acme = format!("Bearer {ACME_KEY}");
    server
        .request(
            reqwest::Method::POST,
            "/v1/sessions/private/messages?wait=10",
            Some(&json!({"content": "secret words"})),
            &[("authorization", &acme)],
        )
        .await;
    let read = mint(&server, "private", "read", 600).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/console/", server.url)).await;
    browser
        .type_into("[data-testid=sign-in] input", &read)
        .await;
    browser.click("[data-testid=sign-in] button").await;
    // A token opens its session directly, read-only.
    browser
        .until(
            "the transcript",
            "const r = document.querySelector('[data-testid=response]');\
             return r && r.textContent === 'secret words';",
        )
        .await;
    let disabled = browser
        .script(
            "return ['send', 'cancel', 'clear', 'composer', 'policy']\
               .map(t => document.querySelector(`[data-testid=${t}]`).disabled);",
            json!([]),
        )
        .await;
    assert_eq!(disabled, json!([true, true, true, true, true]));
    browser.close().await;

    // Another tenant's key: the session is not in its list, and opening it is not found.
    let other = driver.browser().await;
    other.goto(&format!("{}/console/", server.url)).await;
    other
        .type_into("[data-testid=sign-in] input", BETA_KEY)
        .await;
    other.click("[data-testid=sign-in] button").await;
    other.find("[data-testid=session-list]").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let items = other
        .script(
            "return [...document.querySelectorAll('[data-testid=session-item]')].map(e => e.textContent);",
            json!([]),
        )
        .await;
    assert!(!items.to_string().contains("private"), "{items}");
    other
        .goto(&format!("{}/console/#/s/private", server.url))
        .await;
    other
        .until(
            "no such session, for them",
            "return !!document.querySelector('[data-testid=no-such-session]');",
        )
        .await;
    let page = other
        .script("return document.body.textContent;", json!([]))
        .await;
    assert!(!page.to_string().contains("secret words"), "{page}");
    let theirs = server
        .request(
            reqwest::Method::GET,
            "/v1/sessions/private",
            None,
            &[("authorization", &format!("Bearer {BETA_KEY}"))],
        )
        .await;
    assert_eq!(theirs.status, 404, "nothing created for them");
    other.close().await;
    server.stop().await;
}

/// The transcript reads as a conversation: who said what (you / agent), the tools the agent
/// used and the calls it asks for shown as names and values, never as raw JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn the_transcript_reads_as_a_conversation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = dir.path().join("tool_agent.py");
    std::fs::write(&agent, TOOL_AGENT).expect("write the agent");
    let server = TestServer::start(&format!(
        "{}\n[agents.tools]\nkind = \"command\"\nprogram = \"python3\"\nargs = [{:?}]\n",
        console_config(),
        agent.display().to_string(),
    ))
    .await;
    server
        .put("/v1/sessions/tools", &json!({"agent": "tools"}))
        .await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    open_session(&browser, &server, "tools").await;
    send(&browser, "what is the weather here?", "reject").await;
    browser.find("[data-testid=answer-form]").await;
    let text = "return document.querySelector(arguments[0]).innerText;";
    let waiting = browser
        .until(
            "the call shown",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'waiting' && i.innerText.includes('get_location') && i.innerText;",
        )
        .await;
    let waiting = waiting.as_str().expect("text");
    let lines: Vec<&str> = waiting.lines().map(str::trim).collect();
    assert!(lines.contains(&"You"), "a label for the user: {waiting}");
    assert!(
        lines.iter().any(|l| l.starts_with("Agent")),
        "a label for the agent: {waiting}"
    );
    for shown in [
        "what is the weather here?",
        "search",
        "weather in Paris",
        "get_location",
        "precision",
        "city",
    ] {
        assert!(waiting.contains(shown), "{shown} in {waiting}");
    }
    let form = browser
        .script(text, json!(["[data-testid=answer-form]"]))
        .await;
    let form = form.as_str().expect("text");
    assert!(
        form.contains("get_location") && form.contains("city"),
        "{form}"
    );
    for raw in [&waiting, &form] {
        assert!(
            !raw.contains("{\"") && !raw.contains("\":"),
            "raw JSON shown: {raw}"
        );
    }
    browser.screenshot(&output("tool-call.png")).await;
    browser
        .type_into("[data-testid=answer-form] input", "Paris")
        .await;
    browser.click("[data-testid=answer-form] button").await;
    let done = browser
        .until(
            "completed",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'completed' && i.innerText;",
        )
        .await;
    let done = done.as_str().expect("text");
    assert!(done.contains("Let me check. Sunny in Paris."), "{done}");
    assert!(
        done.contains("get_location") && done.contains("Paris"),
        "the answered call stays shown: {done}"
    );
    assert!(!done.contains("{\""), "raw JSON shown: {done}");
    browser.close().await;
    server.stop().await;
}

/// Times read as times: local, relative when recent, with the exact RFC 3339 value in a
/// `<time datetime>` and its `title`; no raw ISO string in the list or the transcript.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn times_are_shown_for_people_with_the_exact_time_kept() {
    let server = TestServer::start(&console_config()).await;
    let session = server.put("/v1/sessions/timed", &json!({})).await.body;
    let done = server
        .post(
            "/v1/sessions/timed/messages?wait=10",
            &json!({"content": "hello there"}),
        )
        .await
        .body;
    assert_eq!(done["status"], "completed");
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let iso = "/\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d/";
    let read = "const root = document.querySelector(arguments[0]);\
                if (!root) return null;\
                return { text: root.innerText, times: [...root.querySelectorAll('time')]\
                  .map(t => ({ datetime: t.dateTime, title: t.title, text: t.textContent })) };";
    browser.goto(&format!("{}/console/", server.url)).await;
    let item = browser
        .until(
            "the item",
            "return [...document.querySelectorAll('[data-testid=session-item]')]\
               .some(e => e.textContent.includes('timed'));",
        )
        .await;
    assert_eq!(item, json!(true));
    let list = browser
        .script(read, json!(["[data-testid=session-list]"]))
        .await;
    let open = "[data-testid=interaction]";
    open_session(&browser, &server, "timed").await;
    browser
        .until(
            "completed",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'completed';",
        )
        .await;
    let shown = browser.script(read, json!([open])).await;
    for (what, shown, wanted) in [
        ("session list", &list, &session["created_at"]),
        ("interaction", &shown, &done["created_at"]),
    ] {
        let text = shown["text"].as_str().expect("text");
        let raw = browser
            .script(&format!("return {iso}.test(arguments[0]);"), json!([text]))
            .await;
        assert_eq!(raw, json!(false), "{what} shows a raw time: {text}");
        let times = shown["times"].as_array().expect("times");
        let time = times
            .iter()
            .find(|t| t["datetime"] == *wanted)
            .unwrap_or_else(|| panic!("{what}: no <time datetime={wanted}> in {shown}"));
        assert!(
            time["title"]
                .as_str()
                .is_some_and(|t| t.contains(wanted.as_str().expect("iso"))),
            "{what}: {time}"
        );
        assert!(
            !time["text"].as_str().unwrap_or_default().is_empty(),
            "{what}: {time}"
        );
    }
    // A moment ago: relative.
    let created = shown["times"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["datetime"] == done["created_at"]))
        .expect("time")["text"]
        .clone();
    assert!(
        created
            .as_str()
            .is_some_and(|t| t.contains("now") || t.contains("ago")),
        "{created}"
    );
    browser.close().await;
    server.stop().await;
}

/// At 400 px wide the session view's two columns stack, and nothing is wider than the
/// window; at 1,280 px they stand side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_narrow_window_stacks_the_columns() {
    let server = TestServer::start(&console_config()).await;
    server
        .post(
            "/v1/sessions/narrow/messages?wait=10",
            &json!({"content": "a message long enough to wrap over a few lines in a narrow window"}),
        )
        .await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    open_session(&browser, &server, "narrow").await;
    let boxes = "const box = (t) => document.querySelector(`[data-testid=${t}]`).getBoundingClientRect();\
                 const a = box('transcript'), b = box('context-editor');\
                 return { width: window.innerWidth, overflow: document.documentElement.scrollWidth > window.innerWidth,\
                          side: b.left >= a.right, stacked: b.top >= a.bottom && b.left < a.right, a: [a.left, a.right, a.top, a.bottom],\
                          b: [b.left, b.right, b.top, b.bottom] };";
    let wide = browser.script(boxes, json!([])).await;
    assert_eq!(wide["side"], json!(true), "{wide}");
    browser.set_window_size(400, 900).await;
    let narrow = browser
        .until(
            "the window is 400 px wide",
            &format!("const r = (() => {{ {boxes} }})(); return r.width === 400 && r;"),
        )
        .await;
    assert_eq!(narrow["stacked"], json!(true), "{narrow}");
    assert_eq!(narrow["overflow"], json!(false), "{narrow}");
    browser.screenshot(&output("session-view-400px.png")).await;
    browser.close().await;
    server.stop().await;
}

/// The Operations link shows only to those who can see the operations (`/metrics`): an admin
/// key, or anyone with access control off; never a tenant key or a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn operations_are_offered_to_admins_only() {
    let server = TestServer::start_with_config(access_config()).await;
    let token = mint(&server, "mine", "write", 600).await;
    let driver = Driver::start().await;
    let shown = "const e = document.querySelector('[data-testid=ops-link]');\
                 return !!e && e.getClientRects().length > 0;";
    for (credential, role, admin) in [
        (ACME_KEY, "tenant key", false),
        (token.as_str(), "token", false),
        (ADMIN_KEY, "admin key", true),
    ] {
        let browser = driver.browser().await;
        browser.goto(&format!("{}/console/", server.url)).await;
        browser
            .type_into("[data-testid=sign-in] input", credential)
            .await;
        browser.click("[data-testid=sign-in] button").await;
        browser
            .until(
                "who is signed in",
                &format!(
                    "const e = document.querySelector('[data-testid=who]');\
                     return e && e.textContent.includes('{role}');"
                ),
            )
            .await;
        assert_eq!(
            browser.script(shown, json!([])).await,
            json!(admin),
            "{role}"
        );
        browser.close().await;
    }
    server.stop().await;
    // Access control off: the operations are open.
    let server = TestServer::start(&console_config()).await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/console/", server.url)).await;
    browser.until("the link shown", shown).await;
    browser.close().await;
    server.stop().await;
}

/// A link to a session that does not exist (a typo) creates nothing: the page says so and
/// offers to create it, with an agent; the session view then names its agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_missing_session_is_offered_not_created() {
    let server = TestServer::start(&console_config()).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser
        .goto(&format!("{}/console/#/s/tpyo", server.url))
        .await;
    let notice = browser.until_text("no-such-session").await;
    assert!(
        notice.to_lowercase().contains("no such session") && notice.contains("tpyo"),
        "{notice}"
    );
    // Nothing was created, nor is a stream open that would create it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.get("/v1/sessions/tpyo").await.status, 404);
    assert_eq!(
        browser
            .script(
                "return !!document.querySelector('[data-testid=connection-state]');",
                json!([])
            )
            .await,
        json!(false)
    );
    // Created when asked, with the agent chosen.
    browser
        .script(
            "document.querySelector('[data-testid=no-such-session] [data-testid=agent-select]').value = 'slow';",
            json!([]),
        )
        .await;
    browser.click("[data-testid=create-session]").await;
    browser.until_connection("live").await;
    let created = server.get("/v1/sessions/tpyo").await;
    assert_eq!(created.status, 200);
    assert_eq!(created.body["agent"], "slow");
    let agent = browser.until_text("session-agent").await;
    assert_eq!(agent, "slow");
    browser.close().await;
    server.stop().await;
}

/// The new session's id input checks what the API accepts (1–128 of `[A-Za-z0-9._:-]`):
/// its `pattern` compiles as Chromium compiles it (the `v` flag), so validation is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn the_new_session_id_is_validated_as_the_api_validates_it() {
    let server = TestServer::start(&console_config()).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/console/", server.url)).await;
    browser.find("[data-testid=new-session] input").await;
    let long = "a".repeat(128);
    let checked = browser
        .script(
            "const input = document.querySelector('[data-testid=new-session] input');\
             let compiles;\
             try { new RegExp(input.pattern, 'v'); compiles = true; } catch (e) { compiles = String(e); }\
             const mismatch = (value) => { input.value = value; return input.validity.patternMismatch; };\
             return { compiles, good: arguments[0].map(mismatch), bad: arguments[1].map(mismatch) };",
            json!([
                ["a", "A-z.0_9:x", "a-b", "-", ".", ":", &long],
                ["bad id", "a/b", "a%3Ab", "é", "a\\b", "[x]", &format!("{long}a")]
            ]),
        )
        .await;
    assert_eq!(checked["compiles"], json!(true), "{checked}");
    assert_eq!(
        checked["good"],
        json!(vec![false; 7]),
        "accepted ids: {checked}"
    );
    assert_eq!(
        checked["bad"],
        json!(vec![true; 7]),
        "refused ids: {checked}"
    );
    // A refused id is not submitted: nothing is created.
    browser
        .type_into("[data-testid=new-session] input", "bad id")
        .await;
    browser.click("[data-testid=new-session] button").await;
    let listed = server.get("/v1/sessions").await;
    assert_eq!(listed.body["sessions"], json!([]), "{}", listed.body);
    let hash = browser.script("return location.hash;", json!([])).await;
    assert!(
        !hash.as_str().unwrap_or_default().starts_with("#/s/"),
        "a refused id opens nothing: {hash}"
    );
    browser.close().await;
    server.stop().await;
}

/// A browser test that fails must not leave a headless Chromium behind: dropping the driver
/// (as a panic does) stops chromedriver and every browser it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_dropped_driver_leaves_no_browser_behind() {
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto("about:blank").await;
    let started = common::browser::descendants(driver.pid());
    assert!(
        !started.is_empty(),
        "chromedriver started no browser process"
    );
    // Neither closed nor awaited: what unwinding from a failed assertion does.
    drop(browser);
    drop(driver);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let alive: Vec<u32> = started
            .iter()
            .copied()
            .filter(|&pid| common::browser::is_running(pid))
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left running after the driver was dropped: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `baton.js` itself, in the browser: a stream resumes with `after=` and hands each event out
/// once; replies are matched to their ops by `ref`, out of order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn baton_js_resumes_and_matches_replies_by_ref() {
    let server = TestServer::start(&console_config()).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/console/", server.url)).await;
    browser.find("[data-testid=session-list]").await;
    // The module, as a page loads it (imported: the console's policy allows no inline script).
    browser
        .async_script(
            "const done = arguments[arguments.length - 1];\
             import('/console/baton.js').then((b) => { window.batonjs = b; done(true); },\
                                              (e) => done(String(e)));",
            json!([]),
        )
        .await;
    browser
        .until("baton.js loaded", "return !!window.batonjs;")
        .await;
    let result = browser
        .async_script(
            r#"
const done = arguments[arguments.length - 1];
(async () => {
  const { Baton, backoff } = window.batonjs;
  const sockets = [];
  class FakeSocket {
    constructor(url) { this.url = url; this.readyState = 1; this.sent = []; sockets.push(this);
      setTimeout(() => this.onmessage({ data: JSON.stringify({ kind: 'hello',
        session: { id: 's', last_seq: sockets.length === 1 ? 2 : 5, context: {} } }) }), 0); }
    send(text) { this.sent.push(JSON.parse(text)); }
    close() {}
    push(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
  }
  const baton = new Baton({ base: 'http://example.test', WebSocket: FakeSocket });
  const stream = baton.open('s', { after: 0 });
  const seen = [];
  stream.onevent = (e) => seen.push(e.seq);
  await new Promise((r) => setTimeout(r, 10));
  const first = sockets[0];
  first.push({ kind: 'event', seq: 1, type: 'x', data: {} });
  first.push({ kind: 'event', seq: 2, type: 'x', data: {} });
  // Two ops, replied to in the reverse order.
  const a = stream.send('a');
  const b = stream.cancel();
  const [refA, refB] = first.sent.map((op) => op.ref);
  first.push({ kind: 'reply', ref: refB, ok: true, data: { cancelled: [] } });
  first.push({ kind: 'reply', ref: refA, ok: false, error: { code: 'session_busy', message: 'busy' } });
  const gotB = await b;
  let codeA = null;
  try { await a; } catch (e) { codeA = e.code; }
  // An op in flight when the socket drops is rejected; the stream resumes after seq 2.
  const lost = stream.ping();
  first.onclose({ code: 1006, reason: '' });
  let lostCode = null;
  try { await lost; } catch (e) { lostCode = e.code; }
  const state = stream.state;
  // An op made while reconnecting is held, then sent on the new connection.
  const held = stream.ping();
  await new Promise((r) => setTimeout(r, 400));
  const second = sockets[1];
  second.push({ kind: 'event', seq: 2, type: 'x', data: {} });  // already seen: skipped
  second.push({ kind: 'event', seq: 3, type: 'x', data: {} });
  second.push({ kind: 'event', seq: 4, type: 'x', data: {} });
  second.push({ kind: 'event', seq: 5, type: 'x', data: {} });
  const heldOp = second.sent.find((op) => op.op === 'ping');
  second.push({ kind: 'pong', ref: heldOp ? heldOp.ref : -1 });
  const heldReply = await Promise.race([held.then(() => 'sent'), new Promise((r) => setTimeout(() => r('held'), 200))]);
  done({ heldReply, seen, gotB, codeA, lostCode, state, resumeUrl: second.url, live: stream.state,
         backoffs: [0, 1, 2, 10].map(backoff) });
})().catch((e) => done({ error: String(e) }));
"#,
            json!([]),
        )
        .await;
    assert!(result.get("error").is_none(), "{result}");
    assert_eq!(result["seen"], json!([1, 2, 3, 4, 5]));
    assert_eq!(result["gotB"], json!({"cancelled": []}));
    assert_eq!(result["codeA"], "session_busy");
    assert_eq!(result["lostCode"], "lost");
    assert_eq!(result["state"], "reconnecting");
    assert!(
        result["resumeUrl"]
            .as_str()
            .expect("url")
            .contains("/v1/sessions/s/ws?after=2"),
        "{result}"
    );
    assert_eq!(result["live"], "live");
    assert_eq!(result["backoffs"], json!([250, 500, 1000, 8000]));
    assert_eq!(
        result["heldReply"], "sent",
        "an op made while reconnecting is sent after"
    );
    browser.close().await;
    server.stop().await;
}

/// Responsiveness, measured (figures printed for BENCHMARKS.md, never asserted as timings): a
/// session of 2,000 interactions opens with its last page of the transcript; a stream of
/// 200 events/s keeps the page's main thread mostly idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(baton_has_chromium),
    ignore = "needs chromium and chromedriver (Debian's chromium, chromium-driver)"
)]
async fn a_long_session_and_a_fast_stream_stay_responsive() {
    let server = TestServer::start(&console_config()).await;
    let http = server.http.clone();
    let mut sent = 0;
    while sent < 2000 {
        let batch: Vec<_> = (0..50)
            .map(|i| {
                http.post(format!("{}/v1/sessions/big/messages", server.url))
                    .json(&json!({"content": format!("message {}", sent + i), "policy": "enqueue"}))
                    .send()
            })
            .collect();
        for answer in futures_util::future::join_all(batch).await {
            assert!(answer.expect("send").status().is_success());
        }
        sent += 50;
        server.wait_idle("big").await;
    }
    // Concurrent sends: the newest by acceptance is not necessarily the highest number.
    let newest = server
        .get("/v1/sessions/big/interactions?limit=1")
        .await
        .body["interactions"][0]["id"]
        .as_str()
        .expect("newest")
        .to_string();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.cdp("Performance.enable", json!({})).await;
    browser
        .goto(&format!("{}/console/#/s/big", server.url))
        .await;
    let first_render = browser
        .until(
            "the last interaction shown",
            &format!(
                "const all = document.querySelectorAll('[data-testid=interaction]');\
                 const last = all[all.length - 1];\
                 const state = document.querySelector('[data-testid=connection-state]');\
                 return !!state && state.dataset.state === 'live' && !!last\
                   && last.dataset.id === '{newest}' && performance.now();"
            ),
        )
        .await
        .as_f64()
        .expect("ms");
    let shown = browser
        .script(
            "return document.querySelectorAll('[data-testid=interaction]').length;",
            json!([]),
        )
        .await;
    // The stream: 200 words/s on another session, watched by the same page.
    server
        .put("/v1/sessions/stream", &json!({"agent": "fast"}))
        .await;
    browser
        .goto(&format!("{}/console/#/s/stream", server.url))
        .await;
    browser.until_connection("live").await;
    let words: Vec<String> = (0..1400).map(|i| format!("w{i}")).collect();
    server
        .post(
            "/v1/sessions/stream/messages",
            &json!({"content": words.join(" ")}),
        )
        .await;
    browser
        .until(
            "streaming",
            "const r = document.querySelector('[data-testid=response]');\
             return r && r.textContent.length > 100;",
        )
        .await;
    let (busy_before, at) = (
        browser.main_thread_seconds().await,
        std::time::Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let busy = browser.main_thread_seconds().await - busy_before;
    let seconds = at.elapsed().as_secs_f64();
    browser
        .until(
            "completed",
            "const i = document.querySelector('[data-testid=interaction]');\
             return i && i.dataset.status === 'completed';",
        )
        .await;
    let shown_text = browser.transcript().await[0]["response"].clone();
    assert_eq!(shown_text, json!(words.join(" ")));
    println!(
        "CONSOLE-BENCH first render of a 2,000-interaction session: {first_render:.0} ms \
         ({shown} interactions in the page); main thread while streaming 200 events/s: \
         {:.0} ms per second",
        busy / seconds * 1000.0
    );
    browser.close().await;
    server.stop().await;
}
