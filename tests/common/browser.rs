//! A small WebDriver client for the console's browser tests: Debian's `chromedriver` started
//! on a free port, headless `chromium` sessions, and the few commands the tests need (navigate,
//! find by `data-testid`, click, type, read, run a script, screenshot). Every wait has a
//! timeout; the driver and its browsers are stopped when dropped, also when a test panics.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::TIMEOUT;

/// A running `chromedriver`, in a process group of its own that the browsers it starts
/// inherit.
pub struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    /// Stops chromedriver and every browser it started: killing chromedriver alone leaves its
    /// Chromium processes running (they are not its to stop once it is gone), so the whole
    /// group goes. A synchronous kill, so it also runs while a failed test unwinds.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// The process id of `chromedriver`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn start() -> Driver {
        let port = super::mock_openai::unused_port().await;
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (Debian's chromium-driver)");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        };
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let ready = driver
                .http
                .get(format!("{}/status", driver.url))
                .send()
                .await;
            if let Ok(response) = ready
                && response.status().is_success()
            {
                return driver;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless browser window.
    pub async fn browser(&self) -> Browser {
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("chromium");
        let answer: Value = self
            .http
            .post(format!("{}/session", self.url))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": binary,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,1000"],
                },
            }}}))
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("json");
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {answer}"))
            .to_string();
        Browser {
            base: format!("{}/session/{id}", self.url),
            http: self.http.clone(),
        }
    }
}

/// One browser window (a WebDriver session).
pub struct Browser {
    base: String,
    http: reqwest::Client,
}

impl Browser {
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("webdriver json");
        if let Some(error) = answer["value"]["error"].as_str() {
            panic!("webdriver {path}: {error}: {}", answer["value"]["message"]);
        }
        answer["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Resizes the window (its outer size; headless, the page gets all of it).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Runs an async script: its last argument is the callback to call with the result.
    pub async fn async_script(&self, script: &str, args: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/async",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The element ids of `selector`.
    async fn find_all(&self, selector: &str) -> Vec<String> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await;
        found
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|e| e.as_object()?.values().next()?.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits for `selector` to match; the first element.
    pub async fn find(&self, selector: &str) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(first) = self.find_all(selector).await.into_iter().next() {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{selector} never appeared"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn click(&self, selector: &str) {
        let element = self.find(selector).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element (after clearing it).
    pub async fn type_into(&self, selector: &str, text: &str) {
        let element = self.find(selector).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/clear"),
            Some(json!({})),
        )
        .await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Polls `check` (a script returning a value) until it returns something truthy.
    ///
    /// A script that throws counts as "not yet": the page re-renders between polls, so an
    /// element the check reads can be briefly absent. The last error is in the timeout's message.
    pub async fn until(&self, what: &str, check: &str) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let guarded = format!("try {{ {check} }} catch (e) {{ return {{notYet: String(e)}}; }}");
        loop {
            let value = self.script(&guarded, json!([])).await;
            let truthy = !matches!(value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0)
                && value.get("notYet").is_none();
            if truthy {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never: {what} (last {value})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element with `data-testid={testid}` ("" when there is none).
    pub async fn text_of(&self, testid: &str) -> String {
        let value = self
            .script(
                "const e = document.querySelector(`[data-testid=${arguments[0]}]`);\
                 return e ? e.textContent : '';",
                json!([testid]),
            )
            .await;
        value.as_str().unwrap_or_default().to_string()
    }

    /// Waits for an element with `data-testid={testid}` to show some text; returns it.
    pub async fn until_text(&self, testid: &str) -> String {
        let check = format!(
            "const e = document.querySelector('[data-testid={testid}]'); return e && e.textContent;"
        );
        let value = self.until(&format!("text in {testid}"), &check).await;
        value.as_str().unwrap_or_default().to_string()
    }

    /// Waits for the page's connection state (`data-testid=connection-state`) to be `state`.
    pub async fn until_connection(&self, state: &str) {
        let check = format!(
            "const e = document.querySelector('[data-testid=connection-state]');\
             return !!e && e.dataset.state === '{state}';"
        );
        self.until(&format!("the connection {state}"), &check).await;
    }

    /// The transcript as the page shows it: `[{id, status, response}]`.
    pub async fn transcript(&self) -> Value {
        self.script(
            "return [...document.querySelectorAll('[data-testid=interaction]')].map(e => ({\
               id: e.dataset.id, status: e.dataset.status,\
               response: e.querySelector('[data-testid=response]').textContent}));",
            json!([]),
        )
        .await
    }

    /// The seqs of the event log's entries.
    pub async fn logged_seqs(&self) -> Vec<i64> {
        let seqs = self
            .script(
                "return [...document.querySelectorAll('[data-testid=event-log] summary')]\
                   .map(s => Number(s.textContent.match(/^#(\\d+)/)[1]));",
                json!([]),
            )
            .await;
        serde_json::from_value(seqs).expect("seqs")
    }

    pub async fn connection_state(&self) -> String {
        self.script(
            "const e = document.querySelector('[data-testid=connection-state]');\
             return e ? e.dataset.state : null;",
            json!([]),
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let data = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64"))
            .expect("png");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot folder");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// A Chrome DevTools Protocol command through chromedriver (`Performance.getMetrics`…).
    pub async fn cdp(&self, command: &str, params: Value) -> Value {
        self.command(
            reqwest::Method::POST,
            "/goog/cdp/execute",
            Some(json!({"cmd": command, "params": params})),
        )
        .await
    }

    /// The main thread's busy time so far (CDP `TaskDuration`), in seconds.
    pub async fn main_thread_seconds(&self) -> f64 {
        let metrics = self.cdp("Performance.getMetrics", json!({})).await;
        metrics["metrics"]
            .as_array()
            .and_then(|all| all.iter().find(|m| m["name"] == "TaskDuration"))
            .and_then(|m| m["value"].as_f64())
            .expect("TaskDuration")
    }

    pub async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}

/// The processes descending from `pid` now (read from `/proc`), `pid` itself excluded.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: the command may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let parent = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, parent))
        })
        .collect();
    let mut found = vec![pid];
    let mut at = 0;
    while at < found.len() {
        let parent = found[at];
        found.extend(
            parents
                .iter()
                .filter(|&&(_, p)| p == parent)
                .map(|&(c, _)| c),
        );
        at += 1;
    }
    found.remove(0);
    found
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}
