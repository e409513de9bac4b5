//! `dectl`: the operators' command line for a Deployment Engine controller —
//! install codes, nodes, plans (and what a deploy would do), deployments
//! (with live progress, and cancel), status, start/restart/stop, logs and
//! ad-hoc commands, all through the controller's API.
//!
//! Errors from the API are printed as the API words them; the exit code is 1
//! when the controller refused or something failed, 2 when it could not be
//! reached or the token could not be read. `--json` prints the API's JSON.
//!
//! Answers are read into the API's own types (`de_common::api`), the ones the
//! controller answers with, and nodes are matched by the API's rule
//! (`resolve`); one function per subcommand, `run` dispatches.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use de_common::api::{
    ChangeAction, CodeView, DeployStarted, DeployState, DeploymentView, ErrorBody, ExecRequest,
    ExecResult, LogFiles, NewCode, NodeUpdate, NodeView, OperateRequest, OperateRow, PhaseState,
    PlanCheck, PlanCreated, PlanDiff, Resolved, StatusRow, resolve,
};
use de_common::api::{NewToken, PkiView, RetireCa, Role, TokenCreated, TokenView};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(name = "dectl", version, about = "Deployment Engine command line")]
struct Cli {
    /// dectl's config file (TOML: `controller`, `token_file`, `ca_cert`)
    /// [default: ~/.config/dectl/config.toml ($XDG_CONFIG_HOME) when it
    /// exists]. Flags and DECTL_* variables override its values.
    #[arg(long, env = "DECTL_CONFIG", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The controller's API URL [default: the config file's, else
    /// http://127.0.0.1:50000].
    #[arg(long, env = "DECTL_CONTROLLER", global = true)]
    controller: Option<String>,
    /// File holding the API token (the controller's DATA/admin.token)
    /// [default: the config file's, else ./de-data/admin.token].
    #[arg(long, env = "DECTL_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The CA that vouches for an https:// controller (PEM) [default: ca.pem
    /// beside the token file when it is there (the controller's DATA/ca.pem),
    /// else the public web PKI's roots].
    #[arg(long, env = "DECTL_CA_CERT", global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install codes: `new [--ttl SECS]`, `show`, `end`.
    Codes {
        #[command(subcommand)]
        what: Codes,
    },
    /// Enrolled nodes with hardware, usage and online state;
    /// `nodes set-ip NODE IP...` changes a node's IPs.
    Nodes {
        #[command(subcommand)]
        what: Option<NodesCmd>,
    },
    /// Revoke a node (by id or IP): its link is dropped and its certificate
    /// refused from then on; enrol it again with a new code to use it.
    Revoke { node: String },
    /// Plans: `validate FILE`, `apply FILE`, `show`, `diff`.
    Plan {
        #[command(subcommand)]
        what: Plan,
    },
    /// Deploy the current plan; `--follow` shows progress until it ends.
    /// `deploy cancel [ID]` cancels the running deployment; `deploy pause
    /// [ID]` pauses it (the steps in flight finish, no new one starts) and
    /// `deploy resume [ID]` resumes it.
    #[command(args_conflicts_with_subcommands = true)]
    Deploy {
        #[arg(long)]
        follow: bool,
        #[command(subcommand)]
        what: Option<Deploy>,
    },
    /// Deployments: all, or one with its steps.
    Deployments { id: Option<String> },
    /// Every component instance with its state.
    Status,
    /// Start a component (on one IP, or everywhere); one stopped with `stop`
    /// stays stopped, across deployments too, until started or restarted.
    Start {
        component: String,
        ip: Option<String>,
    },
    /// Restart a component (on one IP, or everywhere).
    Restart {
        component: String,
        ip: Option<String>,
    },
    /// Stop a component (on one IP, or everywhere).
    Stop {
        component: String,
        ip: Option<String>,
    },
    /// Log files: `list`, `get NAME [--tail N]`, `follow [--tail N]`.
    Logs {
        #[command(subcommand)]
        what: Logs,
    },
    /// Run a shell command on nodes (default: every online node).
    Exec {
        command: String,
        /// Node IPs or ids, comma separated.
        #[arg(long, value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// The CA dectl trusts for an https:// controller and the key the
    /// controller's API presents: fingerprints for others to check and pin
    /// (`curl --pinnedpubkey`, a browser's certificate viewer).
    Ca,
    /// Artifacts for `fetch` steps: `upload FILE [--name NAME]`, `list`, `delete NAME`.
    Artifacts {
        #[command(subcommand)]
        what: ArtifactCmd,
    },
    /// API tokens: `create NAME --role ROLE`, `list`, `revoke NAME` (admin only).
    Tokens {
        #[command(subcommand)]
        what: TokenCmd,
    },
    /// The controller's keys: `show`, `rotate-step-key`, `rotate-ca`, `retire-old-ca` (admin only to change).
    Pki {
        #[command(subcommand)]
        what: PkiCmd,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// The CA and step key fingerprints, and the nodes still on the old CA.
    Show,
    /// A new step key signs every new step; steps queued before still run.
    RotateStepKey,
    /// A new CA issues node certificates; the old one stays trusted until retired.
    RotateCa,
    /// Stop trusting the old CA once every node renewed from the new one.
    RetireOldCa {
        /// Retire even though nodes still hold an old certificate (they must enrol again).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ArtifactCmd {
    /// Upload files (`upload *.deb`; each streamed, its SHA-256 computed
    /// here and checked by the controller). A name defaults to the file's;
    /// `--name` renames a single file.
    Upload {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        name: Option<String>,
    },
    /// The artifacts the controller holds.
    List,
    /// Delete an artifact (its bytes go when no other name refers to them).
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Create a token; it is printed this once.
    Create {
        name: String,
        /// read-only, operator or admin.
        #[arg(long)]
        role: Role,
    },
    /// The tokens with their roles (never the tokens themselves).
    List,
    /// Revoke a token: it is refused from then on.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
enum NodesCmd {
    /// Set the IPs of a node (by id or IP) after its address changed;
    /// `--allow-nat`/`--no-nat` let its links come from other addresses or not.
    SetIp {
        node: String,
        ips: Vec<String>,
        #[arg(long, conflicts_with = "no_nat")]
        allow_nat: bool,
        #[arg(long)]
        no_nat: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Codes {
    New {
        #[arg(long)]
        ttl: Option<u64>,
    },
    Show,
    End,
}

#[derive(Subcommand, Debug)]
enum Plan {
    Validate {
        file: PathBuf,
    },
    Apply {
        file: PathBuf,
    },
    Show,
    /// What a deployment would do now, per instance, and why.
    Diff,
}

#[derive(Subcommand, Debug)]
enum Deploy {
    /// Cancel a running deployment: its steps are withdrawn or killed.
    Cancel {
        /// The deployment (default: the one running).
        id: Option<String>,
    },
    /// Pause a running deployment: the steps in flight finish, no new one starts.
    Pause {
        /// The deployment (default: the one running).
        id: Option<String>,
    },
    /// Resume a paused deployment.
    Resume {
        /// The deployment (default: the one running).
        id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum Logs {
    /// The log file names.
    List,
    /// One file, whole or its last N lines. On a terminal, control
    /// characters (escape sequences) are shown as `^[` and the like;
    /// redirected, the file comes as it is.
    Get {
        name: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        tail: Option<u32>,
    },
    /// local.log live, as it is written (after its last N lines), control
    /// characters shown as `^[` and the like; Ctrl-C stops.
    Follow {
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        tail: u32,
    },
}

/// Why a command failed: the line to print and the exit code.
struct Failure(String, u8);

type Outcome = Result<(), Failure>;

struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
    /// The roots an https:// controller is checked against (`None`: web PKI).
    ca: Option<Ca>,
}

/// The CA file dectl trusts, read.
struct Ca {
    path: PathBuf,
    certs: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl Ca {
    fn read(path: PathBuf) -> Result<Ca, Failure> {
        use rustls_pki_types::pem::PemObject;
        let bytes = std::fs::read(&path).map_err(|e| {
            Failure(
                format!(
                    "cannot read the CA certificate {}: {e}; pass --ca-cert (the controller's DATA/ca.pem) or set DECTL_CA_CERT",
                    path.display()
                ),
                2,
            )
        })?;
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(Failure(
                format!("{} holds no PEM certificate", path.display()),
                2,
            ));
        }
        Ok(Ca { path, certs })
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.certs {
            let _ = roots.add(c.clone());
        }
        roots
    }
}

/// A TLS connection to `host:port` checked against `ca` (or the web PKI),
/// for the WebSocket and `dectl ca`, which ureq does not serve.
fn tls_connect(
    ca: Option<&Ca>,
    host_port: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>, String> {
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => host_port,
    };
    let roots = match ca {
        Some(ca) => ca.roots(),
        None => rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host}: {e}"))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| e.to_string())?;
    let sock = std::net::TcpStream::connect(host_port).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    tls.sock.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(tls)
}

/// One answer of the API, and the request it answers (for messages).
struct Reply {
    request: String,
    status: u16,
    text: String,
}

impl Reply {
    /// The answer to `request` (sent to `url`), its body read whole.
    fn read(
        request: String,
        url: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<Reply, Failure> {
        let status = resp.status().as_u16();
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .map_err(|e| Failure(format!("reading the answer from {url}: {e}"), 2))?;
        Ok(Reply {
            request,
            status,
            text,
        })
    }

    /// The API's own words for a refusal.
    fn check(self) -> Result<Reply, Failure> {
        if self.status < 300 {
            return Ok(self);
        }
        let Ok(err) = serde_json::from_str::<ErrorBody>(&self.text) else {
            return Err(Failure(
                format!("{} (HTTP {})", self.text.trim(), self.status),
                1,
            ));
        };
        let mut line = format!("{} (HTTP {})", err.message, self.status);
        for p in &err.problems {
            let comp = p.component.as_deref().unwrap_or("-");
            let ip = p.ip.as_deref().unwrap_or("-");
            line.push_str(&format!("\n  - {comp} {ip}: {}", p.problem));
        }
        Err(Failure(line, 1))
    }

    /// The answer as the API type `T`.
    fn parse<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        serde_json::from_str(&self.text).map_err(|e| {
            Failure(
                format!(
                    "the controller's answer to {} is not what this dectl understands ({e}); is dectl the controller's version?",
                    self.request
                ),
                1,
            )
        })
    }

    /// Prints the API's JSON (`--json`), pretty; a body that is not JSON as a JSON string.
    fn print_json(&self) {
        let v = serde_json::from_str(&self.text).unwrap_or(Value::String(self.text.clone()));
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<String>) -> Result<Reply, Failure> {
        let url = format!("{}{path}", self.base);
        let req = ureq::http::Request::builder()
            .method(method)
            .uri(&url)
            .header("Authorization", format!("Bearer {}", self.token));
        let req = match body {
            Some(b) => req.header("Content-Type", "application/json").body(b),
            None => req.body(String::new()),
        }
        .map_err(|e| Failure(format!("bad request to {url}: {e}"), 2))?;
        let resp = self.agent.run(req).map_err(|e| {
            // ureq reports a refused certificate as TLS or as I/O wrapping rustls' error.
            let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
                || e.to_string().contains("peer certificate");
            let hint = match (tls, &self.ca) {
                (true, Some(ca)) => format!(
                    "; its certificate is not from the CA in {} (pass the controller's DATA/ca.pem with --ca-cert)",
                    ca.path.display()
                ),
                (true, None) => {
                    "; pass the controller's DATA/ca.pem with --ca-cert (or set DECTL_CA_CERT)".to_owned()
                }
                (false, _) => String::new(),
            };
            Failure(
                format!("cannot reach the controller at {}: {e}{hint}", self.base),
                2,
            )
        })?;
        Reply::read(format!("{method} {path}"), &url, resp)
    }

    /// A request whose refusal is a failure.
    fn ok(&self, method: &str, path: &str, body: Option<String>) -> Result<Reply, Failure> {
        self.call(method, path, body)?.check()
    }

    fn get(&self, path: &str) -> Result<Reply, Failure> {
        self.ok("GET", path, None)
    }
}

/// A request body as JSON text.
fn body<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", table_text(header, rows));
}

/// Rows as aligned columns, a line each (the header first).
fn table_text(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w.get(i).copied().unwrap_or(0)))
            .collect();
        out.push_str(s.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
    out
}

/// An optional value as a table cell: `-` when absent.
fn cell<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A state or kind as the API words it (`running`, `install`).
fn word<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "-".to_owned(),
    }
}

fn read_plan(file: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(file).map_err(|e| {
        Failure(
            format!("cannot read the plan file {}: {e}", file.display()),
            1,
        )
    })
}

fn run(cli: Cli, api: &Api) -> Outcome {
    let json = cli.json;
    match cli.command {
        Command::Codes { what } => codes(api, what, json),
        Command::Nodes { what: None } => nodes(api, json),
        Command::Nodes {
            what:
                Some(NodesCmd::SetIp {
                    node,
                    ips,
                    allow_nat,
                    no_nat,
                }),
        } => set_ip(api, &node, ips, allow_nat, no_nat, json),
        Command::Revoke { node } => revoke(api, &node, json),
        Command::Plan { what } => plan(api, what, json),
        Command::Deploy {
            what: Some(Deploy::Cancel { id }),
            ..
        } => act_on_deployment(api, "cancel", id, json),
        Command::Deploy {
            what: Some(Deploy::Pause { id }),
            ..
        } => act_on_deployment(api, "pause", id, json),
        Command::Deploy {
            what: Some(Deploy::Resume { id }),
            ..
        } => act_on_deployment(api, "resume", id, json),
        Command::Deploy { follow, what: None } => deploy(api, follow, json),
        Command::Deployments { id } => deployments(api, id.as_deref(), json),
        Command::Status => status(api, json),
        Command::Start { component, ip } => operate(api, "start", &component, ip, json),
        Command::Restart { component, ip } => operate(api, "restart", &component, ip, json),
        Command::Stop { component, ip } => operate(api, "stop", &component, ip, json),
        Command::Logs { what } => logs(api, what, json),
        Command::Exec {
            command,
            targets,
            timeout,
        } => exec(api, command, targets, timeout, json),
        Command::Tokens { what } => tokens(api, what, json),
        Command::Ca => ca(api, json),
        Command::Artifacts { what } => artifacts(api, what, json),
        Command::Pki { what } => pki(api, what, json),
    }
}

fn artifacts(api: &Api, what: ArtifactCmd, json: bool) -> Outcome {
    use de_common::api::ArtifactView;
    let reply = match what {
        ArtifactCmd::Upload { files, name } => {
            if name.is_some() && files.len() != 1 {
                return Err(Failure(
                    "--name names one file: upload several files under their own names".into(),
                    1,
                ));
            }
            let mut replies = Vec::new();
            for file in &files {
                replies.push(upload_one(api, file, name.clone())?);
            }
            if json {
                replies.iter().for_each(Reply::print_json);
                return Ok(());
            }
            let rows = replies
                .iter()
                .map(Reply::parse::<ArtifactView>)
                .collect::<Result<Vec<_>, _>>()?;
            return artifact_table(rows);
        }
        ArtifactCmd::List => api.get("/api/v1/artifacts")?,
        ArtifactCmd::Delete { name } => {
            api.ok("DELETE", &format!("/api/v1/artifacts/{name}"), None)?
        }
    };
    if json {
        reply.print_json();
        return Ok(());
    }
    let rows: Vec<ArtifactView> = match reply.parse::<Vec<ArtifactView>>() {
        Ok(all) => all,
        Err(_) => vec![reply.parse::<ArtifactView>()?],
    };
    artifact_table(rows)
}

fn artifact_table(rows: Vec<de_common::api::ArtifactView>) -> Outcome {
    table(
        &["NAME", "SIZE", "SHA256", "UPLOADED", "PACKAGE"],
        &rows
            .into_iter()
            .map(|a| {
                vec![
                    a.name,
                    a.size.to_string(),
                    a.sha256,
                    a.uploaded_at,
                    a.deb.unwrap_or_else(|| "-".into()),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(())
}

/// Uploads one file: its SHA-256 computed here first, so the controller
/// refuses bytes that changed on the way.
fn upload_one(api: &Api, file: &std::path::Path, name: Option<String>) -> Result<Reply, Failure> {
    let name = match name {
        Some(n) => n,
        None => file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                Failure(
                    format!("{} has no file name: pass --name", file.display()),
                    1,
                )
            })?,
    };
    let unreadable = |e: std::io::Error| Failure(format!("cannot read {}: {e}", file.display()), 1);
    // The hash first, so the controller refuses bytes that changed on the way.
    let mut f = std::fs::File::open(file).map_err(unreadable)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let sha: String = hash
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let f = std::fs::File::open(file).map_err(unreadable)?;
    // '+' (as in Debian versions) means a space in a query: escape it.
    let escaped: String = name
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    let url = format!("{}/api/v1/artifacts?name={escaped}&sha256={sha}", api.base);
    let resp = api
        .agent
        .post(&url)
        .header("Authorization", format!("Bearer {}", api.token))
        .header("Content-Type", "application/octet-stream")
        .send(f)
        .map_err(|e| {
            Failure(
                format!("cannot reach the controller at {}: {e}", api.base),
                2,
            )
        })?;
    Reply::read("POST /api/v1/artifacts".to_owned(), &url, resp)?.check()
}

/// `dectl ca`: the CA dectl trusts and the key the controller presents.
fn ca(api: &Api, json: bool) -> Outcome {
    use de_controller::http::tls::{fingerprint, pin_of};
    let Some(rest) = api.base.strip_prefix("https://") else {
        return Err(Failure(
            format!(
                "{} is plain HTTP: there is no certificate to show (turn on api_tls on the controller and use https://)",
                api.base
            ),
            1,
        ));
    };
    let host_port = rest.split('/').next().unwrap_or(rest);
    let tls = tls_connect(api.ca.as_ref(), host_port).map_err(|e| {
        Failure(
            format!("cannot make a verified TLS connection to {host_port}: {e}"),
            2,
        )
    })?;
    let leaf = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| Failure("the controller sent no certificate".into(), 2))?;
    let pin = pin_of(leaf).map_err(|e| Failure(e.to_string(), 2))?;
    let ca_file = api.ca.as_ref().map(|c| c.path.display().to_string());
    let ca_sha = api
        .ca
        .as_ref()
        .and_then(|c| c.certs.first())
        .map(fingerprint);
    if json {
        let v = serde_json::json!({"ca_file": ca_file, "ca_sha256": ca_sha, "api_pin": pin});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        match (ca_file, ca_sha) {
            (Some(f), Some(s)) => println!("CA file:        {f}\nCA SHA-256:     {s}"),
            _ => println!("CA:             the public web PKI's roots"),
        }
        println!("API key pin:    {pin}");
    }
    Ok(())
}

fn pki(api: &Api, what: PkiCmd, json: bool) -> Outcome {
    let reply = match what {
        PkiCmd::Show => api.get("/api/v1/pki")?,
        PkiCmd::RotateStepKey => api.ok("POST", "/api/v1/pki/rotate-step-key", None)?,
        PkiCmd::RotateCa => api.ok("POST", "/api/v1/pki/rotate-ca", None)?,
        PkiCmd::RetireOldCa { force } => api.ok(
            "POST",
            "/api/v1/pki/retire-old-ca",
            body(&RetireCa { force }),
        )?,
    };
    if json {
        reply.print_json();
        return Ok(());
    }
    let k: PkiView = reply.parse()?;
    println!("CA            {}", k.ca);
    println!("previous CA   {}", cell(k.previous_ca));
    println!("step key      {}", k.step_key);
    println!(
        "previous key  {} (until {})",
        cell(k.previous_step_key),
        cell(k.previous_step_key_until)
    );
    if !k.nodes_on_previous_ca.is_empty() {
        println!(
            "nodes still on the previous CA: {}",
            k.nodes_on_previous_ca.join(", ")
        );
    }
    Ok(())
}

fn tokens(api: &Api, what: TokenCmd, json: bool) -> Outcome {
    match what {
        TokenCmd::Create { name, role } => {
            let reply = api.ok("POST", "/api/v1/tokens", body(&NewToken { name, role }))?;
            if json {
                reply.print_json();
                return Ok(());
            }
            let t: TokenCreated = reply.parse()?;
            println!("{}", t.token);
            eprintln!(
                "token {:?} ({}) created: it is shown only this once; keep it in a file readable only by its user and pass that file with --token-file",
                t.name, t.role
            );
        }
        TokenCmd::List => {
            let reply = api.get("/api/v1/tokens")?;
            if json {
                reply.print_json();
                return Ok(());
            }
            let all: Vec<TokenView> = reply.parse()?;
            let rows: Vec<Vec<String>> = all
                .into_iter()
                .map(|t| vec![t.name, t.role.to_string(), t.created_at, t.created_by])
                .collect();
            table(&["NAME", "ROLE", "CREATED", "BY"], &rows);
        }
        TokenCmd::Revoke { name } => {
            let path = format!("/api/v1/tokens/{name}");
            api.ok("DELETE", &path, None)?;
            if !json {
                println!("token {name:?} revoked: it is refused from now on");
            }
        }
    }
    Ok(())
}

fn codes(api: &Api, what: Codes, json: bool) -> Outcome {
    let reply = match what {
        Codes::New { ttl } => {
            let req = ttl.and_then(|t| {
                body(&NewCode {
                    ttl_secs: Some(t),
                    nodes: None,
                })
            });
            api.ok("POST", "/api/v1/install-codes", req)?
        }
        Codes::Show => api.get("/api/v1/install-codes")?,
        Codes::End => {
            api.ok("DELETE", "/api/v1/install-codes", None)?;
            if !json {
                println!("installation ended: no code is open");
            }
            return Ok(());
        }
    };
    if json {
        reply.print_json();
        return Ok(());
    }
    let c: CodeView = reply.parse()?;
    let left = c.expires_in_secs;
    println!(
        "code {} (expires {}, in {}:{:02}:{:02})",
        c.code,
        c.expires_at,
        left / 3600,
        left % 3600 / 60,
        left % 60
    );
    println!("on each node: {}", c.agent_command);
    Ok(())
}

fn nodes(api: &Api, json: bool) -> Outcome {
    let reply = api.get("/api/v1/nodes")?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let nodes: Vec<NodeView> = reply.parse()?;
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let state = if n.revoked {
                "revoked"
            } else if n.online {
                "online"
            } else {
                "offline"
            };
            // Two machines present this node's certificate: shown until revoked.
            let state = match n.identity_conflict {
                Some(_) => format!("{state}, cloned"),
                None => state.to_owned(),
            };
            vec![
                n.id.clone(),
                n.ips.join(","),
                n.hostname.clone(),
                state,
                format!(
                    "{} cpu, {} MB, {} MB disk",
                    n.hardware.cpus, n.hardware.ram_mb, n.hardware.disk_mb
                ),
                format!(
                    "cpu {:.0}% mem {:.0}% disk {:.0}%",
                    n.usage.cpu_pct, n.usage.mem_pct, n.usage.disk_pct
                ),
                cell(n.last_seen.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "IPS",
            "HOST",
            "STATE",
            "HARDWARE",
            "USAGE",
            "LAST SEEN",
        ],
        &rows,
    );
    // Where a node's link disagreed with its IPs, say so under the table.
    for n in nodes.iter().filter(|n| !n.revoked) {
        if let Some(why) = &n.ip_mismatch {
            println!("{}: {why}", n.id);
        }
    }
    Ok(())
}

/// Revokes the node `target` names, by the API's rule ([`resolve`]).
fn revoke(api: &Api, target: &str, json: bool) -> Outcome {
    let nodes: Vec<NodeView> = api.get("/api/v1/nodes")?.parse()?;
    // Revoking is for good: where several live records share the IP (a node
    // enrolled again leaves a stale one), the operator names which by id,
    // rather than the rule picking the online one behind their back.
    let sharing: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| !n.revoked && n.is_named(target))
        .collect();
    if sharing.len() > 1 {
        let ids: Vec<String> = sharing
            .iter()
            .map(|n| {
                let state = if n.online { "online" } else { "offline" };
                format!("{} ({state})", n.id)
            })
            .collect();
        return Err(Failure(
            format!(
                "several nodes have the IP {target}: {}; revoke one by its id",
                ids.join(", ")
            ),
            1,
        ));
    }
    let id = match resolve(&nodes, target) {
        Resolved::Node(n) => n.id.clone(),
        Resolved::Unknown | Resolved::Revoked(_) => {
            return Err(Failure(
                format!(
                    "no enrolled node that is not revoked has the id or IP {target:?}; dectl nodes lists them"
                ),
                1,
            ));
        }
        Resolved::Ambiguous(many) => {
            let ids: Vec<&str> = many.iter().map(|n| n.id.as_str()).collect();
            return Err(Failure(
                format!(
                    "several nodes have the IP {target}: {}; revoke one by its id",
                    ids.join(", ")
                ),
                1,
            ));
        }
    };
    api.ok("DELETE", &format!("/api/v1/nodes/{id}"), None)?;
    if !json {
        println!("revoked node {id} ({target}): its link is closed and its certificate refused");
    }
    Ok(())
}

/// Changes the IPs (and NAT allowance) of the node `target` names.
fn set_ip(
    api: &Api,
    target: &str,
    ips: Vec<String>,
    allow_nat: bool,
    no_nat: bool,
    json: bool,
) -> Outcome {
    let nodes: Vec<NodeView> = api.get("/api/v1/nodes")?.parse()?;
    let id = match resolve(&nodes, target) {
        Resolved::Node(n) => n.id.clone(),
        Resolved::Ambiguous(many) => {
            let ids: Vec<&str> = many.iter().map(|n| n.id.as_str()).collect();
            return Err(Failure(
                format!(
                    "several nodes have the IP {target}: {}; name one by its id",
                    ids.join(", ")
                ),
                1,
            ));
        }
        Resolved::Unknown | Resolved::Revoked(_) => {
            return Err(Failure(
                format!(
                    "no enrolled node that is not revoked has the id or IP {target:?}; dectl nodes lists them"
                ),
                1,
            ));
        }
    };
    let update = NodeUpdate {
        ips: (!ips.is_empty()).then_some(ips),
        allow_nat: match (allow_nat, no_nat) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
    };
    let reply = api.ok("PUT", &format!("/api/v1/nodes/{id}"), body(&update))?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let node: NodeView = reply.parse()?;
    println!(
        "node {id}: IPs {}{}",
        node.ips.join(","),
        if node.allow_nat {
            ", links from other addresses allowed (NAT)"
        } else {
            ""
        }
    );
    Ok(())
}

fn plan(api: &Api, what: Plan, json: bool) -> Outcome {
    let (reply, message) = match what {
        Plan::Validate { file } => {
            let r = api.ok("POST", "/api/v1/plan/validate", Some(read_plan(&file)?))?;
            let m = (!json)
                .then(|| r.parse::<PlanCheck<IgnoredAny>>().map(|c| c.message))
                .transpose()?;
            (r, m)
        }
        Plan::Apply { file } => {
            let r = api.ok("POST", "/deployment-engine/config", Some(read_plan(&file)?))?;
            let m = (!json)
                .then(|| r.parse::<PlanCreated>().map(|c| c.message))
                .transpose()?;
            (r, m)
        }
        // The plan document itself: printed as JSON.
        Plan::Show => (api.get("/deployment-engine/config")?, None),
        Plan::Diff => return plan_diff(api, json),
    };
    match message {
        Some(m) => println!("{m}"),
        None => reply.print_json(),
    }
    Ok(())
}

/// What a deployment would do now: a row per instance, then the step count
/// and the nodes that are offline.
fn plan_diff(api: &Api, json: bool) -> Outcome {
    let reply = api.get("/api/v1/plan/diff")?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let diff: PlanDiff = reply.parse()?;
    print!("{}", diff_text(&diff));
    Ok(())
}

/// `dectl plan diff`'s table and summary line.
fn diff_text(d: &PlanDiff) -> String {
    let rows: Vec<Vec<String>> = d
        .instances
        .iter()
        .map(|c| {
            // Empty when no enrolled node has the IP (the instance is named on its node).
            let text = |s: &str| cell(Some(s).filter(|s| !s.is_empty()));
            vec![
                c.component.clone(),
                text(&c.instance),
                c.ip.clone(),
                word(&c.action),
                text(&c.why),
            ]
        })
        .collect();
    let mut out = table_text(&["COMPONENT", "INSTANCE", "IP", "ACTION", "WHY"], &rows);
    out.push_str(&diff_summary(d));
    out.push('\n');
    out
}

/// The line under the diff: how many steps a deployment would run, of which
/// revisions, and which nodes it would find offline.
fn diff_summary(d: &PlanDiff) -> String {
    let applied = match d.applied_revision {
        0 => "none applied yet".to_owned(),
        r => format!("revision {r} applied"),
    };
    let changes = d
        .instances
        .iter()
        .filter(|c| c.action != ChangeAction::Nothing)
        .count();
    let mut line = if d.steps == 0 && changes == 0 {
        format!(
            "nothing to do: a deployment would run 0 steps (plan revision {}, {applied})",
            d.plan_revision
        )
    } else {
        format!(
            "a deployment would run {} step{} (plan revision {}, {applied})",
            d.steps,
            if d.steps == 1 { "" } else { "s" },
            d.plan_revision
        )
    };
    if !d.offline.is_empty() {
        line.push_str(&format!(
            "; offline: {} (a deployment is refused until they are back)",
            d.offline.join(", ")
        ));
    }
    line
}

fn deploy(api: &Api, follow: bool, json: bool) -> Outcome {
    let reply = api.ok("GET", "/deployment-engine/deploy", None)?;
    if json && !follow {
        reply.print_json();
        return Ok(());
    }
    let d: DeployStarted = reply.parse()?;
    println!("deployment {} started ({} steps)", d.id, d.steps);
    if follow {
        follow_deployment(api, &d.id)?;
    }
    Ok(())
}

/// The deployment that is running, of a list newest first.
fn running_deployment(all: &[DeploymentView]) -> Option<&DeploymentView> {
    all.iter().find(|d| d.state == DeployState::Running)
}

/// Cancels, pauses or resumes (`verb`) deployment `id`, or the one running.
fn act_on_deployment(api: &Api, verb: &str, id: Option<String>, json: bool) -> Outcome {
    let id = match id {
        Some(id) => id,
        None => {
            let all: Vec<DeploymentView> = api.get("/api/v1/deployments")?.parse()?;
            running_deployment(&all)
                .map(|d| d.id.clone())
                .ok_or_else(|| {
                    Failure(
                        "no deployment is running; dectl deployments lists them".into(),
                        1,
                    )
                })?
        }
    };
    let reply = api.ok("POST", &format!("/api/v1/deployments/{id}/{verb}"), None)?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let d: DeploymentView = reply.parse()?;
    let paused = if d.paused && d.state == DeployState::Running {
        ", paused: the steps in flight finish, no new one starts"
    } else {
        ""
    };
    println!(
        "deployment {} {} ({}/{} steps done{paused})",
        d.id,
        word(&d.state),
        d.steps_done,
        d.steps_total
    );
    Ok(())
}

/// Shows a deployment's progress until it ends: one bar per component
/// instance on a terminal, else a line per change; and a line when it is
/// paused or resumed ([`pause_line`]).
fn follow_deployment(api: &Api, id: &str) -> Outcome {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<28} [{bar:24}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: Vec<(String, ProgressBar)> = Vec::new();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut printed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let started = Instant::now();
    let mut paused = false;
    loop {
        let d: DeploymentView = api.get(&format!("/api/v1/deployments/{id}"))?.parse()?;
        if let Some(line) = pause_line(paused, &d) {
            // Above the bars, which are drawn again under it.
            multi.suspend(|| println!("{line}"));
        }
        paused = d.paused && d.state == DeployState::Running;
        // One bar per component instance (component and node).
        let mut groups: Vec<(String, u64, u64, String)> = Vec::new();
        for st in d.steps.iter().flatten() {
            let key = format!("{} {}", st.instance, st.ip);
            let done = u64::from(st.state == PhaseState::Done);
            let note = if matches!(
                st.state,
                PhaseState::Running | PhaseState::Failed | PhaseState::Cancelled
            ) {
                format!("{} {}", st.action, word(&st.state))
            } else {
                String::new()
            };
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => {
                    g.1 += done;
                    g.2 += 1;
                    if !note.is_empty() {
                        g.3 = note;
                    }
                }
                None => groups.push((key, done, 1, note)),
            }
        }
        for (key, done, total, note) in &groups {
            if tty {
                let bar = match bars.iter().find(|b| &b.0 == key) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = multi.add(ProgressBar::new(*total));
                        b.set_style(style.clone());
                        b.set_prefix(key.clone());
                        bars.push((key.clone(), b.clone()));
                        b
                    }
                };
                bar.set_position(*done);
                bar.set_message(note.clone());
            } else {
                let line = format!("{key}: {done}/{total} {note}");
                if printed.insert(line.clone()) {
                    println!("{}", line.trim_end());
                }
            }
        }
        if d.state != DeployState::Running {
            for (_, b) in &bars {
                b.finish();
            }
            println!(
                "deployment {id} {} in {:.1} s ({}/{} steps)",
                word(&d.state),
                started.elapsed().as_secs_f64(),
                d.steps_done,
                d.steps_total
            );
            let error = cell(d.error.as_deref());
            return match d.state {
                DeployState::Succeeded => Ok(()),
                DeployState::Cancelled => Err(Failure(
                    format!("deployment {id} was cancelled: {error}"),
                    1,
                )),
                _ => Err(Failure(format!("deployment {id} failed: {error}"), 1)),
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The line `deploy --follow` prints when the deployment `d` has been
/// paused or resumed since the previous look (`was_paused`); `None` when
/// that did not change or the deployment ended.
fn pause_line(was_paused: bool, d: &DeploymentView) -> Option<String> {
    if d.state != DeployState::Running || d.paused == was_paused {
        return None;
    }
    Some(if d.paused {
        format!(
            "deployment {} paused ({}/{} steps done): the steps in flight finish, no new one starts until `dectl deploy resume {}`",
            d.id, d.steps_done, d.steps_total, d.id
        )
    } else {
        format!(
            "deployment {} resumed ({}/{} steps done)",
            d.id, d.steps_done, d.steps_total
        )
    })
}

/// Every deployment, or one (`id`) with its steps.
fn deployments(api: &Api, id: Option<&str>, json: bool) -> Outcome {
    match id {
        None => deployment_list(api, json),
        Some(id) => deployment_steps(api, id, json),
    }
}

fn deployment_list(api: &Api, json: bool) -> Outcome {
    let reply = api.get("/api/v1/deployments")?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let all: Vec<DeploymentView> = reply.parse()?;
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                word(&d.state),
                d.plan_revision.to_string(),
                format!("{}/{}", d.steps_done, d.steps_total),
                d.created_at.clone(),
            ]
        })
        .collect();
    table(&["ID", "STATE", "PLAN", "STEPS", "CREATED"], &rows);
    Ok(())
}

fn deployment_steps(api: &Api, id: &str, json: bool) -> Outcome {
    let reply = api.get(&format!("/api/v1/deployments/{id}"))?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let d: DeploymentView = reply.parse()?;
    println!(
        "deployment {} {} (plan revision {})",
        d.id,
        word(&d.state),
        d.plan_revision
    );
    if let Some(e) = &d.error {
        println!("error: {e}");
    }
    let rows: Vec<Vec<String>> = d
        .steps
        .iter()
        .flatten()
        .map(|st| {
            vec![
                st.instance.clone(),
                st.ip.clone(),
                word(&st.kind),
                st.action.clone(),
                word(&st.state),
                st.attempts.to_string(),
                cell(st.exit_code),
            ]
        })
        .collect();
    table(
        &[
            "INSTANCE", "IP", "KIND", "ACTION", "STATE", "ATTEMPTS", "EXIT",
        ],
        &rows,
    );
    Ok(())
}

fn status(api: &Api, json: bool) -> Outcome {
    let reply = api.get("/deployment-engine/status")?;
    if json {
        reply.print_json();
        return Ok(());
    }
    let rows: Vec<StatusRow> = reply.parse()?;
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| vec![r.comp, r.ip, r.status, r.cpu, r.mem, r.disk])
        .collect();
    table(&["COMPONENT", "IP", "STATUS", "CPU", "MEM", "DISK"], &rows);
    Ok(())
}

