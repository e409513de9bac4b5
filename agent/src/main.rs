//! `de-agent`: enrols a node with an install code and keeps it linked to the controller.

mod config;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use de_agent::{EnrollOptions, Identity, LinkOptions};
use de_common::ErrorChain;

use crate::config::{Config, MAX_SECS, PACKAGED_PATH};

const DEFAULT_STATE_DIR: &str = "/var/lib/deployment-engine/agent";
const DEFAULT_ROOT: &str = "/";
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;
const DEFAULT_HEARTBEAT_SECS: u64 = 5;
const DEFAULT_MAX_BACKOFF_SECS: u64 = 30;
/// Exit status for a bad command line or config file (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(name = "de-agent", version, about = "Deployment Engine agent")]
struct Cli {
    /// Config file (TOML). Default: /etc/deployment-engine/agent.toml when it exists.
    /// Flags and environment variables override its values.
    #[arg(long, global = true, env = "DE_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object per line, with
    /// the span fields, for journald and log shippers) [default: text; also
    /// `log_format` in the config file].
    #[arg(long, global = true, env = "DE_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<de_common::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

fn secs(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if (1..=MAX_SECS).contains(&v) => Ok(v),
        _ => Err(format!("must be a number of seconds from 1 to {MAX_SECS}")),
    }
}

/// Options of both commands; each is also a key of the config file.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Where the node's identity lives (files mode 0600) [default: /var/lib/deployment-engine/agent].
    #[arg(long, env = "DE_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// This node's IP as the controller and plans know it; the agent binds to it when it is local.
    #[arg(long, env = "DE_AGENT_ADVERTISE_IP")]
    advertise_ip: Option<IpAddr>,
    /// The node root under which component files go; its disk is the node's disk [default: /].
    #[arg(long, env = "DE_AGENT_ROOT")]
    root: Option<PathBuf>,
    /// Seconds to wait for the controller to answer a connection [default: 10].
    #[arg(long, value_parser = secs)]
    connect_timeout_secs: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enrol this node with the controller using a 4-digit install code.
    Enroll {
        /// The controller's QUIC address, HOST:PORT (port 50001 if omitted); also `controller` in the config file.
        #[arg(long, env = "DE_CONTROLLER")]
        controller: Option<String>,
        /// The 4-digit install code shown in the console (never read from the config file).
        /// Prefer the DE_INSTALL_CODE environment variable or --code-stdin: a command-line
        /// argument is visible to every local user (ps, /proc) and lands in shell history.
        #[arg(
            long,
            env = "DE_INSTALL_CODE",
            hide_env_values = true,
            required_unless_present = "code_stdin"
        )]
        code: Option<String>,
        /// Read the install code from the first line of standard input.
        #[arg(long)]
        code_stdin: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Keep this node linked to the controller (enrolling first if --code is given and the node has no identity yet).
    #[command(group(clap::ArgGroup::new("code_source").args(["code", "code_stdin"])))]
    Run {
        #[arg(long, env = "DE_CONTROLLER", requires = "code_source")]
        controller: Option<String>,
        /// The install code to enrol with when the node has no identity yet (see `enroll --code`;
        /// prefer DE_INSTALL_CODE or --code-stdin, as an argument is visible to local users).
        #[arg(long, env = "DE_INSTALL_CODE", hide_env_values = true)]
        code: Option<String>,
        /// Read the install code from the first line of standard input.
        #[arg(long)]
        code_stdin: bool,
        /// Seconds between heartbeats [default: 5].
        #[arg(long, value_parser = secs)]
        heartbeat_secs: Option<u64>,
        /// Upper bound of the reconnect backoff, in seconds [default: 30].
        #[arg(long, value_parser = secs)]
        max_backoff_secs: Option<u64>,
        /// A private monit control file (created with its socket, pid and state files next to it when missing) [default: the system monit].
        #[arg(long, env = "DE_AGENT_MONIT_CONTROL")]
        monit_control: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Open the system monit's HTTP interface for the agent, when
    /// /etc/monit/monitrc and the files it includes set none (Debian's stock
    /// monitrc): writes /etc/monit/conf.d/deployment-engine-httpd (a unix
    /// socket), checks it with `monit -t` and reloads monit. A `set httpd`
    /// already there is left as it is. The package runs it on install;
    /// purging the package removes the drop-in.
    MonitSetup,
}

