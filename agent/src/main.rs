//! `de-agent`: enrols a node with an install code and keeps it linked to the controller.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use de_agent::{EnrollOptions, Identity, LinkOptions};

const DEFAULT_STATE_DIR: &str = "/var/lib/deployment-engine/agent";

#[derive(Parser, Debug)]
#[command(name = "de-agent", version, about = "Deployment Engine agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Where the node's identity lives (files mode 0600).
    #[arg(long, env = "DE_AGENT_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// This node's IP as the controller and plans know it; the agent binds to it when it is local.
    #[arg(long, env = "DE_AGENT_ADVERTISE_IP")]
    advertise_ip: Option<IpAddr>,
    /// The node root under which component files go; its disk is the node's disk.
    #[arg(long, env = "DE_AGENT_ROOT", default_value = "/")]
    root: PathBuf,
    /// Seconds to wait for the controller to answer a connection.
    #[arg(long, default_value_t = 10)]
    connect_timeout_secs: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Enrol this node with the controller using a 4-digit install code.
    Enroll {
        /// The controller's QUIC address, HOST:PORT (port 50001 if omitted).
        #[arg(long, env = "DE_CONTROLLER")]
        controller: String,
        /// The 4-digit install code shown in the console.
        #[arg(long, env = "DE_INSTALL_CODE")]
        code: String,
        #[command(flatten)]
        common: Common,
    },
    /// Keep this node linked to the controller (enrolling first if --controller and --code are given and the node has no identity yet).
    Run {
        #[arg(long, env = "DE_CONTROLLER", requires = "code")]
        controller: Option<String>,
        #[arg(long, env = "DE_INSTALL_CODE", requires = "controller")]
        code: Option<String>,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
        heartbeat_secs: u64,
        /// A private monit control file (created with its socket, pid and state files next to it when missing); default: the system monit.
        #[arg(long, env = "DE_AGENT_MONIT_CONTROL")]
        monit_control: Option<PathBuf>,
        /// Upper bound of the reconnect backoff, in seconds.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        max_backoff_secs: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("de-agent: could not start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async_main(cli))
}

async fn do_enroll(
    controller: String,
    code: String,
    common: &Common,
) -> Result<Identity, ExitCode> {
    let opts = EnrollOptions {
        controller,
        code,
        advertise_ip: common.advertise_ip,
        root: common.root.clone(),
        connect_timeout: Duration::from_secs(common.connect_timeout_secs),
    };
    match de_agent::enroll(&opts, &common.state_dir).await {
        Ok(id) => {
            println!("enrolled as node {}", id.meta.node_id);
            Ok(id)
        }
        Err(e) => {
            eprintln!("de-agent: {}", chain(&e));
            Err(ExitCode::FAILURE)
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

async fn async_main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Enroll {
            controller,
            code,
            common,
        } => {
            if Identity::exists(&common.state_dir) {
                eprintln!(
                    "de-agent: {} already holds an identity: this node is enrolled (remove the directory to enrol again)",
                    common.state_dir.display()
                );
                return ExitCode::FAILURE;
            }
            match do_enroll(controller, code, &common).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(c) => c,
            }
        }
        Command::Run {
            controller,
            code,
            heartbeat_secs,
            max_backoff_secs,
            monit_control,
            common,
        } => {
            let identity = if Identity::exists(&common.state_dir) {
                match Identity::load(&common.state_dir) {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("de-agent: {}", chain(&e));
                        return ExitCode::FAILURE;
                    }
                }
            } else if let (Some(controller), Some(code)) = (controller, code) {
                match do_enroll(controller, code, &common).await {
                    Ok(id) => id,
                    Err(c) => return c,
                }
            } else {
                eprintln!(
                    "de-agent: {} holds no identity: enrol first with 'de-agent enroll --controller HOST:PORT --code NNNN' or pass --controller and --code to run",
                    common.state_dir.display()
                );
                return ExitCode::FAILURE;
            };
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                info!("stopping");
                signal.cancel();
            });
            let opts = LinkOptions {
                state_dir: common.state_dir.clone(),
                monit_control,
                root: common.root.clone(),
                heartbeat: Duration::from_secs(heartbeat_secs),
                min_backoff: Duration::from_millis(250),
                max_backoff: Duration::from_secs(max_backoff_secs),
                connect_timeout: Duration::from_secs(common.connect_timeout_secs),
            };
            info!(node = %identity.meta.node_id, controller = %identity.meta.controller, "starting");
            match de_agent::run(identity, opts, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("de-agent: {}", chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