/// `start`, `restart` or `stop` (`verb`) of a component, on one IP or everywhere.
fn operate(api: &Api, verb: &str, component: &str, ip: Option<String>, json: bool) -> Outcome {
    let req = OperateRequest {
        name: component.to_owned(),
        ip: ip.unwrap_or_else(|| "0.0.0.0".into()),
    };
    let reply = api.ok("PUT", &format!("/deployment-engine/{verb}"), body(&req))?;
    if json {
        reply.print_json();
    }
    let rows: Vec<OperateRow> = reply.parse()?;
    let mut failed = 0;
    for r in &rows {
        if r.result != "ok" {
            failed += 1;
        }
        if !json {
            println!("{} {}: {}", r.comp, r.ip, r.result);
        }
    }
    if failed > 0 {
        return Err(Failure(format!("{verb} failed on {failed} instance(s)"), 1));
    }
    Ok(())
}

fn logs(api: &Api, what: Logs, json: bool) -> Outcome {
    match what {
        Logs::List => {
            let reply = api.get("/deployment-engine/download")?;
            if json {
                reply.print_json();
                return Ok(());
            }
            let names: LogFiles = reply.parse()?;
            for n in names {
                println!("{n}");
            }
        }
        Logs::Get { name, tail } => {
            let r = match tail {
                Some(n) => api.get(&format!("/api/v1/logs/{name}?tail={n}"))?,
                None => api.ok("PUT", "/deployment-engine/download", body(&name))?,
            };
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                for line in r.text.lines() {
                    println!("{}", terminal_safe(line));
                }
            } else {
                print!("{}", r.text);
            }
        }
        Logs::Follow { tail } => return follow_log(api, tail),
    }
    Ok(())
}

