//! Test harness for Deployment Engine's integration tests: starts the real
//! `de-controller` and `de-agent` binaries as child processes, waits for them
//! by polling, and kills every process it started when its handle drops.
//! Answers are read into the API's own types (`de_common::api`).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use de_common::AGENT_ALPN;
use de_common::api::{
    CodeView, DeployStarted, DeployState, DeploymentView, ExecRequest, ExecResult, NodeView,
    StatusRow, StepRecordView, StepRequest,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;

pub mod bench;
pub mod webdriver;

pub use bench::{BenchSize, bench_size};

/// Directory holding the binaries of this build profile (built once per test process).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/it-HASH -> target/<profile>
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins", "-p", "de-controller", "-p", "de-agent"]);
        // Cargo gives a test process its package's variables; build scripts
        // that watch one (ring: CARGO_MANIFEST_DIR) would otherwise see a
        // change and rebuild ring and everything on it here, and again at
        // the next top-level build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || matches!(
                    &*key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                )
            {
                cmd.env_remove(&*key);
            }
        }
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build for the binaries");
        assert!(
            status.success(),
            "building de-controller and de-agent failed"
        );
        dir
    })
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A command for binary `name` that never reads the host's config files in
/// /etc/deployment-engine (as if `--config /dev/null`); a `--config` flag overrides that.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(bin(name));
    cmd.env("DE_CONTROLLER_CONFIG", "/dev/null")
        .env("DE_AGENT_CONFIG", "/dev/null");
    cmd
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `limit`.
pub fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) when dropped; its output goes to log files.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        self.wait(limit)
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("already reaped"))?;
        let status = wait_until(limit, &format!("{} to exit", self.name), || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(status)
    }

    /// SIGKILL now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // The test harness shows a test's captured output only when it fails:
        // then the tail of every process log is there to read. Benchmarks
        // capture nothing, so they skip it.
        if std::env::var_os("DE_QUIET_LOGS").is_some() {
            return;
        }
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        eprintln!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            tail.join("\n")
        );
    }
}

/// Spawns `cmd` with stdout and stderr appended to `log`; stdout lines are
/// also sent to the returned receiver.
pub fn spawn(
    name: &str,
    mut cmd: Command,
    log: &Path,
) -> Result<(Proc, std::sync::mpsc::Receiver<String>)> {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err));
    let mut child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let log_path = log.to_owned();
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .ok();
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if let Some(f) = file.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    Ok((
        Proc {
            child: Some(child),
            name: name.to_owned(),
            log: log.to_owned(),
        },
        rx,
    ))
}

/// A running `de-controller serve` on 127.0.0.1 with ports chosen by the kernel.
#[derive(Debug)]
pub struct TestController {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub quic: SocketAddr,
    pub token: String,
    /// The first stdout lines (the token line on first start).
    pub banner: Vec<String>,
    /// It serves HTTPS (it printed its pin): requests trust `DATA/ca.pem`.
    pub https: bool,
}

/// A JSON answer from the API.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Answer {
    /// The body as the API type `T` (`de_common::api`).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.body.clone()).with_context(|| {
            format!(
                "the answer (HTTP {}) is not a {}: {}",
                self.status,
                std::any::type_name::<T>(),
                self.body
            )
        })
    }

    /// The body as `T` when the status is `want`; an error naming both otherwise.
    pub fn expect<T: DeserializeOwned>(&self, want: u16) -> Result<T> {
        if self.status != want {
            bail!("HTTP {} (wanted {want}): {}", self.status, self.body);
        }
        self.json()
    }
}

impl TestController {
    /// Starts a controller on `data_dir` (created if needed).
    pub fn start(data_dir: &Path) -> Result<TestController> {
        Self::start_on(data_dir, "127.0.0.1:0", "127.0.0.1:0")
    }

    pub fn start_on(data_dir: &Path, api: &str, quic: &str) -> Result<TestController> {
        Self::start_with(data_dir, api, quic, &[])
    }

    /// Starts a controller with `extra` flags after the listen addresses
    /// (`--api-tls`, say: requests then go over HTTPS, trusting `DATA/ca.pem`).
    pub fn start_with(
        data_dir: &Path,
        api: &str,
        quic: &str,
        extra: &[&str],
    ) -> Result<TestController> {
        let mut cmd = command("de-controller");
        cmd.args([
            "serve",
            "--api-listen",
            api,
            "--quic-listen",
            quic,
            "--data-dir",
        ])
        .arg(data_dir)
        .args(extra);
        Self::start_cmd(data_dir, cmd)
    }

