//! A small W3C WebDriver client: drives a headless Debian Chromium through
//! chromedriver, both started per [`Browser`] and stopped when it drops.
//!
//! Binaries: `/usr/bin/chromium` and `/usr/bin/chromedriver`, or the paths in
//! `DE_CHROMIUM` and `DE_CHROMEDRIVER`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::{Proc, spawn, wait_until};

/// How long any one HTTP call to chromedriver may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The W3C key of an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An error answer from chromedriver: the command, the W3C error code and message.
#[derive(Debug)]
pub struct WebDriverError {
    /// `METHOD /path` of the failed command.
    pub command: String,
    pub status: u16,
    /// W3C error code, e.g. `no such element`.
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, s, code) = (&self.command, self.status, &self.code);
        write!(f, "WebDriver {c}: {code} (HTTP {s}): {}", self.message)
    }
}

impl std::error::Error for WebDriverError {}

/// A headless Chromium session; dropping it ends the session and every process.
#[derive(Debug)]
pub struct Browser {
    agent: ureq::Agent,
    base: String,
    session: String,
    driver: Proc,
    /// Holds chromedriver's log, Chromium's profile and its XDG config and cache.
    dir: tempfile::TempDir,
}

/// One element of the current page.
#[derive(Debug, Clone)]
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