/// Runs `command` on `targets` (every online node when empty); exit 1 when it
/// failed anywhere.
fn exec(api: &Api, command: String, targets: Vec<String>, timeout: u64, json: bool) -> Outcome {
    let req = ExecRequest {
        script: command,
        targets: (!targets.is_empty()).then_some(targets),
        timeout_secs: Some(timeout),
        user: None,
    };
    let reply = api.ok("POST", "/api/v1/exec", body(&req))?;
    if json {
        reply.print_json();
    }
    let results: Vec<ExecResult> = reply.parse()?;
    let mut failed = 0;
    for r in &results {
        if r.exit_code != Some(0) {
            failed += 1;
        }
        if !json {
            println!(
                "== {} ({}): exit {}{}",
                r.ip,
                r.node_id,
                cell(r.exit_code),
                r.error
                    .as_deref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            );
            print!("{}", r.stdout);
            eprint!("{}", r.stderr);
        }
    }
    if failed > 0 {
        return Err(Failure(
            format!("the command failed on {failed} node(s)"),
            1,
        ));
    }
    Ok(())
}

/// `line` as a terminal may show it: control characters other than tab
/// (ESC, CR, BEL, ... and the C1 range, which some terminals obey too) in
/// caret or `\u{..}` notation, so that a log line (where node output ends
/// up) can neither move the cursor, rewrite what is on screen, set the
/// window title nor reach the clipboard, and what was there stays visible.
fn terminal_safe(line: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c != '\t' && c.is_control();
    if !line.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        match c {
            c if !unsafe_char(c) => out.push(c),
            '\u{7f}' => out.push_str("^?"),
            c if u32::from(c) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Prints local.log's last `tail` lines, then every line as it is written,
/// from the `/deployment-engine/log` WebSocket (the token as a subprotocol,
/// never in the URL). Lines written between the two are printed once.
fn follow_log(api: &Api, tail: u32) -> Outcome {
    use std::io::Write;
    use tungstenite::client::IntoClientRequest;
    let ws_url = match api.base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}/deployment-engine/log"),
        Some((_, rest)) => format!("ws://{rest}/deployment-engine/log"),
        None => format!("ws://{}/deployment-engine/log", api.base),
    };
    let unreachable =
        |e: &dyn std::fmt::Display| Failure(format!("cannot follow the log at {ws_url}: {e}"), 2);
    let mut req = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| unreachable(&e))?;
    let offer = format!("de.log, de.token.{}", api.token);
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        offer
            .parse()
            .map_err(|_| Failure("the token holds characters a header cannot carry".into(), 2))?,
    );
    let (secure, rest) = match ws_url.strip_prefix("wss://") {
        Some(rest) => (true, rest),
        None => (false, ws_url.trim_start_matches("ws://")),
    };
    let host = rest.split('/').next().unwrap_or_default().to_owned();
    let stream = if secure {
        LogStream::Tls(Box::new(
            tls_connect(api.ca.as_ref(), &host).map_err(|e| unreachable(&e))?,
        ))
    } else {
        LogStream::Plain(std::net::TcpStream::connect(&host).map_err(|e| unreachable(&e))?)
    };
    let (mut ws, _) = tungstenite::client(req, stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))
            if resp.status() == 401 =>
        {
            Failure("the controller refused the token (HTTP 401)".into(), 1)
        }
        other => unreachable(&other),
    })?;
    // Subscribed: now the backlog, then what came in meanwhile, skipping
    // lines already printed (each starts with its time to the nanosecond).
    let mut printed = std::collections::HashSet::new();
    let out = std::io::stdout();
    if tail > 0 {
        let text = api
            .get(&format!("/api/v1/logs/local.log?tail={tail}"))?
            .text;
        let mut o = out.lock();
        for line in text.lines() {
            printed.insert(line.to_owned());
            let _ = writeln!(o, "{}", terminal_safe(line));
        }
        let _ = o.flush();
    }
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Text(line)) => {
                let line = line.as_str();
                if printed.remove(line) {
                    continue;
                }
                let mut o = out.lock();
                if writeln!(o, "{}", terminal_safe(line))
                    .and_then(|()| o.flush())
                    .is_err()
                {
                    // stdout closed (| head): done.
                    return Ok(());
                }
            }
            Ok(tungstenite::Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {
                return Err(Failure("the controller closed the log stream".into(), 2));
            }
            Ok(_) => {}
            Err(e) => return Err(unreachable(&e)),
        }
    }
}

