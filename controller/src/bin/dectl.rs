//! `dectl`: the operators' command line for a Deployment Engine controller —
//! install codes, nodes, plans, deployments (with live progress), status,
//! restart/stop, logs and ad-hoc commands, all through the controller's API.
//!
//! Errors from the API are printed as the API words them; the exit code is 1
//! when the controller refused or something failed, 2 when it could not be
//! reached or the token could not be read. `--json` prints the API's JSON.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(name = "dectl", version, about = "Deployment Engine command line")]
struct Cli {
    /// The controller's API URL.
    #[arg(
        long,
        env = "DECTL_CONTROLLER",
        default_value = "http://127.0.0.1:50000",
        global = true
    )]
    controller: String,
    /// File holding the API token (the controller's DATA/admin.token).
    #[arg(
        long,
        env = "DECTL_TOKEN_FILE",
        default_value = "./de-data/admin.token",
        global = true
    )]
    token_file: PathBuf,
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
    /// Enrolled nodes with hardware, usage and online state.
    Nodes,
    /// Revoke a node (by id or IP): its link is dropped and its certificate
    /// refused from then on; enrol it again with a new code to use it.
    Revoke { node: String },
    /// Plans: `validate FILE`, `apply FILE`, `show`.
    Plan {
        #[command(subcommand)]
        what: Plan,
    },
    /// Deploy the current plan; `--follow` shows progress until it ends.
    Deploy {
        #[arg(long)]
        follow: bool,
    },
    /// Deployments: all, or one with its steps.
    Deployments { id: Option<String> },
    /// Every component instance with its state.
    Status,
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
    Validate { file: PathBuf },
    Apply { file: PathBuf },
    Show,
}

#[derive(Subcommand, Debug)]
enum Logs {
    /// The log file names.
    List,
    /// One file, whole or its last N lines.
    Get {
        name: String,
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        tail: Option<u32>,
    },
    /// local.log live, as it is written (after its last N lines); Ctrl-C stops.
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
}

struct Reply {
    status: u16,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::String(self.text.clone()))
    }

    /// The API's own words for a refusal.
    fn check(self) -> Result<Reply, Failure> {
        if self.status < 300 {
            return Ok(self);
        }
        let j = self.json();
        let msg = j["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| self.text.trim().to_owned());
        let mut line = format!("{msg} (HTTP {})", self.status);
        if let Some(problems) = j["problems"].as_array() {
            for p in problems {
                let what = p["problem"].as_str().unwrap_or_default();
                let comp = p["component"].as_str().unwrap_or("-");
                let ip = p["ip"].as_str().unwrap_or("-");
                line.push_str(&format!("\n  - {comp} {ip}: {what}"));
            }
        }
        Err(Failure(line, 1))
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
        let mut resp = self.agent.run(req).map_err(|e| {
            Failure(
                format!("cannot reach the controller at {}: {e}", self.base),
                2,
            )
        })?;
        let status = resp.status().as_u16();
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .map_err(|e| Failure(format!("reading the answer from {url}: {e}"), 2))?;
        Ok(Reply { status, text })
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        Ok(self.call("GET", path, None)?.check()?.json())
    }
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// Table rows from a JSON array of objects: the named fields of each, in order.
fn rows(list: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|item| fields.iter().map(|f| s(&item[*f])).collect())
        .collect()
}

fn read_plan(file: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(file).map_err(|e| {
        Failure(
            format!("cannot read the plan file {}: {e}", file.display()),
            1,
        )
    })
}

