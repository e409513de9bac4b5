//! `de-controller`: parses the command line and runs the controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use de_controller::{Controller, TokenOrigin, api, quic};

#[derive(Parser, Debug)]
#[command(
    name = "de-controller",
    version,
    about = "Deployment Engine controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller: REST/WebSocket API and the agents' QUIC endpoint.
    Serve {
        /// Where the store, keys and token live (created on first start, mode 0700).
        #[arg(long, env = "DE_DATA_DIR", default_value = "./de-data")]
        data_dir: PathBuf,
        /// Address of the HTTP API and console.
        #[arg(long, env = "DE_API_LISTEN", default_value = "0.0.0.0:50000")]
        api_listen: SocketAddr,
        /// Address of the QUIC endpoint agents connect to.
        #[arg(long, env = "DE_QUIC_LISTEN", default_value = "0.0.0.0:50001")]
        quic_listen: SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sled=warn,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("de-controller: could not start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("de-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Serve {
        data_dir,
        api_listen,
        quic_listen,
    } = cli.command;
    let (ctl, origin) = Controller::open(&data_dir)
        .with_context(|| format!("could not open the data dir {}", data_dir.display()))?;
    if let TokenOrigin::Created = origin {
        // Printed once, at creation; afterwards it is only in the 0600 file.
        println!(
            "admin token (saved in {}; it is not shown again): {}",
            data_dir.join("admin.token").display(),
            ctl.pki.token()
        );
    }
    let ctl = Arc::new(ctl);
    de_controller::Deployer::resume(&ctl).context("could not resume deployments")?;
    let endpoint = quic::endpoint(quic_listen, &ctl.pki, ctl.nodes.revoked_set())?;
    let quic_addr = endpoint
        .local_addr()
        .context("QUIC endpoint has no address")?;
    let listener = tokio::net::TcpListener::bind(api_listen)
        .await
        .with_context(|| {
            format!("could not listen for HTTP on {api_listen}: is the port in use?")
        })?;
    let api_addr = listener.local_addr()?;
    println!("api listening on {api_addr}");
    println!("quic listening on {quic_addr}");

    let shutdown = CancellationToken::new();
    let quic_task = tokio::spawn(quic::serve(endpoint, ctl.clone(), shutdown.clone()));
    let http_shutdown = shutdown.clone();
    let http = axum::serve(listener, api::app(ctl.clone()))
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await });
    let http_task = tokio::spawn(async move { http.await });

    wait_for_signal().await;
    info!("shutting down");
    shutdown.cancel();
    let grace = Duration::from_secs(10);
    let _ = tokio::time::timeout(grace, quic_task).await;
    let _ = tokio::time::timeout(grace, http_task).await;
    info!("stopped");
    Ok(())
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
