//! The agent's monit: the system one, or a private instance named by
//! `--monit-control FILE` (created with its own socket, pid, state and id
//! files next to it when missing). Checks live one file per component in the
//! control file's include directory; status comes from monit's XML status
//! over its unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use de_common::{ComponentStatus, MonitOp, write_private};

/// The system monit's control file on Debian.
pub(crate) const SYSTEM_CONTROL: &str = "/etc/monit/monitrc";
const SYSTEM_INCLUDE: &str = "/etc/monit/conf.d";

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

/// How to reach one monit instance.
#[derive(Debug, Clone)]
pub struct Monit {
    control: PathBuf,
    include_dir: PathBuf,
    socket: Option<PathBuf>,
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
fn socket_of(control_text: &str) -> Option<PathBuf> {
    control_text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut w = l.split_whitespace();
            while let Some(tok) = w.next() {
                if tok == "unixsocket" {
                    return w.next().map(PathBuf::from);
                }
            }
            None
        })
}

impl Monit {
    /// The system monit (checks in /etc/monit/conf.d).
    pub fn system() -> Monit {
        let socket = std::fs::read_to_string(SYSTEM_CONTROL)
            .ok()
            .and_then(|t| socket_of(&t));
        Monit {
            control: PathBuf::from(SYSTEM_CONTROL),
            include_dir: PathBuf::from(SYSTEM_INCLUDE),
            socket,
            private: false,
        }
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
            socket: socket_of(&text),
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
            socket: self.socket.clone().unwrap_or_default(),
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

    async fn status_xml(&self) -> Result<String, MonitError> {
        let socket = self.socket.clone().ok_or_else(|| MonitError::Status {
            socket: PathBuf::new(),
            why: format!(
                "{} has no 'set httpd unixsocket PATH' line",
                self.control.display()
            ),
        })?;
        let err = |why: String| MonitError::Status {
            socket: socket.clone(),
            why,
        };
        let fetch = async {
            let mut s = tokio::net::UnixStream::connect(&socket)
                .await
                .map_err(|e| err(e.to_string()))?;
            s.write_all(b"GET /_status?format=xml&level=full HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .await
                .map_err(|e| err(e.to_string()))?;
            let mut buf = Vec::new();
            s.take(4 << 20)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| err(e.to_string()))?;
            Ok::<_, MonitError>(buf)
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
            socket: self.socket.clone().unwrap_or_default(),
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
        // 3 stop, 4 exec, 5 unmonitor, 6 start, 7 monitor.
        // A failing check (status bits set) is DOWN even while monit retries the start.
        let state = if matches!(pending, 3 | 5) {
            "STOPPING"
        } else if monitor == 0 {
            "STOPPED"
        } else if status != 0 {
            "DOWN"
        } else if matches!(pending, 2 | 6 | 7) || monitor == 2 {
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
             <service type=\"5\"><name>vm</name><status>0</status></service>{}{}{}{}{}</monit>",
            svc("up", 0, 1, 0, Some(42)),
            svc("gone", 512, 1, 0, None),
            svc("off", 0, 0, 0, None),
            svc("init", 0, 2, 0, None),
            svc("restarting", 0, 1, 2, Some(42)),
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
    fn component_names_cannot_escape_the_include_dir() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", "x;rm"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["nats", "nats_0", "cloud-controller.1"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
