//! The agent's monit: the system one, or a private instance named by
//! `--monit-control FILE` (created with its own socket, pid, state and id
//! files next to it when missing). Checks live one file per component in the
//! control file's include directory; status comes from monit's XML status
//! over its HTTP interface: the unix socket, or the TCP port (with the first
//! `allow user:password`) when the control file or a file it includes sets
//! one. Debian's stock monitrc sets none: `de-agent monit-setup` (run by the
//! package on install) then adds the drop-in [`SYSTEM_DROP_IN`], which
//! opens a unix socket, and reloads monit (the package's purge removes it).
//! A running agent never changes monit's files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use de_common::{ComponentStatus, MonitOp, write_private};

/// The system monit's control file on Debian.
pub(crate) const SYSTEM_CONTROL: &str = "/etc/monit/monitrc";
const SYSTEM_INCLUDE: &str = "/etc/monit/conf.d";
/// The agent's drop-in for a system monit whose HTTP interface is off. Its
/// name has no `.monitrc` (no component check can be called that), and
/// Debian's monitrc includes every file of conf.d.
pub(crate) const SYSTEM_DROP_IN: &str = "/etc/monit/conf.d/deployment-engine-httpd";
/// The socket the drop-in opens.
const SYSTEM_DROP_IN_SOCKET: &str = "/run/monit-deployment-engine.sock";

#[derive(Debug, thiserror::Error)]
pub enum MonitError {
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not run monit (is the Debian package monit installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("monit {args} failed: {output}")]
    Failed { args: String, output: String },
    #[error("component name {0:?} is not valid: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("cannot read monit's status from {socket}: {why}")]
    Status { socket: PathBuf, why: String },
}

/// Where monit's HTTP interface listens, as its control file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Httpd {
    Socket(PathBuf),
    /// `host:port`, and the `user:password` of the first `allow` that has one.
    Tcp {
        addr: String,
        auth: Option<String>,
    },
}

impl std::fmt::Display for Httpd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Httpd::Socket(p) => write!(f, "{}", p.display()),
            Httpd::Tcp { addr, .. } => write!(f, "{addr}"),
        }
    }
}

/// How to reach one monit instance.
#[derive(Debug, Clone)]
pub struct Monit {
    control: PathBuf,
    include_dir: PathBuf,
    httpd: Option<Httpd>,
    /// A private instance is the agent's to start; the system one is systemd's.
    private: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The control file of a private instance rooted in `dir`.
fn private_control(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "# Private monit instance of a Deployment Engine agent (written by de-agent).\n\
         set daemon 2\n\
         set pidfile {d}/monit.pid\n\
         set statefile {d}/monit.state\n\
         set idfile {d}/monit.id\n\
         set logfile {d}/monit.log\n\
         set httpd unixsocket {d}/monit.sock\n    allow localhost\n\
         include {d}/conf.d/*.monitrc\n"
    )
}

/// The `unixsocket` path a control file names, if any.
#[cfg(test)]
fn socket_of(control_text: &str) -> Option<PathBuf> {
    match httpd_of(control_text) {
        Some(Httpd::Socket(p)) => Some(p),
        _ => None,
    }
}

/// The words of a control file, comments dropped, each with whether it
/// starts its line.
fn words(text: &str) -> impl Iterator<Item = (bool, &str)> {
    text.lines().flat_map(|l| {
        let l = l.split_once('#').map_or(l, |(code, _)| code);
        l.split_whitespace().enumerate().map(|(i, w)| (i == 0, w))
    })
}