fn binary(var: &str, default: &str) -> Result<PathBuf> {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if !path.is_file() {
        bail!(
            "{} not found (set {var} to its path, or: apt-get install chromium chromium-driver)",
            path.display()
        );
    }
    Ok(path)
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a Chromium session.
    pub fn start() -> Result<Browser> {
        Self::start_trusting(None)
    }

    /// As [`Browser::start`], with `ca` (PEM) trusted as a root the way an
    /// operator would trust it: added to the NSS database Chromium reads
    /// (`$HOME/.pki/nssdb`, in the session's own HOME), with `certutil`.
    pub fn start_trusting(ca: Option<&Path>) -> Result<Browser> {
        let chromium = binary("DE_CHROMIUM", "/usr/bin/chromium")?;
        let chromedriver = binary("DE_CHROMEDRIVER", "/usr/bin/chromedriver")?;
        let dir = tempfile::tempdir()?;
        let profile = dir.path().join("profile");
        let downloads = dir.path().join("downloads");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(&chromedriver);
        cmd.arg(format!("--port={port}"));
        // Chromium's crash database ("Crash Reports") and caches go under
        // XDG dirs, not --user-data-dir: keep them in the tempdir too.
        cmd.env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"));
        if let Some(ca) = ca {
            let home = dir.path().join("home");
            let db = home.join(".pki/nssdb");
            std::fs::create_dir_all(&db)?;
            let sql = format!("sql:{}", db.display());
            let certutil = |args: &[&str]| -> Result<()> {
                let out = Command::new("certutil")
                    .args(args)
                    .output()
                    .context("certutil not found (apt-get install libnss3-tools)")?;
                if !out.status.success() {
                    bail!(
                        "certutil {args:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                Ok(())
            };
            certutil(&["-N", "-d", &sql, "--empty-password"])?;
            let ca = ca.to_string_lossy();
            certutil(&[
                "-A",
                "-d",
                &sql,
                "-t",
                "C,,",
                "-n",
                "deployment-engine-ca",
                "-i",
                &ca,
            ])?;
            cmd.env("HOME", &home);
        }
        let log = dir.path().join("chromedriver.log");
        let (driver, _stdout) = spawn("chromedriver", cmd, &log)?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(HTTP_TIMEOUT))
            .build()
            .into();
        let mut browser = Browser {
            agent,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            driver,
            dir,
        };
        wait_until(
            Duration::from_secs(20),
            "chromedriver /status ready",
            || {
                let v = browser.call("GET", "/status", None, HTTP_TIMEOUT).ok()?;
                (v["ready"] == true).then_some(())
            },
        )
        .map_err(|e| anyhow!("{e}; chromedriver log:\n{}", browser.driver.log_text()))?;
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The driver answers before our HTTP timeout does.
            "timeouts": {"implicit": 0, "pageLoad": 25_000, "script": 25_000},
            "goog:chromeOptions": {"binary": chromium, "args": args, "prefs": {
                "download.default_directory": downloads,
                "download.prompt_for_download": false,
            }},
        }}});
        let v = browser.call("POST", "/session", Some(caps), Duration::from_secs(60))?;
        browser.session = v["sessionId"]
            .as_str()
            .context("new session: no sessionId")?
            .to_owned();
        Ok(browser)
    }

    /// One HTTP call; returns the answer's `value` or a [`WebDriverError`].
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        limit: Duration,
    ) -> Result<Value> {
        let command = format!("{method} {path}");
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .body(body.map(|b| b.to_string()).unwrap_or_default())?;
        let req = self
            .agent
            .configure_request(req)
            .timeout_global(Some(limit))
            .build();
        let mut resp = self.agent.run(req).with_context(|| command.clone())?;
        let status = resp.status().as_u16();
        let mut text = String::new();
        resp.body_mut().as_reader().read_to_string(&mut text)?;
        let mut v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{command}: HTTP {status}, not JSON: {text}"))?;
        let value = v["value"].take();
        if status >= 400 || value.get("error").is_some_and(Value::is_string) {
            let s = |k: &str| value[k].as_str().unwrap_or_default().to_owned();
            let (code, message) = (s("error"), s("message"));
            return Err(WebDriverError {
                command,
                status,
                code,
                message,
            }
            .into());
        }
        Ok(value)
    }

    /// A session command: `path` is relative to `/session/{id}`.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        // W3C wants a JSON body on every POST.
        let body = body.or_else(|| (method == "POST").then(|| json!({})));
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body, HTTP_TIMEOUT)
    }

    fn element(&self, v: &Value) -> Result<Element<'_>> {
        let id = v[ELEMENT_KEY]
            .as_str()
            .context("not an element reference")?;
        Ok(Element {
            browser: self,
            id: id.to_owned(),
        })
    }

    /// Where files the page downloads are saved.
    pub fn downloads(&self) -> PathBuf {
        self.dir.path().join("downloads")
    }

    /// Navigates to `url` and waits for the page load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The current page's URL.
    pub fn url(&self) -> Result<String> {
        let v = self.cmd("GET", "/url", None)?;
        Ok(v.as_str().context("url: not a string")?.to_owned())
    }

    /// The first element matching `css`; fails at once when there is none.
    pub fn find(&self, css: &str) -> Result<Element<'_>> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        self.element(&v.with_context(|| format!("find `{css}`"))?)
    }

    /// All elements matching `css` (maybe none).
    pub fn find_all(&self, css: &str) -> Result<Vec<Element<'_>>> {
        let body = json!({"using": "css selector", "value": css});
        let v = self.cmd("POST", "/elements", Some(body))?;
        let all = v.as_array().context("elements: not an array")?;
        all.iter().map(|e| self.element(e)).collect()
    }

    /// Polls until an element matches `css`, for at most `limit`.
    pub fn wait_for(&self, css: &str, limit: Duration) -> Result<Element<'_>> {
        let mut last = anyhow!("never tried");
        wait_until(limit, &format!("element `{css}`"), || {
            self.find(css).map_err(|e| last = e).ok()
        })
        .map_err(|e| anyhow!("{e}; last error: {last:#}"))
    }

    /// Polls until an element matching `css` contains `needle`; returns its text.
    pub fn wait_for_text(&self, css: &str, needle: &str, limit: Duration) -> Result<String> {
        let mut seen = String::from("(not polled)");
        let what = format!("`{css}` to contain {needle:?}");
        wait_until(limit, &what, || {
            let texts = self
                .find_all(css)
                .and_then(|all| all.iter().map(Element::text).collect::<Result<Vec<_>>>());
            match texts {
                Ok(texts) => {
                    let hit = texts.iter().find(|t| t.contains(needle)).cloned();
                    seen = format!("{texts:?}");
                    hit
                }
                Err(e) => {
                    seen = format!("error: {e:#}");
                    None
                }
            }
        })
        .map_err(|e| anyhow!("{e}; current text: {seen}"))
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its result.
    pub fn exec(&self, script: &str, args: &[Value]) -> Result<Value> {
        let body = json!({ "script": script, "args": args });
        self.cmd("POST", "/execute/sync", Some(body))
    }

    /// Writes a PNG screenshot of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let b64 = v.as_str().context("screenshot: not a string")?;
        let png = base64::engine::general_purpose::STANDARD.decode(b64)?;
        std::fs::write(path, png).with_context(|| format!("write {}", path.display()))
    }

    /// Accepts an open alert/confirm/prompt; `Ok(false)` when there is none.
    pub fn accept_alert(&self) -> Result<bool> {
        match self.cmd("POST", "/alert/accept", None) {
            Ok(_) => Ok(true),
            Err(e)
                if e.downcast_ref::<WebDriverError>()
                    .is_some_and(|w| w.code == "no such alert") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Resizes the window (CSS pixels).
    pub fn set_window_size(&self, width: u32, height: u32) -> Result<()> {
        let body = json!({ "width": width, "height": height });
        self.cmd("POST", "/window/rect", Some(body)).map(drop)
    }

    /// Live processes whose command line names this browser's tempdir:
    /// Chromium, its helpers and its crash handler (not chromedriver).
    fn owned_pids(&self) -> Vec<u32> {
        let needle = format!("{}/", self.dir.path().display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let pids = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok());
        pids.filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
    }
}

impl Drop for Browser {
    /// Ends the session (chromedriver then closes Chromium), kills chromedriver,
    /// and SIGKILLs whatever Chromium process is still left.
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let path = format!("/session/{}", self.session);
            let _ = self.call("DELETE", &path, None, Duration::from_secs(10));
        }
        self.driver.kill();
        let gone = wait_until(Duration::from_secs(5), "Chromium to exit", || {
            self.owned_pids().is_empty().then_some(())
        });
        if gone.is_err() {
            let pids = self.owned_pids();
            eprintln!("webdriver: SIGKILL leftover Chromium processes {pids:?}");
            for pid in pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Element<'_> {
    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value> {
        self.browser
            .cmd(method, &format!("/element/{}{what}", self.id), body)
    }

    /// This element as an [`Browser::exec`] argument.
    pub fn as_arg(&self) -> Value {
        json!({ ELEMENT_KEY: self.id })
    }

    /// Clicks the element's centre (scrolls it into view first).
    pub fn click(&self) -> Result<()> {
        self.cmd("POST", "/click", None).map(drop)
    }

    /// Types `text` into the element.
    pub fn send_keys(&self, text: &str) -> Result<()> {
        self.cmd("POST", "/value", Some(json!({ "text": text })))
            .map(drop)
    }

    /// Empties an input or textarea.
    pub fn clear(&self) -> Result<()> {
        self.cmd("POST", "/clear", None).map(drop)
    }

    /// The rendered (visible) text.
    pub fn text(&self) -> Result<String> {
        let v = self.cmd("GET", "/text", None)?;
        Ok(v.as_str().context("text: not a string")?.to_owned())
    }

    /// An HTML attribute (`None` when absent); `name` must be URL-safe.
    pub fn attr(&self, name: &str) -> Result<Option<String>> {
        let v = self.cmd("GET", &format!("/attribute/{name}"), None)?;
        Ok(v.as_str().map(str::to_owned))
    }

    /// A DOM property, e.g. `value` or `checked`; `name` must be URL-safe.
    pub fn prop(&self, name: &str) -> Result<Value> {
        self.cmd("GET", &format!("/property/{name}"), None)
    }

    /// Whether the element is rendered visible.
    pub fn is_displayed(&self) -> Result<bool> {
        let v = self.cmd("GET", "/displayed", None)?;
        v.as_bool().context("displayed: not a bool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    const PAGE: &str = r#"<!doctype html><html><head><title>smoke</title></head><body>
<input id="name" value=""><button id="go" data-kind="primary"
 onclick="document.getElementById('out').textContent = 'hello ' + document.getElementById('name').value">Go</button>
<div id="out">waiting</div><div id="hidden" style="display:none">x</div></body></html>"#;

    /// Serves `PAGE` at `/` (404 elsewhere) until the test process ends.
    fn serve() -> Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        std::thread::spawn(move || {
            for mut s in listener.incoming().map_while(std::result::Result::ok) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if req.starts_with(b"GET / ") {
                    ("200 OK", PAGE)
                } else {
                    ("404 Not Found", "")
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(format!("http://{addr}/"))
    }

    #[test]
    fn missing_binary_names_the_fix() {
        let e = binary("DE_TEST_UNSET_VAR", "/nonexistent/chromedriver").err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.contains("/nonexistent/chromedriver") && e.contains("apt-get install"),
            "{e}"
        );
    }

    #[test]
    fn webdriver_smoke() -> Result<()> {
        let url = serve()?;
        let started = std::time::Instant::now();
        let b = Browser::start()?;
        eprintln!("browser started in {:?}", started.elapsed());
        b.goto(&url)?;
        assert_eq!(b.url()?, url);
        let name = b.wait_for("#name", Duration::from_secs(10))?;
        name.send_keys("world")?;
        assert_eq!(name.prop("value")?, "world");
        let go = b.find("#go")?;
        assert_eq!(go.attr("data-kind")?.as_deref(), Some("primary"));
        assert_eq!(go.attr("nope")?, None);
        assert!(go.is_displayed()?);
        assert!(!b.find("#hidden")?.is_displayed()?);
        go.click()?;
        let text = b.wait_for_text("#out", "hello world", Duration::from_secs(10))?;
        assert_eq!(text, "hello world");
        name.clear()?;
        assert_eq!(name.prop("value")?, "");
        assert_eq!(b.exec("return document.title", &[])?, "smoke");
        let id = b.exec("return arguments[0].id", &[go.as_arg()])?;
        assert_eq!(id, "go");
        assert_eq!(b.find_all("div")?.len(), 2);

        // Errors name the command and the W3C code; timeouts show what was there.
        let e = format!("{:#}", b.find("#missing").err().context("found #missing")?);
        assert!(
            e.contains("no such element") && e.contains("/element"),
            "{e}"
        );
        let e = b.wait_for_text("#out", "bye", Duration::from_millis(300));
        let e = format!("{:#}", e.err().context("found bye")?);
        assert!(e.contains("hello world"), "{e}");

        assert!(!b.accept_alert()?);
        b.exec("setTimeout(function () { alert('hi') }, 0)", &[])?;
        wait_until(Duration::from_secs(5), "the alert", || {
            b.accept_alert().ok().filter(|a| *a)
        })?;

        b.set_window_size(800, 600)?;
        let dir = tempfile::tempdir()?;
        let png = dir.path().join("shot.png");
        b.screenshot(&png)?;
        let bytes = std::fs::read(&png)?;
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

        let running = b.owned_pids();
        assert!(running.len() > 1, "Chromium processes: {running:?}");
        drop(b);
        // Dead orphans stay zombies where pid 1 does not reap; they are gone.
        let alive = |p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
        };
        let left: Vec<u32> = running.into_iter().filter(alive).collect();
        assert!(left.is_empty(), "Chromium processes left: {left:?}");
        eprintln!("smoke test took {:?}", started.elapsed());
        Ok(())
    }
}