fn follow(api: &Api, id: &str) -> Outcome {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:<28} [{bar:24}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bars: Vec<(String, ProgressBar)> = Vec::new();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut printed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let started = Instant::now();
    loop {
        let d = api.get(&format!("/api/v1/deployments/{id}"))?;
        let steps = d["steps"].as_array().cloned().unwrap_or_default();
        // One bar per component instance (component and node).
        let mut groups: Vec<(String, u64, u64, String)> = Vec::new();
        for st in &steps {
            let key = format!("{} {}", s(&st["instance"]), s(&st["ip"]));
            let done = u64::from(st["state"] == "done");
            let note = if st["state"] == "running" || st["state"] == "failed" {
                format!("{} {}", s(&st["action"]), s(&st["state"]))
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
        if d["state"] != "running" {
            for (_, b) in &bars {
                b.finish();
            }
            println!(
                "deployment {id} {} in {:.1} s ({}/{} steps)",
                s(&d["state"]),
                started.elapsed().as_secs_f64(),
                s(&d["steps_done"]),
                s(&d["steps_total"])
            );
            return if d["state"] == "succeeded" {
                Ok(())
            } else {
                Err(Failure(
                    format!("deployment {id} failed: {}", s(&d["error"])),
                    1,
                ))
            };
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn run(cli: Cli, api: &Api) -> Outcome {
    let json_out = cli.json;
    let print = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match cli.command {
        Command::Codes { what } => {
            let v = match what {
                Codes::New { ttl } => {
                    let body = ttl.map(|t| json!({ "ttl_secs": t }).to_string());
                    api.call("POST", "/api/v1/install-codes", body)?
                        .check()?
                        .json()
                }
                Codes::Show => api.get("/api/v1/install-codes")?,
                Codes::End => {
                    api.call("DELETE", "/api/v1/install-codes", None)?.check()?;
                    if !json_out {
                        println!("installation ended: no code is open");
                    }
                    return Ok(());
                }
            };
            if json_out {
                print(&v);
            } else {
                let left = v["expires_in_secs"].as_u64().unwrap_or(0);
                println!(
                    "code {} (expires {}, in {}:{:02}:{:02})",
                    s(&v["code"]),
                    s(&v["expires_at"]),
                    left / 3600,
                    left % 3600 / 60,
                    left % 60
                );
                if let Some(cmd) = v["agent_command"].as_str() {
                    println!("on each node: {cmd}");
                }
            }
        }
        Command::Revoke { node } => {
            let all = api.get("/api/v1/nodes")?;
            let matches: Vec<&Value> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n["revoked"] != true
                        && (n["id"] == node.as_str()
                            || n["ips"]
                                .as_array()
                                .is_some_and(|ips| ips.iter().any(|ip| ip == node.as_str())))
                })
                .collect();
            let id = match matches.as_slice() {
                [one] => s(&one["id"]),
                [] => {
                    return Err(Failure(
                        format!(
                            "no enrolled node that is not revoked has the id or IP {node:?}; dectl nodes lists them"
                        ),
                        1,
                    ));
                }
                many => {
                    let ids: Vec<String> = many.iter().map(|n| s(&n["id"])).collect();
                    return Err(Failure(
                        format!(
                            "several nodes have the IP {node}: {}; revoke one by its id",
                            ids.join(", ")
                        ),
                        1,
                    ));
                }
            };
            api.call("DELETE", &format!("/api/v1/nodes/{id}"), None)?
                .check()?;
            if !json_out {
                println!(
                    "revoked node {id} ({node}): its link is closed and its certificate refused"
                );
            }
        }
        Command::Nodes => {
            let v = api.get("/api/v1/nodes")?;
            if json_out {
                print(&v);
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| {
                        vec![
                            s(&n["id"]),
                            n["ips"]
                                .as_array()
                                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                                .unwrap_or_default(),
                            s(&n["hostname"]),
                            if n["revoked"] == true {
                                "revoked".into()
                            } else if n["online"] == true {
                                "online".into()
                            } else {
                                "offline".into()
                            },
                            format!(
                                "{} cpu, {} MB, {} MB disk",
                                s(&n["hardware"]["cpus"]),
                                s(&n["hardware"]["ram_mb"]),
                                s(&n["hardware"]["disk_mb"])
                            ),
                            format!(
                                "cpu {:.0}% mem {:.0}% disk {:.0}%",
                                n["usage"]["cpu_pct"].as_f64().unwrap_or(0.0),
                                n["usage"]["mem_pct"].as_f64().unwrap_or(0.0),
                                n["usage"]["disk_pct"].as_f64().unwrap_or(0.0)
                            ),
                            s(&n["last_seen"]),
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
            }
        }
        Command::Plan { what } => {
            let v = match what {
                Plan::Validate { file } => api
                    .call("POST", "/api/v1/plan/validate", Some(read_plan(&file)?))?
                    .check()?
                    .json(),
                Plan::Apply { file } => api
                    .call("POST", "/deployment-engine/config", Some(read_plan(&file)?))?
                    .check()?
                    .json(),
                Plan::Show => api.get("/deployment-engine/config")?,
            };
            if json_out || v["message"].is_null() {
                print(&v);
            } else {
                println!("{}", s(&v["message"]));
            }
        }
        Command::Deploy { follow: f } => {
            let v = api
                .call("GET", "/deployment-engine/deploy", None)?
                .check()?
                .json();
            let id = s(&v["id"]);
            if json_out && !f {
                print(&v);
            } else {
                println!("deployment {id} started ({} steps)", s(&v["steps"]));
            }
            if f {
                follow(api, &id)?;
            }
        }
        Command::Deployments { id } => {
            let v = match &id {
                Some(id) => api.get(&format!("/api/v1/deployments/{id}"))?,
                None => api.get("/api/v1/deployments")?,
            };
            if json_out {
                print(&v);
            } else if id.is_some() {
                let rows = rows(
                    &v["steps"],
                    &[
                        "instance",
                        "ip",
                        "kind",
                        "action",
                        "state",
                        "attempts",
                        "exit_code",
                    ],
                );
                println!(
                    "deployment {} {} (plan revision {})",
                    s(&v["id"]),
                    s(&v["state"]),
                    s(&v["plan_revision"])
                );
                if !v["error"].is_null() {
                    println!("error: {}", s(&v["error"]));
                }
                table(
                    &[
                        "INSTANCE", "IP", "KIND", "ACTION", "STATE", "ATTEMPTS", "EXIT",
                    ],
                    &rows,
                );
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        vec![
                            s(&d["id"]),
                            s(&d["state"]),
                            s(&d["plan_revision"]),
                            format!("{}/{}", s(&d["steps_done"]), s(&d["steps_total"])),
                            s(&d["created_at"]),
                        ]
                    })
                    .collect();
                table(&["ID", "STATE", "PLAN", "STEPS", "CREATED"], &rows);
            }
        }
        Command::Status => {
            let v = api.get("/deployment-engine/status")?;
            if json_out {
                print(&v);
            } else {
                let rows = rows(&v, &["Comp", "Ip", "Status", "Cpu", "Mem", "Disk"]);
                table(&["COMPONENT", "IP", "STATUS", "CPU", "MEM", "DISK"], &rows);
            }
        }
        Command::Restart { component, ip } => {
            return operate(api, "restart", &component, ip, json_out);
        }
        Command::Stop { component, ip } => return operate(api, "stop", &component, ip, json_out),
        Command::Logs { what } => match what {
            Logs::List => {
                let v = api.get("/deployment-engine/download")?;
                if json_out {
                    print(&v);
                } else {
                    for n in v.as_array().into_iter().flatten() {
                        println!("{}", s(n));
                    }
                }
            }
            Logs::Get { name, tail } => {
                let r = match tail {
                    Some(n) => api
                        .call("GET", &format!("/api/v1/logs/{name}?tail={n}"), None)?
                        .check()?,
                    None => api
                        .call(
                            "PUT",
                            "/deployment-engine/download",
                            Some(json!(name).to_string()),
                        )?
                        .check()?,
                };
                print!("{}", r.text);
            }
            Logs::Follow { tail } => return follow_log(api, tail),
        },
        Command::Exec {
            command,
            targets,
            timeout,
        } => {
            let mut body = json!({ "script": command, "timeout_secs": timeout });
            if !targets.is_empty() {
                body["targets"] = json!(targets);
            }
            let v = api
                .call("POST", "/api/v1/exec", Some(body.to_string()))?
                .check()?
                .json();
            if json_out {
                print(&v);
            }
            let mut failed = 0;
            for r in v.as_array().into_iter().flatten() {
                let ok = r["exit_code"] == 0;
                if !ok {
                    failed += 1;
                }
                if !json_out {
                    println!(
                        "== {} ({}): exit {}{}",
                        s(&r["ip"]),
                        s(&r["node_id"]),
                        s(&r["exit_code"]),
                        r["error"]
                            .as_str()
                            .map(|e| format!(", {e}"))
                            .unwrap_or_default()
                    );
                    print!("{}", r["stdout"].as_str().unwrap_or_default());
                    eprint!("{}", r["stderr"].as_str().unwrap_or_default());
                }
            }
            if failed > 0 {
                return Err(Failure(
                    format!("the command failed on {failed} node(s)"),
                    1,
                ));
            }
        }
    }
    Ok(())
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
    if ws_url.starts_with("wss://") {
        return Err(Failure(
            "dectl logs follow speaks plain ws:// only; reach the controller's port directly (or use logs get --tail)".into(),
            2,
        ));
    }
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
    let host = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let stream = std::net::TcpStream::connect(&host).map_err(|e| unreachable(&e))?;
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
            .call("GET", &format!("/api/v1/logs/local.log?tail={tail}"), None)?
            .check()?
            .text;
        let mut o = out.lock();
        for line in text.lines() {
            printed.insert(line.to_owned());
            let _ = writeln!(o, "{line}");
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
                if writeln!(o, "{line}").and_then(|()| o.flush()).is_err() {
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

fn operate(api: &Api, verb: &str, component: &str, ip: Option<String>, json_out: bool) -> Outcome {
    let body =
        json!({ "name": component, "ip": ip.unwrap_or_else(|| "0.0.0.0".into()) }).to_string();
    let v = api
        .call("PUT", &format!("/deployment-engine/{verb}"), Some(body))?
        .check()?
        .json();
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut failed = 0;
    for r in v.as_array().into_iter().flatten() {
        if r["Result"] != "ok" {
            failed += 1;
        }
        if !json_out {
            println!("{} {}: {}", s(&r["Comp"]), s(&r["Ip"]), s(&r["Result"]));
        }
    }
    if failed > 0 {
        return Err(Failure(format!("{verb} failed on {failed} instance(s)"), 1));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let token = match std::fs::read_to_string(&cli.token_file) {
        Ok(t) => t.trim().to_owned(),
        Err(e) => {
            eprintln!(
                "dectl: cannot read the API token from {}: {e}; pass --token-file (the controller's DATA/admin.token) or set DECTL_TOKEN_FILE",
                cli.token_file.display()
            );
            return ExitCode::from(2);
        }
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3700)))
        .build()
        .into();
    let api = Api {
        base: cli.controller.trim_end_matches('/').to_owned(),
        token,
        agent,
    };
    match run(cli, &api) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg, code)) => {
            eprintln!("dectl: {msg}");
            ExitCode::from(code)
        }
    }
}