/// The HTTP interface a control file's `set httpd` statement opens, if any:
/// its `unixsocket`, else its `port` (on its `address`, default localhost)
/// with the first `allow user:password`.
fn httpd_of(text: &str) -> Option<Httpd> {
    let mut ws = words(text).peekable();
    // Find `set httpd`.
    loop {
        let (_, w) = ws.next()?;
        if w == "set" && ws.peek().is_some_and(|(_, n)| *n == "httpd") {
            ws.next();
            break;
        }
    }
    let (mut socket, mut port, mut address, mut auth) = (None, None, None, None);
    while let Some((first, w)) = ws.next() {
        // The statement ends where the next one begins.
        if first && matches!(w, "set" | "check" | "include") {
            break;
        }
        match w {
            "unixsocket" => socket = ws.next().map(|(_, p)| PathBuf::from(p)),
            "port" => port = ws.next().and_then(|(_, p)| p.parse::<u16>().ok()),
            "address" => address = ws.next().map(|(_, a)| a.to_owned()),
            "allow" => {
                if let Some((_, a)) = ws.next() {
                    let a = a.trim_matches('"');
                    if auth.is_none()
                        && a.contains(':')
                        && !a.starts_with('@')
                        && a.parse::<std::net::IpAddr>().is_err()
                    {
                        auth = Some(a.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(s) = socket {
        return Some(Httpd::Socket(s));
    }
    let port = port?;
    let host = address.unwrap_or_else(|| "localhost".into());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Some(Httpd::Tcp {
        addr: format!("{host}:{port}"),
        auth,
    })
}

/// The files a control file's `include GLOB` lines name, in order (globs of
/// the form `DIR/*` or `DIR/PREFIX*SUFFIX` only, as Debian's and ours are).
fn included(text: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut ws = words(text);
    while let Some((first, w)) = ws.next() {
        if !(first && w == "include") {
            continue;
        }
        let Some((_, glob)) = ws.next() else { break };
        let glob = Path::new(glob.trim_matches('"'));
        let (Some(dir), Some(pat)) = (glob.parent(), glob.file_name().and_then(|p| p.to_str()))
        else {
            continue;
        };
        let (pre, suf) = pat.split_once('*').unwrap_or((pat, ""));
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    n.starts_with(pre) && n.ends_with(suf) && (pat.contains('*') || n == pat)
                })
            })
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files);
    }
    out
}

/// The HTTP interface `control` or a file it includes opens.
fn find_httpd(control: &Path) -> Option<Httpd> {
    let text = std::fs::read_to_string(control).ok()?;
    httpd_of(&text).or_else(|| {
        included(&text)
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .find_map(|t| httpd_of(&t))
    })
}

/// The drop-in that opens a unix socket for the agent.
fn drop_in_text(socket: &Path) -> String {
    format!(
        "# Written by de-agent (package deployment-engine-agent): opens monit's\n\
         # HTTP interface on a unix socket, which the agent reads status from and\n\
         # monit's own command line uses. Purging the package removes it.\n\
         set httpd unixsocket {}\n    allow localhost\n",
        socket.display()
    )
}

impl Monit {
    /// The system monit (checks in /etc/monit/conf.d), as its files are now.
    pub fn system() -> Monit {
        Monit {
            control: PathBuf::from(SYSTEM_CONTROL),
            include_dir: PathBuf::from(SYSTEM_INCLUDE),
            httpd: find_httpd(Path::new(SYSTEM_CONTROL)),
            private: false,
        }
    }

    /// The system monit, its HTTP interface opened when no file sets one:
    /// see [`Monit::open_httpd`].
    pub async fn system_with_httpd() -> Result<Monit, MonitError> {
        Self::open_httpd(
            Path::new(SYSTEM_CONTROL),
            Path::new(SYSTEM_INCLUDE),
            Path::new(SYSTEM_DROP_IN),
            Path::new(SYSTEM_DROP_IN_SOCKET),
        )
        .await
    }

    /// A monit run by others (systemd) whose control file is `control`: a
    /// `set httpd` in it or a file it includes is used as it is; with none,
    /// `drop_in` (in an included directory) is written to open `socket`,
    /// checked with `monit -t` (removed again if monit refuses it) and monit
    /// is reloaded, if it runs (else it reads the drop-in when it starts).
    pub async fn open_httpd(
        control: &Path,
        include_dir: &Path,
        drop_in: &Path,
        socket: &Path,
    ) -> Result<Monit, MonitError> {
        let mut monit = Monit {
            control: control.to_owned(),
            include_dir: include_dir.to_owned(),
            httpd: find_httpd(control),
            private: false,
        };
        if monit.httpd.is_some() || !control.exists() {
            return Ok(monit);
        }
        write_private(drop_in, drop_in_text(socket).as_bytes()).map_err(|source| {
            MonitError::Write {
                path: drop_in.to_owned(),
                source,
            }
        })?;
        // Read back through the includes: the drop-in must be one of them.
        monit.httpd = find_httpd(control);
        if monit.httpd.is_none() {
            let _ = std::fs::remove_file(drop_in);
            return Err(MonitError::Failed {
                args: format!("-c {}", control.display()),
                output: format!(
                    "{} does not include {}: add `set httpd unixsocket {}` to it",
                    control.display(),
                    drop_in.display(),
                    socket.display()
                ),
            });
        }
        if let Err(e) = monit.cli(&["-t"]).await {
            let _ = std::fs::remove_file(drop_in);
            return Err(e);
        }
        tracing::info!(drop_in = %drop_in.display(), "monit's HTTP interface was off: opened it on a unix socket");
        // Not running yet (boot order): it reads the drop-in when it starts.
        if let Err(e) = monit.cli(&["reload"]).await {
            tracing::debug!("monit reload: {}", de_common::ErrorChain(&e));
        }
        Ok(monit)
    }

    /// A private instance controlled by `control`; the file (and its
    /// directory) is created when missing.
    pub fn private(control: &Path) -> Result<Monit, MonitError> {
        let dir = control
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let include_dir = dir.join("conf.d");
        let w = |path: &Path, source| MonitError::Write {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&include_dir).map_err(|e| w(&include_dir, e))?;
        let text = match std::fs::read_to_string(control) {
            Ok(t) => t,
            Err(_) => {
                let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                let t = private_control(&dir);
                write_private(control, t.as_bytes()).map_err(|e| w(control, e))?;
                t
            }
        };
        Ok(Monit {
            control: control.to_owned(),
            include_dir,
            httpd: httpd_of(&text).or_else(|| find_httpd(control)),
            private: true,
        })
    }

    async fn cli(&self, args: &[&str]) -> Result<String, MonitError> {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            Command::new("monit")
                .arg("-c")
                .arg(&self.control)
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| MonitError::Failed {
            args: args.join(" "),
            output: "timed out after 30 s".into(),
        })?
        .map_err(MonitError::Spawn)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(MonitError::Failed {
                args: args.join(" "),
                output: text.trim().to_owned(),
            })
        }
    }

    /// Starts a private monit daemon if it is not running; for the system
    /// monit, only checks that it answers (systemd runs it).
    pub async fn ensure_running(&self) -> Result<(), MonitError> {
        match self.status_xml().await {
            Ok(_) => return Ok(()),
            Err(e) if !self.private => return Err(e),
            Err(_) => {}
        }
        // Detached from our pipes: the daemon outlives this call.
        let status = Command::new("monit")
            .arg("-c")
            .arg(&self.control)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map_err(MonitError::Spawn)?;
        if !status.success() {
            return Err(MonitError::Failed {
                args: format!("-c {}", self.control.display()),
                output: format!("exited with {status}; see its log next to the control file"),
            });
        }
        // Wait (bounded) for its socket to answer; a loaded machine can take a while.
        for _ in 0..300 {
            if self.status_xml().await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(MonitError::Status {
            socket: self.httpd_name(),
            why: "monit started but its socket does not answer".into(),
        })
    }

    pub(crate) fn check_path(&self, name: &str) -> Result<PathBuf, MonitError> {
        if !valid_name(name) {
            return Err(MonitError::BadName(name.to_owned()));
        }
        Ok(self.include_dir.join(format!("{name}.monitrc")))
    }

    /// Installs (or replaces) the check of `name` and reloads monit.
    pub async fn add(&self, name: &str, check: &str) -> Result<String, MonitError> {
        let path = self.check_path(name)?;
        write_private(&path, check.as_bytes()).map_err(|source| MonitError::Write {
            path: path.clone(),
            source,
        })?;
        if let Err(e) = self.cli(&["-t"]).await {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        self.ensure_running().await?;
        let out = self.cli(&["reload"]).await?;
        // monit reloads asynchronously: wait (bounded) until it knows the service,
        // so a start right after this step finds it.
        // monit can be busy running another service's start program; give it a minute.
        for _ in 0..600 {
            match self.status().await {
                Ok(list) if list.iter().any(|c| c.name == name) => return Ok(out),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Err(MonitError::Failed {
            args: "reload".into(),
            output: format!("monit did not load the check {name:?} within 60 s"),
        })
    }

    /// Stops `name`, removes its check and reloads monit.
    pub async fn remove(&self, name: &str) -> Result<String, MonitError> {
        let path = self.check_path(name)?;
        if !path.exists() {
            return Ok(format!("no check for {name}; nothing to remove"));
        }
        let mut out = self.cli(&["stop", name]).await.unwrap_or_default();
        // monit acts on stop asynchronously: wait (bounded) until it is unmonitored.
        for _ in 0..100 {
            match self.status().await {
                Ok(list) if list.iter().any(|c| c.name == name && c.status != "STOPPED") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
        std::fs::remove_file(&path).map_err(|source| MonitError::Write {
            path: path.clone(),
            source,
        })?;
        out.push_str(&self.cli(&["reload"]).await?);
        Ok(out)
    }

    pub async fn op(&self, name: &str, op: MonitOp) -> Result<String, MonitError> {
        self.check_path(name)?;
        self.ensure_running().await?;
        let verb = match op {
            MonitOp::Start => "start",
            MonitOp::Stop => "stop",
            MonitOp::Restart => "restart",
        };
        self.cli(&[verb, name]).await
    }

    /// Where monit's HTTP interface is, in words (no password).
    pub fn httpd_description(&self) -> String {
        match &self.httpd {
            Some(Httpd::Socket(p)) => format!("unix socket {}", p.display()),
            Some(Httpd::Tcp { addr, auth }) => format!(
                "TCP {addr}{}",
                if auth.is_some() {
                    ", with a password"
                } else {
                    ""
                }
            ),
            None => "none".into(),
        }
    }

    fn httpd_name(&self) -> PathBuf {
        self.httpd
            .as_ref()
            .map(|h| PathBuf::from(h.to_string()))
            .unwrap_or_default()
    }

    async fn status_xml(&self) -> Result<String, MonitError> {
        let httpd = self.httpd.clone().ok_or_else(|| MonitError::Status {
            socket: PathBuf::new(),
            why: format!(
                "{} (and the files it includes) has no 'set httpd' statement: run 'de-agent monit-setup' (the package does on install), or add 'set httpd unixsocket /run/monit.sock' and reload monit",
                self.control.display()
            ),
        })?;
        let name = self.httpd_name();
        let err = |why: String| MonitError::Status {
            socket: name.clone(),
            why,
        };
        async fn get<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
            mut s: S,
            auth: Option<&str>,
        ) -> std::io::Result<Vec<u8>> {
            use base64::Engine as _;
            let auth = auth.map_or(String::new(), |a| {
                format!(
                    "Authorization: Basic {}\r\n",
                    base64::engine::general_purpose::STANDARD.encode(a)
                )
            });
            s.write_all(
                format!(
                    "GET /_status?format=xml&level=full HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n"
                )
                .as_bytes(),
            )
            .await?;
            let mut buf = Vec::new();
            s.take(4 << 20).read_to_end(&mut buf).await?;
            Ok(buf)
        }
        let fetch = async {
            match &httpd {
                Httpd::Socket(path) => {
                    let s = tokio::net::UnixStream::connect(path)
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    get(s, None).await.map_err(|e| err(e.to_string()))
                }
                Httpd::Tcp { addr, auth } => {
                    let s = tokio::net::TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| err(e.to_string()))?;
                    get(s, auth.as_deref())
                        .await
                        .map_err(|e| err(e.to_string()))
                }
            }
        };
        let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .map_err(|_| err("no answer in 5 s".into()))??;
        status_body(&buf).map_err(err)
    }

    /// Every process service monit supervises, with its state.
    pub async fn status(&self) -> Result<Vec<ComponentStatus>, MonitError> {
        let xml = self.status_xml().await?;
        parse_status(&xml).map_err(|why| MonitError::Status {
            socket: self.httpd_name(),
            why,
        })
    }
}

fn child<'a>(n: roxmltree::Node<'a, 'a>, name: &str) -> Option<roxmltree::Node<'a, 'a>> {
    n.children().find(|c| c.has_tag_name(name))
}

fn text_of<T: std::str::FromStr>(n: roxmltree::Node<'_, '_>, path: &[&str]) -> Option<T> {
    let mut cur = n;
    for p in path {
        cur = child(cur, p)?;
    }
    cur.text()?.trim().parse().ok()
}

/// The body of monit's HTTP answer to the status request (ISO-8859-1, so
/// every byte is its own code point), or why there is none: the answer's
/// first line when it is not a 200.
pub(crate) fn status_body(answer: &[u8]) -> Result<String, String> {
    let text: String = answer.iter().map(|&b| b as char).collect();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .ok_or_else(|| "malformed HTTP answer".to_owned())?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return Err(text.lines().next().unwrap_or_default().to_owned());
    }
    Ok(body)
}

/// Maps monit's XML status to component states (RUNNING, DOWN, STARTING, STOPPING, STOPPED).
pub fn parse_status(xml: &str) -> Result<Vec<ComponentStatus>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for svc in doc
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("service") && n.attribute("type") == Some("3"))
    {
        let name: String = text_of(svc, &["name"]).unwrap_or_default();
        let status: i64 = text_of(svc, &["status"]).unwrap_or(0);
        let monitor: i64 = text_of(svc, &["monitor"]).unwrap_or(0);
        let pending: i64 = text_of(svc, &["pendingaction"]).unwrap_or(0);
        let pid: Option<i64> = text_of(svc, &["pid"]);
        let pid = pid.filter(|p| *p > 0).and_then(|p| u32::try_from(p).ok());
        // pendingaction is monit's Action_Type: 0 ignored, 1 alert, 2 restart,
        // 3 stop, 4 exec, 5 unmonitor, 6 start, 7 monitor; monitor is a bit
        // set: 0 not monitored, 1 monitored, 2 initializing, 4 waiting.
        // An action asked for (`monit start`, `stop`, `restart`) shows until
        // monit has carried it out, also on a service not monitored yet
        // (monit's "Not monitored - start pending" is STARTING, not STOPPED).
        // Otherwise a failing check (status bits set) is DOWN, also while
        // monit retries the start on its own ("Initializing" between
        // "Execution failed | Does not exist").
        let state = if matches!(pending, 3 | 5) {
            "STOPPING"
        } else if matches!(pending, 2 | 6 | 7) {
            "STARTING"
        } else if monitor == 0 {
            "STOPPED"
        } else if status != 0 {
            "DOWN"
        } else if monitor & 2 != 0 {
            "STARTING"
        } else if pid.is_none() {
            "DOWN"
        } else {
            "RUNNING"
        };
        out.push(ComponentStatus {
            name,
            status: state.to_owned(),
            pid,
            cpu_pct: text_of(svc, &["cpu", "percent"]),
            mem_kb: text_of(svc, &["memory", "kilobyte"]),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, status: i64, monitor: i64, pending: i64, pid: Option<i64>) -> String {
        let pid = pid.map(|p| format!("<pid>{p}</pid>")).unwrap_or_default();
        format!(
            "<service type=\"3\"><name>{name}</name><status>{status}</status><monitor>{monitor}</monitor>\
             <pendingaction>{pending}</pendingaction>{pid}<memory><kilobyte>1656</kilobyte></memory>\
             <cpu><percent>0.5</percent></cpu></service>"
        )
    }

    #[test]
    fn monit_states_map_to_component_states() {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><monit><server/>\
             <service type=\"5\"><name>vm</name><status>0</status></service>{}{}{}{}{}{}{}{}{}</monit>",
            svc("up", 0, 1, 0, Some(42)),
            svc("gone", 512, 1, 0, None),
            svc("off", 0, 0, 0, None),
            svc("init", 0, 2, 0, None),
            svc("restarting", 0, 1, 2, Some(42)),
            // As monit 5.33 shows them (tests/it/monit_states.rs drives it):
            // `monit start` of a stopped service, its start program running.
            svc("start_pending", 0, 0, 6, None),
            // `monit stop` whose stop program hangs.
            svc("stop_pending", 0, 1, 3, Some(42)),
            // A start program that never writes the pidfile, retried by monit.
            svc("never_up", 4608, 2, 0, None),
            // Restarted: initializing, the restart still pending.
            svc("restart_init", 0, 2, 2, None),
        );
        let got: Vec<(String, String, Option<u32>)> = parse_status(&xml)
            .expect("parse")
            .into_iter()
            .map(|c| (c.name, c.status, c.pid))
            .collect();
        let want = [
            ("up", "RUNNING", Some(42)),
            ("gone", "DOWN", None),
            ("off", "STOPPED", None),
            ("init", "STARTING", None),
            ("restarting", "STARTING", Some(42)),
            ("start_pending", "STARTING", None),
            ("stop_pending", "STOPPING", Some(42)),
            ("never_up", "DOWN", None),
            ("restart_init", "STARTING", None),
        ];
        let want: Vec<(String, String, Option<u32>)> = want
            .iter()
            .map(|(n, s, p)| (n.to_string(), s.to_string(), *p))
            .collect();
        assert_eq!(got, want);
        assert!(parse_status("<not xml").is_err());
    }

    #[test]
    fn the_socket_is_read_from_the_control_file() {
        let t = private_control(Path::new("/x/y"));
        assert_eq!(socket_of(&t), Some(PathBuf::from("/x/y/monit.sock")));
        assert_eq!(socket_of("# set httpd unixsocket /no\nset daemon 5"), None);
    }

    #[test]
    fn the_http_interface_is_found_in_debians_forms_and_comments_are_ignored() {
        let debian = "set daemon 120\n# set httpd port 2812 and\n#    use address localhost\n#    allow admin:monit\ninclude /etc/monit/conf.d/*\n";
        assert_eq!(httpd_of(debian), None);
        let tcp = "set daemon 120\nset httpd port 2812 and\n    use address localhost  # only localhost\n    allow localhost\n    allow admin:monit      # user and password\n    allow @monit\nset logfile syslog\nset httpd port 9 allow other:pw\n";
        assert_eq!(
            httpd_of(tcp),
            Some(Httpd::Tcp {
                addr: "localhost:2812".into(),
                auth: Some("admin:monit".into())
            })
        );
        assert_eq!(
            httpd_of("set httpd port 2812 use address ::1 allow \"a:b\""),
            Some(Httpd::Tcp {
                addr: "[::1]:2812".into(),
                auth: Some("a:b".into())
            })
        );
        assert_eq!(
            httpd_of(
                "set httpd port 2812 allow 127.0.0.1\ncheck process x with pidfile /p\n  allow u:p"
            ),
            Some(Httpd::Tcp {
                addr: "localhost:2812".into(),
                auth: None
            })
        );
        assert_eq!(
            httpd_of(&drop_in_text(Path::new("/run/m.sock"))),
            Some(Httpd::Socket("/run/m.sock".into()))
        );
    }

    #[test]
    fn the_http_interface_is_looked_for_in_included_files_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("conf.d");
        std::fs::create_dir(&conf).expect("mkdir");
        let control = dir.path().join("monitrc");
        std::fs::write(
            &control,
            format!("set daemon 60\ninclude {}/*\n", conf.display()),
        )
        .expect("write");
        std::fs::write(
            conf.join("nats.monitrc"),
            "check process nats with pidfile /p\n",
        )
        .expect("write");
        assert_eq!(find_httpd(&control), None);
        std::fs::write(conf.join("zz-httpd"), "set httpd unixsocket /run/x.sock\n").expect("w");
        assert_eq!(
            find_httpd(&control),
            Some(Httpd::Socket("/run/x.sock".into()))
        );
        // Only files the glob names.
        std::fs::write(&control, format!("include {}/*.conf\n", conf.display())).expect("w");
        assert_eq!(find_httpd(&control), None);
    }

    #[tokio::test]
    async fn a_monit_with_its_http_interface_off_gets_the_drop_in_and_one_already_on_is_left_alone()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("conf.d");
        std::fs::create_dir(&conf).expect("mkdir");
        let control = dir.path().join("monitrc");
        let debian = format!(
            "set daemon 120\nset pidfile {d}/monit.pid\nset idfile {d}/monit.id\nset statefile {d}/monit.state\n\
             # set httpd port 2812 and\n#     allow admin:monit\ninclude {d}/conf.d/*\n",
            d = dir.path().display()
        );
        write_private(&control, debian.as_bytes()).expect("write");
        let drop_in = conf.join("deployment-engine-httpd");
        let socket = dir.path().join("m.sock");
        // monit -t checks the drop-in for real; monit is not running, so the
        // reload fails quietly (it reads the drop-in when it starts).
        let m = Monit::open_httpd(&control, &conf, &drop_in, &socket)
            .await
            .expect("opened");
        assert_eq!(m.httpd, Some(Httpd::Socket(socket.clone())));
        assert_eq!(
            std::fs::read_to_string(&drop_in).expect("drop-in"),
            drop_in_text(&socket)
        );
        assert_eq!(
            std::fs::read_to_string(&control).expect("control"),
            debian,
            "monitrc untouched"
        );
        // Already on (the drop-in, or the operator's own): nothing is written.
        std::fs::remove_file(&drop_in).expect("rm");
        std::fs::write(
            conf.join("operator"),
            "set httpd port 2812 allow admin:pw\n",
        )
        .expect("w");
        let m = Monit::open_httpd(&control, &conf, &drop_in, &socket)
            .await
            .expect("as is");
        assert!(matches!(m.httpd, Some(Httpd::Tcp { .. })));
        assert!(!drop_in.exists());
    }

    #[test]
    fn component_names_cannot_escape_the_include_dir() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", "x;rm"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["nats", "nats_0", "cloud-controller.1"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