/// The log WebSocket's transport: plain TCP, or TLS for an https:// controller.
enum LogStream {
    Plain(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>>),
}

impl std::io::Read for LogStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            LogStream::Plain(s) => s.read(buf),
            LogStream::Tls(s) => s.read(buf),
        }
    }
}

impl std::io::Write for LogStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogStream::Plain(s) => s.write(buf),
            LogStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogStream::Plain(s) => s.flush(),
            LogStream::Tls(s) => s.flush(),
        }
    }
}

/// dectl's config file: where its controller is, and how to reach it.
#[derive(Debug, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct DectlConfig {
    controller: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
}

/// The config file: `--config` (must exist), else
/// `$XDG_CONFIG_HOME/dectl/config.toml` or `~/.config/dectl/config.toml`
/// when it exists.
fn load_config(given: Option<&std::path::Path>) -> Result<DectlConfig, Failure> {
    let default = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("dectl/config.toml"));
    let path = match (given, default) {
        (Some(p), _) => p.to_owned(),
        (None, Some(p)) if p.is_file() => p,
        _ => return Ok(DectlConfig::default()),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure(
            format!("cannot read the config file {}: {e}", path.display()),
            2,
        )
    })?;
    toml::from_str(&text).map_err(|e| {
        Failure(
            format!(
                "{} is not a valid dectl config (keys: controller, token_file, ca_cert): {}",
                path.display(),
                e.message()
            ),
            2,
        )
    })
}