    /// Starts `cmd`, a `de-controller serve` whose data dir is `data_dir`.
    pub fn start_cmd(data_dir: &Path, cmd: Command) -> Result<TestController> {
        let log = data_dir.with_extension("controller.log");
        let (proc, rx) = spawn("de-controller", cmd, &log)?;
        let mut api = None;
        let mut quic = None;
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while api.is_none() || quic.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).map_err(|_| {
                anyhow!(
                    "controller did not report its listeners; log:\n{}",
                    proc.log_text()
                )
            })?;
            if let Some(a) = line.strip_prefix("api listening on ") {
                api = Some(a.parse()?);
            } else if let Some(q) = line.strip_prefix("quic listening on ") {
                quic = Some(q.parse()?);
            }
            banner.push(line);
        }
        let token = std::fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_owned();
        let https = banner.iter().any(|l| l.starts_with("api https pin "));
        let ctl = TestController {
            https,
            proc,
            data_dir: data_dir.to_owned(),
            api: api.context("api")?,
            quic: quic.context("quic")?,
            token,
            banner,
        };
        wait_until(Duration::from_secs(20), "controller /healthz", || {
            ctl.request("GET", "/healthz", None, None)
                .ok()
                .filter(|a| a.status == 200)
        })?;
        Ok(ctl)
    }

    /// One HTTP request; `token` None sends no Authorization header.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<Answer> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .tls_config(self.tls_config()?)
            .build()
            .into();
        let url = format!("{}{}", self.base_url(), path);
        let req = ureq::http::Request::builder().method(method).uri(&url);
        let req = match token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        };
        let req = match body {
            Some(b) => req
                .header("Content-Type", "application/json")
                .body(b.to_owned())?,
            None => req.body(String::new())?,
        };
        let mut resp = agent.run(req)?;
        let status = resp.status().as_u16();
        let mut text = String::new();
        resp.body_mut().as_reader().read_to_string(&mut text)?;
        let body = if text.trim().is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Ok(Answer { status, body })
    }

    /// `https://ADDR` when the controller serves HTTPS (`--api-tls`), else `http://ADDR`.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.api)
    }

    /// Trusts the controller's own CA (`DATA/ca.pem`) and nothing else.
    pub fn tls_config(&self) -> Result<ureq::tls::TlsConfig> {
        let pem = std::fs::read(self.data_dir.join("ca.pem"))?;
        let ca = ureq::tls::Certificate::from_pem(&pem)?;
        Ok(ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                ca,
            ])))
            .build())
    }

    /// An authenticated request.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
        self.request(method, path, Some(&self.token), body)
    }

    /// Queues a raw step on `node` (`POST /api/v1/nodes/{node}/steps`); the
    /// answer must have status `want` (200 once the step is final, 202 while
    /// it still runs).
    pub fn post_step(&self, node: &str, req: &StepRequest, want: u16) -> Result<StepRecordView> {
        self.api(
            "POST",
            &format!("/api/v1/nodes/{node}/steps"),
            Some(&serde_json::to_string(req)?),
        )?
        .expect(want)
    }

    /// Creates an install code, returning its digits.
    pub fn new_code(&self, ttl_secs: Option<u64>) -> Result<String> {
        let body = ttl_secs.map(|t| format!("{{\"ttl_secs\": {t}}}"));
        let code: CodeView = self
            .api("POST", "/api/v1/install-codes", body.as_deref())?
            .expect(201)
            .context("POST install-codes")?;
        Ok(code.code)
    }

    /// GET /api/v1/nodes.
    pub fn nodes(&self) -> Result<Vec<NodeView>> {
        self.api("GET", "/api/v1/nodes", None)?
            .expect(200)
            .context("GET nodes")
    }

    /// The first node (by id) whose `ips` contain `ip`, revoked or not.
    pub fn node_by_ip(&self, ip: &str) -> Result<Option<NodeView>> {
        Ok(self
            .nodes()?
            .into_iter()
            .find(|n| n.ips.iter().any(|i| i == ip)))
    }

    /// `POST /api/v1/exec`: every target's result (an error unless 200).
    pub fn exec(&self, req: &ExecRequest) -> Result<Vec<ExecResult>> {
        self.api("POST", "/api/v1/exec", Some(&serde_json::to_string(req)?))?
            .expect(200)
            .context("POST exec")
    }

    /// `GET /deployment-engine/deploy`: starts a deployment of the current plan.
    pub fn deploy(&self) -> Result<DeployStarted> {
        self.api("GET", "/deployment-engine/deploy", None)?
            .expect(202)
            .context("deploy")
    }

    /// `GET /api/v1/deployments/{id}`, with its steps.
    pub fn deployment(&self, id: &str) -> Result<DeploymentView> {
        self.api("GET", &format!("/api/v1/deployments/{id}"), None)?
            .expect(200)
            .with_context(|| format!("deployment {id}"))
    }

    /// Waits (at most `limit`) for deployment `id` to stop running.
    pub fn finished(&self, id: &str, limit: Duration) -> Result<DeploymentView> {
        wait_until(limit, &format!("deployment {id} to finish"), || {
            self.deployment(id)
                .ok()
                .filter(|d| d.state != DeployState::Running)
        })
    }

    /// `GET /deployment-engine/status`.
    pub fn status(&self) -> Result<Vec<StatusRow>> {
        self.api("GET", "/deployment-engine/status", None)?
            .expect(200)
            .context("status")
    }
}