/// Every option, resolved: flag > environment variable > config file > built-in default.
#[derive(Debug, Clone)]
struct Settings {
    state_dir: PathBuf,
    advertise_ip: Option<IpAddr>,
    root: PathBuf,
    connect_timeout_secs: u64,
    heartbeat_secs: u64,
    max_backoff_secs: u64,
    controller: Option<String>,
    monit_control: Option<PathBuf>,
    cache_max_mb: u64,
}

impl Settings {
    fn resolve(
        common: Common,
        controller: Option<String>,
        heartbeat_secs: Option<u64>,
        max_backoff_secs: Option<u64>,
        monit_control: Option<PathBuf>,
        file: Config,
    ) -> Settings {
        Settings {
            state_dir: (common.state_dir.or(file.state_dir))
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            advertise_ip: common.advertise_ip.or(file.advertise_ip),
            root: (common.root.or(file.root)).unwrap_or_else(|| DEFAULT_ROOT.into()),
            connect_timeout_secs: (common.connect_timeout_secs.or(file.connect_timeout_secs))
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS),
            heartbeat_secs: (heartbeat_secs.or(file.heartbeat_secs))
                .unwrap_or(DEFAULT_HEARTBEAT_SECS),
            max_backoff_secs: (max_backoff_secs.or(file.max_backoff_secs))
                .unwrap_or(DEFAULT_MAX_BACKOFF_SECS),
            controller: controller.or(file.controller),
            monit_control: monit_control.or(file.monit_control),
            cache_max_mb: file.cache_max_mb.unwrap_or(de_agent::DEFAULT_CACHE_MAX_MB),
        }
    }
}