/// Where dectl goes, with what: flag or DECTL_* > config file > default.
struct Target {
    controller: String,
    token_file: PathBuf,
    ca_cert: Option<PathBuf>,
}

fn target_of(cli: &Cli) -> Result<Target, Failure> {
    let file = load_config(cli.config.as_deref())?;
    Ok(Target {
        controller: cli
            .controller
            .clone()
            .or(file.controller)
            .unwrap_or_else(|| "http://127.0.0.1:50000".to_owned()),
        token_file: cli
            .token_file
            .clone()
            .or(file.token_file)
            .unwrap_or_else(|| PathBuf::from("./de-data/admin.token")),
        ca_cert: cli.ca_cert.clone().or(file.ca_cert),
    })
}

/// The CA to check an https:// controller by: `--ca-cert` (or the config
/// file's), else `ca.pem` beside the token file, else none (the web PKI).
fn ca_of(t: &Target) -> Result<Option<Ca>, Failure> {
    if let Some(path) = &t.ca_cert {
        return Ca::read(path.clone()).map(Some);
    }
    let beside = t
        .token_file
        .parent()
        .map(|d| d.join("ca.pem"))
        .filter(|p| p.is_file());
    beside.map(Ca::read).transpose()
}

fn main() -> ExitCode {
    // Also writes the completions and man pages (hidden `completions`, `man`).
    let cli = de_common::cli_docs::parse::<Cli>();
    let target = match target_of(&cli) {
        Ok(t) => t,
        Err(Failure(msg, code)) => {
            eprintln!("dectl: {msg}");
            return ExitCode::from(code);
        }
    };
    let token = match std::fs::read_to_string(&target.token_file) {
        Ok(t) => t.trim().to_owned(),
        Err(e) => {
            eprintln!(
                "dectl: cannot read the API token from {}: {e}; pass --token-file (the controller's DATA/admin.token), set DECTL_TOKEN_FILE, or write token_file in ~/.config/dectl/config.toml",
                target.token_file.display()
            );
            return ExitCode::from(2);
        }
    };
    let ca = match ca_of(&target) {
        Ok(ca) => ca,
        Err(Failure(msg, code)) => {
            eprintln!("dectl: {msg}");
            return ExitCode::from(code);
        }
    };
    let roots = match &ca {
        Some(ca) => ureq::tls::RootCerts::Specific(std::sync::Arc::new(
            ca.certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect(),
        )),
        None => ureq::tls::RootCerts::WebPki,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3700)))
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .build()
        .into();
    let api = Api {
        base: target.controller.trim_end_matches('/').to_owned(),
        token,
        agent,
        ca,
    };
    match run(cli, &api) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("dectl: {msg}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use de_common::api::InstanceChange;

    fn reply(status: u16, text: &str) -> Reply {
        Reply {
            request: "POST /api/v1/plan/validate".to_owned(),
            status,
            text: text.to_owned(),
        }
    }

    fn failure(r: Reply) -> (String, u8) {
        match r.check() {
            Ok(_) => panic!("accepted"),
            Err(Failure(line, code)) => (line, code),
        }
    }

    #[test]
    fn a_refusal_is_printed_in_the_apis_words_with_every_problem() {
        let body = r#"{"error":"invalid_plan","message":"the plan was not accepted: 2 problems","problems":[
            {"kind":"unknown_node","component":"nats","ip":"10.0.0.9","property":null,"problem":"no enrolled node has the IP 10.0.0.9","found":null,"needed":null},
            {"kind":"missing_property","component":null,"ip":null,"property":"domain","problem":"property \"domain\" is required","found":null,"needed":null}]}"#;
        assert_eq!(
            failure(reply(400, body)),
            (
                "the plan was not accepted: 2 problems (HTTP 400)\n  - nats 10.0.0.9: no enrolled node has the IP 10.0.0.9\n  - - -: property \"domain\" is required".to_owned(),
                1
            )
        );
        assert_eq!(
            failure(reply(
                404,
                r#"{"error":"not_found","message":"no node \"n-x\""}"#
            )),
            ("no node \"n-x\" (HTTP 404)".to_owned(), 1)
        );
        // Not the API's error shape (a proxy's page): the text as it came.
        assert_eq!(
            failure(reply(502, "Bad Gateway\n")),
            ("Bad Gateway (HTTP 502)".to_owned(), 1)
        );
        assert!(reply(200, "{}").check().is_ok());
    }

    fn parse(args: &[&str]) -> Result<Command, String> {
        Cli::try_parse_from(std::iter::once("dectl").chain(args.iter().copied()))
            .map(|c| c.command)
            .map_err(|e| e.to_string())
    }

    /// Every subcommand, at every depth, as its path of names (`["codes", "new"]`).
    fn subcommand_paths(cmd: &clap::Command, above: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut path = above.to_vec();
            path.push(sub.get_name().to_owned());
            subcommand_paths(sub, &path, out);
            out.push(path);
        }
    }

    /// What the package ships: a completion script per shell and a man page
    /// per command and subcommand, each naming every subcommand.
    #[test]
    fn completions_and_man_pages_name_every_subcommand() {
        use clap::CommandFactory;
        use de_common::cli_docs::{Shell, completions, man_pages};
        let mut paths = Vec::new();
        subcommand_paths(&Cli::command(), &[], &mut paths);
        // The ones users see first, and a few nested ones.
        for path in [
            "codes",
            "nodes",
            "revoke",
            "plan",
            "deploy",
            "deployments",
            "status",
            "start",
            "restart",
            "stop",
            "logs",
            "exec",
            "ca",
            "artifacts",
            "tokens",
            "pki",
            "codes new",
            "nodes set-ip",
            "deploy pause",
            "pki retire-old-ca",
        ] {
            assert!(
                paths.iter().any(|p| p.join(" ") == path),
                "{path} missing from {paths:?}"
            );
        }
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(Cli::command(), shell)).expect("utf-8");
            for path in &paths {
                let name = path.last().map(String::as_str).unwrap_or_default();
                assert!(text.contains(name), "{shell}: no {name}");
            }
            assert!(!text.contains("completions"), "{shell}");
        }
        let pages = man_pages(Cli::command());
        assert_eq!(pages.len(), paths.len() + 1);
        for path in &paths {
            let file = format!("dectl-{}.1", path.join("-"));
            let page = pages
                .iter()
                .find(|p| p.file_name == file)
                .map(|p| String::from_utf8_lossy(&p.roff).into_owned())
                .unwrap_or_else(|| panic!("no page {file}"));
            assert!(page.contains(".SH NAME"), "{file}: {page}");
            assert!(page.contains("\\-\\-token\\-file"), "{file}: global flags");
        }
        let top = String::from_utf8_lossy(&pages[0].roff);
        assert!(top.contains("dectl\\-deployments(1)"), "{top}");
    }

    #[test]
    fn tokens_parse_with_a_known_role_only() {
        assert!(matches!(
            parse(&["tokens", "create", "ci", "--role", "read-only"]),
            Ok(Command::Tokens { what: TokenCmd::Create { name, role: Role::ReadOnly } }) if name == "ci"
        ));
        assert!(parse(&["tokens", "create", "ci", "--role", "root"]).is_err());
        assert!(parse(&["tokens", "create", "ci"]).is_err());
        assert!(matches!(
            parse(&["tokens", "revoke", "ci"]),
            Ok(Command::Tokens { what: TokenCmd::Revoke { name } }) if name == "ci"
        ));
    }

    #[test]
    fn deploy_start_and_plan_diff_parse_as_documented() {
        let deploy = |args: &[&str]| match parse(args) {
            Ok(Command::Deploy {
                follow,
                what: None | Some(Deploy::Cancel { .. }),
            }) => {
                let what = match parse(args) {
                    Ok(Command::Deploy {
                        what: Some(Deploy::Cancel { id }),
                        ..
                    }) => Some(id),
                    _ => None,
                };
                Some((follow, what))
            }
            _ => None,
        };
        assert_eq!(deploy(&["deploy"]), Some((false, None)));
        assert_eq!(deploy(&["deploy", "--follow"]), Some((true, None)));
        assert_eq!(deploy(&["deploy", "cancel"]), Some((false, Some(None))));
        assert_eq!(
            deploy(&["deploy", "cancel", "d-1"]),
            Some((false, Some(Some("d-1".to_owned()))))
        );
        // --follow means nothing to a cancel.
        assert!(parse(&["deploy", "--follow", "cancel"]).is_err());
        assert!(matches!(
            parse(&["deploy", "pause"]),
            Ok(Command::Deploy {
                what: Some(Deploy::Pause { id: None }),
                ..
            })
        ));
        assert!(matches!(
            parse(&["deploy", "resume", "d-2"]),
            Ok(Command::Deploy { what: Some(Deploy::Resume { id: Some(id) }), .. }) if id == "d-2"
        ));
        assert!(matches!(
            parse(&["start", "nats"]),
            Ok(Command::Start { component, ip: None }) if component == "nats"
        ));
        assert!(matches!(
            parse(&["start", "nats", "10.0.0.1"]),
            Ok(Command::Start { ip: Some(ip), .. }) if ip == "10.0.0.1"
        ));
        assert!(parse(&["start"]).is_err());
        assert!(matches!(
            parse(&["--json", "plan", "diff"]),
            Ok(Command::Plan { what: Plan::Diff })
        ));
    }

    fn change(instance: &str, ip: &str, action: ChangeAction, why: &str) -> InstanceChange {
        InstanceChange {
            component: instance.split('_').next().unwrap_or_default().to_owned(),
            instance: instance.to_owned(),
            ip: ip.to_owned(),
            node_id: None,
            action,
            why: why.to_owned(),
        }
    }

    #[test]
    fn a_diff_prints_a_row_per_instance_then_the_steps_and_offline_nodes() {
        let mut d = PlanDiff {
            plan_revision: 3,
            applied_revision: 2,
            instances: vec![
                change(
                    "dea_1",
                    "10.0.0.9",
                    ChangeAction::Uninstall,
                    "gone from the plan",
                ),
                change(
                    "nats_0",
                    "10.0.0.1",
                    ChangeAction::Nothing,
                    "as applied, running",
                ),
                change(
                    "nginx_0",
                    "10.0.0.2",
                    ChangeAction::Install,
                    "new in the plan",
                ),
                change("haproxy_0", "10.0.0.3", ChangeAction::Reapply, ""),
                InstanceChange {
                    instance: String::new(),
                    ..change(
                        "uaa_0",
                        "10.0.0.8",
                        ChangeAction::Install,
                        "new in the plan; no enrolled node has this IP",
                    )
                },
            ],
            steps: 7,
            offline: vec!["10.0.0.9".to_owned()],
        };
        assert_eq!(
            diff_text(&d),
            "COMPONENT  INSTANCE   IP        ACTION     WHY\n\
             dea        dea_1      10.0.0.9  uninstall  gone from the plan\n\
             nats       nats_0     10.0.0.1  nothing    as applied, running\n\
             nginx      nginx_0    10.0.0.2  install    new in the plan\n\
             haproxy    haproxy_0  10.0.0.3  reapply    -\n\
             uaa        -          10.0.0.8  install    new in the plan; no enrolled node has this IP\n\
             a deployment would run 7 steps (plan revision 3, revision 2 applied); \
             offline: 10.0.0.9 (a deployment is refused until they are back)\n"
        );
        d.applied_revision = 0;
        d.steps = 1;
        d.offline.clear();
        assert_eq!(
            diff_summary(&d),
            "a deployment would run 1 step (plan revision 3, none applied yet)"
        );
        d.applied_revision = 3;
        d.steps = 0;
        d.instances.retain(|c| c.action == ChangeAction::Nothing);
        assert_eq!(
            diff_summary(&d),
            "nothing to do: a deployment would run 0 steps (plan revision 3, revision 3 applied)"
        );
    }

    fn listed(id: &str, state: DeployState) -> DeploymentView {
        DeploymentView {
            id: id.to_owned(),
            state,
            plan_revision: 1,
            created_at: "t".to_owned(),
            finished_at: None,
            error: None,
            steps_total: 0,
            steps_done: 0,
            steps: None,
            paused: false,
            rollout: Vec::new(),
            watches: Vec::new(),
        }
    }

    #[test]
    fn follow_says_when_the_deployment_is_paused_and_resumed_once_each() {
        let mut d = listed("d-7", DeployState::Running);
        (d.steps_done, d.steps_total) = (3, 8);
        assert_eq!(pause_line(false, &d), None, "running, as before");
        d.paused = true;
        assert_eq!(
            pause_line(false, &d).as_deref(),
            Some(
                "deployment d-7 paused (3/8 steps done): the steps in flight finish, no new one starts until `dectl deploy resume d-7`"
            )
        );
        assert_eq!(pause_line(true, &d), None, "still paused: said once");
        d.paused = false;
        d.steps_done = 4;
        assert_eq!(
            pause_line(true, &d).as_deref(),
            Some("deployment d-7 resumed (4/8 steps done)")
        );
        // A deployment cancelled while paused ends with its own line.
        d.paused = true;
        d.state = DeployState::Cancelled;
        assert_eq!(pause_line(false, &d), None);
    }

    #[test]
    fn cancel_without_an_id_picks_the_running_deployment() {
        let all = [
            listed("d-3", DeployState::Failed),
            listed("d-2", DeployState::Running),
            listed("d-1", DeployState::Cancelled),
        ];
        assert_eq!(running_deployment(&all).map(|d| d.id.as_str()), Some("d-2"));
        assert_eq!(running_deployment(&all[..1]), None);
        assert_eq!(running_deployment(&[]), None);
    }

    #[test]
    fn an_answer_of_another_shape_names_the_request() {
        let r = reply(200, r#"{"valid": true}"#);
        match r.parse::<PlanCheck<IgnoredAny>>() {
            Ok(_) => panic!("parsed"),
            Err(Failure(line, code)) => {
                assert_eq!(code, 1);
                assert!(
                    line.contains("POST /api/v1/plan/validate") && line.contains("catalog"),
                    "{line}"
                );
            }
        }
    }

    /// A log line cannot drive the terminal: escape sequences (colour,
    /// title, clipboard, cursor moves), CR, BEL, DEL and C1 controls are
    /// shown in notation; tabs and other text pass as they are.
    #[test]
    fn log_lines_reach_the_terminal_without_control_characters() {
        for (line, shown) in [
            ("plain\ttabbed \u{e9}t\u{e9}", "plain\ttabbed \u{e9}t\u{e9}"),
            ("\u{1b}[31mred\u{1b}[0m", "^[[31mred^[[0m"),
            ("\u{1b}]0;pwned\u{7}", "^[]0;pwned^G"),
            (
                "\u{1b}]52;c;ZWNobyBoaQ==\u{1b}\\",
                "^[]52;c;ZWNobyBoaQ==^[\\",
            ),
            ("ok\rFAKE", "ok^MFAKE"),
            ("del\u{7f}", "del^?"),
            ("\u{9b}2J", "\\u{9b}2J"),
            ("nul\u{0}", "nul^@"),
        ] {
            let got = terminal_safe(line);
            assert_eq!(got, shown, "{line:?}");
            assert!(
                !got.contains(|c: char| c != '\t' && c.is_control()),
                "{got:?}"
            );
        }
        assert!(matches!(
            terminal_safe("nothing to do"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