/// An agent on one loopback address, with its own state dir and node root.
#[derive(Debug)]
pub struct TestAgent {
    pub ip: String,
    pub state_dir: PathBuf,
    pub root: PathBuf,
    pub proc: Option<Proc>,
    /// A private monit control file, when the agent runs with one.
    pub monit_control: Option<PathBuf>,
}

/// What a finished `de-agent` command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl TestAgent {
    /// An agent for node address `ip` (127.0.0.x) under `dir`.
    pub fn new(dir: &Path, ip: &str) -> Result<TestAgent> {
        let base = dir.join(format!("agent-{ip}"));
        let root = base.join("root");
        std::fs::create_dir_all(&root)?;
        Ok(TestAgent {
            ip: ip.to_owned(),
            state_dir: base.join("state"),
            root,
            proc: None,
            monit_control: None,
        })
    }

    /// Gives the agent a private monit instance (created by the agent on start).
    pub fn with_private_monit(mut self) -> TestAgent {
        let dir = self.state_dir.with_file_name("monit");
        self.monit_control = Some(dir.join("monitrc"));
        self
    }

    /// The node id from the agent's state dir.
    pub fn node_id(&self) -> Result<String> {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(self.state_dir.join("agent.json"))?)?;
        Ok(meta["node_id"].as_str().context("node_id")?.to_owned())
    }

    fn common(&self, cmd: &mut Command) {
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--root")
            .arg(&self.root)
            .args(["--advertise-ip", &self.ip, "--connect-timeout-secs", "5"]);
    }

    /// Runs `de-agent enroll` to completion (bounded).
    pub fn enroll(&self, controller: &SocketAddr, code: &str) -> Result<Output> {
        let mut cmd = command("de-agent");
        cmd.args([
            "enroll",
            "--controller",
            &controller.to_string(),
            "--code",
            code,
        ]);
        self.common(&mut cmd);
        run_bounded(cmd, Duration::from_secs(60))
    }

    /// Starts `de-agent run` in the background.
    pub fn start(&mut self, heartbeat_secs: u64) -> Result<()> {
        self.start_with(heartbeat_secs, &[])
    }

    /// Starts `de-agent run --controller ADDR --code CODE`: enrols first when it has no identity.
    pub fn start_enrolling(&mut self, controller: &SocketAddr, code: &str) -> Result<()> {
        self.start_with(
            1,
            &["--controller", &controller.to_string(), "--code", code],
        )
    }

    fn start_with(&mut self, heartbeat_secs: u64, extra: &[&str]) -> Result<()> {
        let mut cmd = command("de-agent");
        cmd.args([
            "run",
            "--heartbeat-secs",
            &heartbeat_secs.to_string(),
            "--max-backoff-secs",
            "2",
        ]);
        cmd.args(extra);
        self.common(&mut cmd);
        if let Some(m) = &self.monit_control {
            cmd.arg("--monit-control").arg(m);
        }
        let log = self.state_dir.with_extension("log");
        let (proc, _rx) = spawn(&format!("de-agent {}", self.ip), cmd, &log)?;
        self.proc = Some(proc);
        Ok(())
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
        // The agent's private monit and what it supervises outlive the agent:
        // stop the services through monit (their own stop programs), then monit.
        let monit = |args: &[&str], m: &Path| {
            let mut c = Command::new("monit");
            c.arg("-c").arg(m).args(args);
            let _ = run_bounded(c, Duration::from_secs(20));
        };
        if let Some(m) = &self.monit_control
            && m.exists()
        {
            monit(&["stop", "all"], m);
            let _ = wait_until(
                Duration::from_secs(20),
                "supervised processes to stop",
                || {
                    pid_files(&self.root)
                        .iter()
                        .all(|p| !process_alive(*p))
                        .then_some(())
                },
            );
            monit(&["quit"], m);
        }
        // Whatever is left (and its children, e.g. nginx workers holding the port) is killed.
        for pid in pid_files(&self.root) {
            let _ = Command::new("pkill")
                .args(["-KILL", "-P", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Pids named by `*.pid` files under `dir`.
fn pid_files(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "pid")
                && let Some(pid) = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Runs a command to completion within `limit`, killing it otherwise.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output> {
    let dir = tempfile::tempdir()?;
    let out_path = dir.path().join("out");
    let err_path = dir.path().join("err");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(&out_path)?))
        .stderr(Stdio::from(std::fs::File::create(&err_path)?));
    let mut child = cmd.spawn()?;
    let status = match wait_until(limit, "command to finish", || {
        child.try_wait().ok().flatten()
    }) {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
    };
    Ok(Output {
        status,
        stdout: std::fs::read_to_string(out_path)?,
        stderr: std::fs::read_to_string(err_path)?,
    })
}

/// A controller and one running agent per address, all enrolled and online.
pub fn cluster(
    dir: &Path,
    ips: &[&str],
    private_monit: bool,
) -> Result<(TestController, Vec<TestAgent>)> {
    let ctl = TestController::start(&dir.join("data"))?;
    let code = ctl.new_code(None)?;
    let mut agents = Vec::new();
    for ip in ips {
        let mut a = TestAgent::new(dir, ip)?;
        if private_monit {
            a = a.with_private_monit();
        }
        let out = a.enroll(&ctl.quic, &code)?;
        if !out.status.success() {
            bail!("enrol {ip}: {}", out.stderr);
        }
        a.start(1)?;
        agents.push(a);
    }
    for a in &agents {
        wait_until(Duration::from_secs(30), &format!("{} online", a.ip), || {
            ctl.node_by_ip(&a.ip).ok().flatten().filter(|n| n.online)
        })?;
    }
    Ok((ctl, agents))
}

/// A catalog component (TOML) named `name`: a `sleep` that monit supervises
/// (pidfile, start and stop programs under the node root), installed by a
/// script that prints `installing NAME on IP`, then a monit add and a start.
pub fn supervised_sleeper(name: &str) -> String {
    r#"
description = "A process that sleeps, supervised by monit"
cardinality = "many"
monit_check = '''
check process NAME with pidfile {{ path("run/NAME.pid") }}
  start program = "/bin/sh -c 'mkdir -p {{ path("run") }}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {{ path("run/NAME.pid") }}'"
  stop program = "/bin/sh -c 'kill $(cat {{ path("run/NAME.pid") }})'"
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1

[[install]]
action = "script"
run = 'echo "installing NAME on {{ node.ip }}"'

[[install]]
action = "monit_add"

[[install]]
action = "monit_start"
"#
    .replace("NAME", name)
}

/// A catalog component (TOML) named `name` that installs by running `run`
/// once (a TOML literal string, so no `'` inside), with a monit check it
/// never adds: a component made of one script, for tests.
pub fn script_component(name: &str, description: &str, run: &str) -> String {
    format!(
        r#"
description = "{description}"
cardinality = "many"
monit_check = """
check process {name} with pidfile {{{{ path("run/{name}.pid") }}}}
"""
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1
[[install]]
action = "script"
run = '{run}'
"#
    )
}

/// Writes the operator catalog `name` into `DATA/catalogs/name/`: its
/// `catalog.toml` and one `<component>.toml` per `(component, toml)`.
pub fn write_catalog(
    data: &Path,
    name: &str,
    catalog_toml: &str,
    components: &[(&str, &str)],
) -> Result<()> {
    let dir = data.join("catalogs").join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("catalog.toml"), catalog_toml)?;
    for (component, toml) in components {
        std::fs::write(dir.join(format!("{component}.toml")), toml)?;
    }
    Ok(())
}

/// The pid in `run/<name>.pid` under the agent's node root.
pub fn pidfile(agent: &TestAgent, name: &str) -> Option<u32> {
    std::fs::read_to_string(agent.root.join(format!("run/{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is a live process: `/proc/PID/stat` exists and its state
/// is neither Z (zombie) nor X (dead). A zombie has exited; only its exit
/// status waits for its parent.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(!matches!(state, 'Z' | 'X'))
        })
        .unwrap_or(false)
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time as the controller
/// writes it (`2026-01-01T00:00:00Z`, `...:00.25Z`): step and watch times.
pub fn rfc3339_secs(t: &str) -> Option<f64> {
    let t = t.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut h = time.split(':');
    let (hh, mm) = (
        h.next()?.parse::<i64>().ok()?,
        h.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = h.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// Per instance of `component` in a deployment, from its first step's start
/// to the end of its last step or watch (seconds since the epoch): when the
/// deployment had it in flight.
pub fn in_flight_spans(
    d: &de_common::api::DeploymentView,
    component: &str,
) -> Vec<(String, f64, f64)> {
    let mut out: Vec<(String, f64, f64)> = Vec::new();
    let steps = d
        .steps
        .iter()
        .flatten()
        .filter(|s| s.component == component);
    for s in steps {
        let (Some(a), Some(b)) = (
            s.started_at.as_deref().and_then(rfc3339_secs),
            s.finished_at.as_deref().and_then(rfc3339_secs),
        ) else {
            continue;
        };
        match out.iter_mut().find(|x| x.0 == s.instance) {
            Some(x) => {
                x.1 = x.1.min(a);
                x.2 = x.2.max(b);
            }
            None => out.push((s.instance.clone(), a, b)),
        }
    }
    for w in d.watches.iter().filter(|w| w.component == component) {
        if let (Some(x), Some(end)) = (
            out.iter_mut().find(|x| x.0 == w.instance),
            w.finished_at.as_deref().and_then(rfc3339_secs),
        ) {
            x.2 = x.2.max(end);
        }
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// The most spans of `spans` that overlap at one moment.
pub fn most_overlapping(spans: &[(String, f64, f64)]) -> usize {
    spans
        .iter()
        .map(|(_, at, _)| spans.iter().filter(|(_, a, b)| a <= at && at < b).count())
        .max()
        .unwrap_or(0)
}

/// `n` bytes that do not compress (xorshift, the same every run), so
/// nothing on the way can shortcut them.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The SHA-256 of `b`, in lower-case hex (as the API shows it).
pub fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The mutual-TLS QUIC client config of an enrolled agent, from its state
/// dir (`ca.pem` may be a bundle, as during a CA rotation): for tests that
/// speak the link themselves with a real node identity.
pub fn agent_quic_config(state: &Path) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(state.join("ca.pem"))? {
        roots.add(ca?)?;
    }
    let cert = CertificateDer::from_pem_file(state.join("node.pem"))?;
    let key = PrivateKeyDer::from_pem_file(state.join("node.key"))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_alive_and_an_exited_unreaped_one_is_not() {
        let mut running = Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let mut exited = Command::new("true").spawn().expect("spawn true");
        let zombie = exited.id();
        // Not reaped: it stays in /proc as a zombie until `wait`.
        let state = wait_until(Duration::from_secs(10), "true to exit", || {
            let stat = std::fs::read_to_string(format!("/proc/{zombie}/stat")).ok()?;
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            (state == 'Z').then_some(state)
        });
        let alive = (process_alive(running.id()), process_alive(zombie));
        let _ = running.kill();
        let _ = running.wait();
        let _ = exited.wait();
        assert!(state.is_ok(), "{state:?}");
        assert_eq!(alive, (true, false));
        assert!(!process_alive(zombie), "a reaped process");
    }
}