fn main() -> ExitCode {
    // Also writes the completions and man pages (hidden `completions`, `man`).
    let cli = de_common::cli_docs::parse::<Cli>();
    let (file, from) =
        match de_common::load_config::<Config>(cli.config.as_deref(), Path::new(PACKAGED_PATH)) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("de-agent: {}", ErrorChain(&e));
                return ExitCode::from(EXIT_USAGE);
            }
        };
    de_common::init_logging(
        "info,quinn=warn",
        cli.log_format.or(file.log_format).unwrap_or_default(),
    );
    if let Some(path) = from {
        tracing::debug!(config = %path.display(), "read the config file");
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("de-agent: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async_main(cli.command, file))
}

/// The install code from standard input (`--code-stdin`, first line) or
/// from `--code`/DE_INSTALL_CODE; `None` if neither was given.
fn install_code(code: Option<String>, from_stdin: bool) -> Result<Option<String>, ExitCode> {
    if !from_stdin {
        return Ok(code);
    }
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(n) if n > 0 => Ok(Some(line.trim().to_owned())),
        Ok(_) => {
            eprintln!(
                "de-agent: --code-stdin: standard input is empty: give the 4-digit install code on its first line"
            );
            Err(ExitCode::from(EXIT_USAGE))
        }
        Err(e) => {
            eprintln!("de-agent: --code-stdin: could not read standard input: {e}");
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

async fn do_enroll(code: String, settings: &Settings) -> Result<Identity, ExitCode> {
    let Some(controller) = settings.controller.clone() else {
        eprintln!(
            "de-agent: no controller to enrol with: pass --controller HOST:PORT or set `controller` in the config file"
        );
        return Err(ExitCode::from(EXIT_USAGE));
    };
    let opts = EnrollOptions {
        controller,
        code,
        advertise_ip: settings.advertise_ip,
        root: settings.root.clone(),
        connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
    };
    match de_agent::enroll(&opts, &settings.state_dir).await {
        Ok(id) => {
            println!("enrolled as node {}", id.meta.node_id);
            Ok(id)
        }
        Err(e) => {
            eprintln!("de-agent: {}", ErrorChain(&e));
            Err(ExitCode::FAILURE)
        }
    }
}

async fn async_main(command: Command, file: Config) -> ExitCode {
    match command {
        Command::MonitSetup => match de_agent::Monit::system_with_httpd().await {
            Ok(m) => {
                println!("monit's HTTP interface: {}", m.httpd_description());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("de-agent: {}", ErrorChain(&e));
                ExitCode::FAILURE
            }
        },
        Command::Enroll {
            controller,
            code,
            code_stdin,
            common,
        } => {
            let settings = Settings::resolve(common, controller, None, None, None, file);
            if Identity::exists(&settings.state_dir) {
                eprintln!(
                    "de-agent: {} already holds an identity: this node is enrolled (remove the directory to enrol again)",
                    settings.state_dir.display()
                );
                return ExitCode::FAILURE;
            }
            let code = match install_code(code, code_stdin) {
                Ok(Some(code)) => code,
                Ok(None) => {
                    eprintln!(
                        "de-agent: no install code: set DE_INSTALL_CODE or pass --code-stdin"
                    );
                    return ExitCode::from(EXIT_USAGE);
                }
                Err(c) => return c,
            };
            match do_enroll(code, &settings).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(c) => c,
            }
        }
        Command::Run {
            controller,
            code,
            code_stdin,
            heartbeat_secs,
            max_backoff_secs,
            monit_control,
            common,
        } => {
            let settings = Settings::resolve(
                common,
                controller,
                heartbeat_secs,
                max_backoff_secs,
                monit_control,
                file,
            );
            let identity = if Identity::exists(&settings.state_dir) {
                // Already enrolled: a code given as well is not needed (nor read).
                match Identity::load(&settings.state_dir) {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("de-agent: {}", ErrorChain(&e));
                        return ExitCode::FAILURE;
                    }
                }
            } else if let Some(code) = match install_code(code, code_stdin) {
                Ok(code) => code,
                Err(c) => return c,
            } {
                match do_enroll(code, &settings).await {
                    Ok(id) => id,
                    Err(c) => return c,
                }
            } else {
                eprintln!(
                    "de-agent: {} holds no identity: enrol first with 'de-agent enroll --controller HOST:PORT' and the install code in DE_INSTALL_CODE (or on standard input with --code-stdin), or give run the code the same way (with --controller, or `controller` in the config file)",
                    settings.state_dir.display()
                );
                return ExitCode::FAILURE;
            };
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                de_common::shutdown_signal().await;
                info!("stopping");
                signal.cancel();
            });
            let opts = LinkOptions {
                state_dir: settings.state_dir.clone(),
                monit_control: settings.monit_control.clone(),
                root: settings.root.clone(),
                heartbeat: Duration::from_secs(settings.heartbeat_secs),
                min_backoff: Duration::from_millis(250),
                max_backoff: Duration::from_secs(settings.max_backoff_secs),
                connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
                cache_max_bytes: settings.cache_max_mb << 20,
            };
            info!(node = %identity.meta.node_id, controller = %identity.meta.controller, "starting");
            match de_agent::run(identity, opts, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("de-agent: {}", ErrorChain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use de_common::cli_docs::{Shell, completions, man_pages};

    /// What the package ships: a completion script per shell and a man page
    /// per command, each naming every subcommand.
    #[test]
    fn completions_and_man_pages_name_every_subcommand() {
        let subcommands = ["enroll", "run", "monit-setup"];
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(Cli::command(), shell)).expect("utf-8");
            for name in subcommands {
                assert!(text.contains(name), "{shell}: no {name}");
            }
        }
        let pages = man_pages(Cli::command());
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "de-agent.1",
                "de-agent-enroll.1",
                "de-agent-run.1",
                "de-agent-monit-setup.1"
            ]
        );
        let top = String::from_utf8_lossy(&pages[0].roff);
        for name in subcommands {
            let name = name.replace('-', "\\-");
            assert!(top.contains(&format!("de\\-agent\\-{name}(1)")), "{top}");
        }
        let run = String::from_utf8_lossy(&pages[2].roff);
        assert!(
            run.contains(".SH NAME") && run.contains("\\-\\-heartbeat\\-secs"),
            "{run}"
        );
    }
}
