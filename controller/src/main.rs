//! `de-controller`: parses the command line and runs the controller.

mod config;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use de_controller::agents::history::{self, StepHistory};
use de_controller::{Controller, PublicAddr, TokenOrigin, http, quic};

use crate::config::{
    ARTIFACT_MAX_MB, Config, HANDOUT_WINDOW, LOG_KEEP, LOG_MAX_MB, NODE_CERT_DAYS, NODE_GRACE,
    PACKAGED_PATH, STEP_ATTEMPTS, STEP_HISTORY_DAYS, STEP_HISTORY_PER_LANE,
};

const DEFAULT_DATA_DIR: &str = "./de-data";
const DEFAULT_API_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 50000);
const DEFAULT_QUIC_LISTEN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    de_controller::DEFAULT_QUIC_PORT,
);
/// Exit status for a bad command line or config file (sysexits' EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "de-controller",
    version,
    about = "Deployment Engine controller"
)]
struct Cli {
    /// Config file (TOML). Default: /etc/deployment-engine/controller.toml when it exists.
    /// Flags and environment variables override its values.
    #[arg(long, global = true, env = "DE_CONTROLLER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object per line, with
    /// the span fields, for journald and log shippers) [default: text; also
    /// `log_format` in the config file].
    #[arg(long, global = true, env = "DE_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<de_common::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller: REST/WebSocket API and the agents' QUIC endpoint.
    Serve {
        /// Where the store, keys and token live (created on first start, mode 0700) [default: ./de-data].
        #[arg(long, env = "DE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address of the HTTP API and console [default: 0.0.0.0:50000].
        #[arg(long, env = "DE_API_LISTEN")]
        api_listen: Option<SocketAddr>,
        /// Address of the QUIC endpoint agents connect to [default: 0.0.0.0:50001].
        #[arg(long, env = "DE_QUIC_LISTEN")]
        quic_listen: Option<SocketAddr>,
        /// Also serve GET /metrics (Prometheus) on this address, plain HTTP and
        /// without a token, for a scraper on a trusted network [default: only
        /// on the API, with any valid token].
        #[arg(long, env = "DE_METRICS_LISTEN", value_name = "ADDR:PORT")]
        metrics_listen: Option<SocketAddr>,
        /// HOST[:PORT] that nodes dial, shown in the install command [default: the QUIC
        /// listen address, or this machine's host name when that is 0.0.0.0].
        #[arg(long, env = "DE_PUBLIC_ADDR")]
        public_addr: Option<PublicAddr>,
        /// How many times a failing deployment step is tried in all, 1-20 [default: 3].
        #[arg(long, env = "DE_STEP_ATTEMPTS", value_parser = |s: &str| config::flag(s, &STEP_ATTEMPTS))]
        step_attempts: Option<u32>,
        /// Seconds a node may be silent (no heartbeat) before its queued and
        /// running steps fail naming it, 1-86400 [default: 60].
        #[arg(long, env = "DE_NODE_GRACE", value_parser = |s: &str| config::flag(s, &NODE_GRACE))]
        node_grace: Option<u64>,
        /// Rotate each log file when a write would take it past this many MiB; 0: never [default: 64].
        #[arg(long, env = "DE_LOG_MAX_MB", value_parser = |s: &str| config::flag(s, &LOG_MAX_MB))]
        log_max_mb: Option<u64>,
        /// How many rotated files to keep per log (NAME.1 ... NAME.N), 0-100 [default: 4].
        #[arg(long, env = "DE_LOG_KEEP", value_parser = |s: &str| config::flag(s, &LOG_KEEP))]
        log_keep: Option<u32>,
        /// Serve the API and console over HTTPS (`--api-tls=false`: plain HTTP,
        /// for legacy clients on a trusted network) [default: false; the
        /// packaged config turns it on].
        #[arg(long, env = "DE_API_TLS", num_args = 0..=1, default_missing_value = "true")]
        api_tls: Option<bool>,
        /// The API's certificate chain (PEM, leaf first) instead of one issued
        /// from the controller's CA (DATA/ca.pem); needs --api-key, implies --api-tls.
        #[arg(long, env = "DE_API_CERT", value_name = "FILE", requires = "api_key")]
        api_cert: Option<PathBuf>,
        /// The private key of --api-cert (PEM).
        #[arg(long, env = "DE_API_KEY", value_name = "FILE", requires = "api_cert")]
        api_key: Option<PathBuf>,
        /// A host name or IP the API certificate issued from the CA holds
        /// (repeat it) [default: the public address's host, this host's name,
        /// localhost, 127.0.0.1, ::1 and the API's listen IP].
        #[arg(
            long = "api-name",
            env = "DE_API_NAMES",
            value_delimiter = ',',
            value_name = "NAME"
        )]
        api_names: Vec<String>,
        /// Directory of the packages nodes download through /join.sh (the
        /// agent's .deb, and any other .deb offline nodes need, such as monit's)
        /// [default: /usr/share/deployment-engine/packages, then DATA/packages].
        #[arg(long, env = "DE_PACKAGES_DIR", value_name = "DIR")]
        packages_dir: Option<PathBuf>,
        /// Days a node certificate is valid; agents renew it in its last third, 1-1825 [default: 90].
        #[arg(long, env = "DE_NODE_CERT_DAYS", value_parser = |s: &str| config::flag(s, &NODE_CERT_DAYS))]
        node_cert_days: Option<u32>,
        /// Days the record of an ended step (an exec's answer, a deployment
        /// step's output) is kept, 1-3650 [default: 7]. Steps of a running
        /// deployment, and the last step of each node's queue, are kept longer.
        #[arg(long, env = "DE_STEP_HISTORY_DAYS", value_parser = |s: &str| config::flag(s, &STEP_HISTORY_DAYS))]
        step_history_days: Option<u64>,
        /// At most this many step records are kept per node and lane (the
        /// newest), 1-1000000 [default: 20].
        #[arg(long, env = "DE_STEP_HISTORY_PER_LANE", value_parser = |s: &str| config::flag(s, &STEP_HISTORY_PER_LANE))]
        step_history_per_lane: Option<usize>,
        /// At most this many steps handed out to agents and not answered
        /// yet, controller-wide, 1-1000000 [default: 50]. A fan-out to
        /// thousands of nodes goes out this many at a time; across a WAN
        /// it bounds steps per round trip, so raise it there.
        #[arg(long, env = "DE_HANDOUT_WINDOW", value_parser = |s: &str| config::flag(s, &HANDOUT_WINDOW))]
        handout_window: Option<usize>,
        /// Test only: a step-history pass every this many seconds, keeping
        /// steps that ended less than this ago (instead of 600).
        #[arg(long, env = "DE_TEST_HISTORY_SECS", hide = true, value_parser = |s: &str| config::flag(s, &(1..=3600u64)))]
        test_history_secs: Option<u64>,
        /// Test only: node certificates valid this many seconds (overrides
        /// --node-cert-days), so that tests see renewals in seconds.
        #[arg(long, env = "DE_TEST_NODE_CERT_SECS", hide = true, value_parser = |s: &str| config::flag(s, &(10..=86_400u64)))]
        test_node_cert_secs: Option<u64>,
        /// Test only: send artifacts to agents at most this many KiB/s, so
        /// that tests can cut a link in the middle of a transfer.
        #[arg(long, env = "DE_TEST_ARTIFACT_KIBPS", hide = true, value_parser = |s: &str| config::flag(s, &(1..=10_485_760u64)))]
        test_artifact_kibps: Option<u64>,
        /// The largest artifact upload, in MiB, 1-1048576 [default: 4096].
        #[arg(long, env = "DE_ARTIFACT_MAX_MB", value_parser = |s: &str| config::flag(s, &ARTIFACT_MAX_MB))]
        artifact_max_mb: Option<u64>,
    },
}

/// Every option, resolved: flag > environment variable > config file > built-in default.
#[derive(Debug)]
struct Settings {
    data_dir: PathBuf,
    api_listen: SocketAddr,
    quic_listen: SocketAddr,
    /// `None`: `/metrics` only on the API.
    metrics_listen: Option<SocketAddr>,
    public_addr: Option<PublicAddr>,
    step_attempts: u32,
    node_grace: Duration,
    step_history: StepHistory,
    handout_window: usize,
    log_limits: de_controller::LogLimits,
    /// `None`: plain HTTP.
    api_tls: Option<ApiTlsSetting>,
    packages_dirs: Vec<PathBuf>,
    node_cert_lifetime: Duration,
    artifact_max_bytes: u64,
    test_artifact_kibps: Option<u64>,
}

/// Where the API's certificate comes from, before the data dir is open.
#[derive(Debug, PartialEq, Eq)]
enum ApiTlsSetting {
    Own { names: Vec<String> },
    Files { cert: PathBuf, key: PathBuf },
}

/// Where the controller package puts the agent package it was built with.
const PACKAGED_PACKAGES_DIR: &str = "/usr/share/deployment-engine/packages";

impl Settings {
    fn resolve(command: Command, file: Config) -> Result<Settings, String> {
        let Command::Serve {
            data_dir,
            api_listen,
            quic_listen,
            metrics_listen,
            public_addr,
            step_attempts,
            node_grace,
            log_max_mb,
            log_keep,
            api_tls,
            api_cert,
            api_key,
            api_names,
            packages_dir,
            node_cert_days,
            step_history_days,
            step_history_per_lane,
            handout_window,
            test_history_secs,
            test_node_cert_secs,
            artifact_max_mb,
            test_artifact_kibps,
        } = command;
        let data_dir: PathBuf =
            (data_dir.or(file.data_dir)).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        let cert_files = match (api_cert.or(file.api_cert), api_key.or(file.api_key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err("api_cert is set without api_key: give both, or neither to use a certificate from the controller's CA".into()),
            (None, Some(_)) => return Err("api_key is set without api_cert: give both, or neither to use a certificate from the controller's CA".into()),
        };
        let api_tls = match (api_tls.or(file.api_tls), cert_files) {
            (Some(false), Some(_)) => return Err("api_tls is false but api_cert and api_key are set: turn api_tls on, or remove the certificate".into()),
            (_, Some((cert, key))) => Some(ApiTlsSetting::Files { cert, key }),
            (Some(true), None) => Some(ApiTlsSetting::Own {
                names: if api_names.is_empty() { file.api_names.unwrap_or_default() } else { api_names },
            }),
            (_, None) => None,
        };
        let packages_dirs = match packages_dir.or(file.packages_dir) {
            Some(d) => vec![d],
            None => vec![
                PathBuf::from(PACKAGED_PACKAGES_DIR),
                data_dir.join("packages"),
            ],
        };
        Ok(Settings {
            data_dir,
            api_listen: (api_listen.or(file.api_listen)).unwrap_or(DEFAULT_API_LISTEN),
            quic_listen: (quic_listen.or(file.quic_listen)).unwrap_or(DEFAULT_QUIC_LISTEN),
            metrics_listen: metrics_listen.or(file.metrics_listen),
            public_addr: public_addr.or(file.public_addr),
            // Both sources were checked against the ranges in `config.rs`.
            step_attempts: step_attempts
                .or(file.step_attempts)
                .unwrap_or(de_controller::DEFAULT_STEP_ATTEMPTS),
            node_grace: node_grace
                .or(file.node_grace)
                .map(Duration::from_secs)
                .unwrap_or(de_controller::agents::watchdog::DEFAULT_NODE_GRACE),
            step_history: StepHistory {
                max_age: step_history_days
                    .or(file.step_history_days)
                    .map_or(history::DEFAULT_MAX_AGE, |d| {
                        Duration::from_secs(d * 86_400)
                    }),
                per_lane: step_history_per_lane
                    .or(file.step_history_per_lane)
                    .unwrap_or(history::DEFAULT_PER_LANE),
                min_keep: test_history_secs.map_or(history::MIN_KEEP, Duration::from_secs),
                every: test_history_secs.map_or(history::TICK, Duration::from_secs),
            },
            handout_window: handout_window
                .or(file.handout_window)
                .unwrap_or(de_controller::agents::handout::DEFAULT_HANDOUT_WINDOW),
            log_limits: de_controller::LogLimits {
                max_bytes: log_max_mb
                    .or(file.log_max_mb)
                    .unwrap_or(de_controller::DEFAULT_LOG_MAX_MB)
                    << 20,
                keep: log_keep
                    .or(file.log_keep)
                    .unwrap_or(de_controller::DEFAULT_LOG_KEEP),
            },
            api_tls,
            packages_dirs,
            test_artifact_kibps,
            artifact_max_bytes: artifact_max_mb
                .or(file.artifact_max_mb)
                .unwrap_or(de_controller::artifacts::DEFAULT_ARTIFACT_MAX_MB)
                << 20,
            node_cert_lifetime: test_node_cert_secs.map_or_else(
                || {
                    let days = node_cert_days
                        .or(file.node_cert_days)
                        .unwrap_or(de_controller::DEFAULT_NODE_CERT_DAYS);
                    Duration::from_secs(u64::from(days) * 86_400)
                },
                Duration::from_secs,
            ),
        })
    }
}

fn main() -> std::process::ExitCode {
    // Also writes the completions and man pages (hidden `completions`, `man`).
    let cli = de_common::cli_docs::parse::<Cli>();
    let (file, from) =
        match de_common::load_config::<Config>(cli.config.as_deref(), Path::new(PACKAGED_PATH)) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("de-controller: {}", de_common::ErrorChain(&e));
                return std::process::ExitCode::from(EXIT_USAGE);
            }
        };
    de_common::init_logging(
        "info,sled=warn,quinn=warn",
        cli.log_format.or(file.log_format).unwrap_or_default(),
    );
    if let Some(path) = from {
        tracing::debug!(config = %path.display(), "read the config file");
    }
    let settings = match Settings::resolve(cli.command, file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("de-controller: {e}");
            return std::process::ExitCode::from(EXIT_USAGE);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("de-controller: could not start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("de-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let Settings {
        data_dir,
        api_listen,
        quic_listen,
        metrics_listen,
        public_addr,
        step_attempts,
        node_grace,
        step_history,
        handout_window,
        log_limits,
        api_tls,
        packages_dirs,
        node_cert_lifetime,
        artifact_max_bytes,
        test_artifact_kibps,
    } = settings;
    let (mut ctl, origin) = Controller::open(&data_dir)
        .with_context(|| format!("could not open the data dir {}", data_dir.display()))?;
    ctl.steps.set_handout_window(handout_window);
    if let TokenOrigin::Created = origin {
        let path = data_dir.join("admin.token");
        if stdout_is_the_journal() {
            // Under systemd stdout is a log: the token stays in its 0600 file only.
            println!("admin token created in {} (mode 0600)", path.display());
        } else {
            // Printed once, at creation; afterwards it is only in the 0600 file.
            println!(
                "admin token (saved in {}; it is not shown again): {}",
                path.display(),
                ctl.pki.token()
            );
        }
    }
    ctl.deployer.set_attempts(step_attempts);
    ctl.logs.set_limits(log_limits);
    ctl.pki.set_node_cert_lifetime(node_cert_lifetime);
    ctl.artifact_max_bytes = artifact_max_bytes;
    ctl.artifact_send_kibps = test_artifact_kibps;
    let endpoint = quic::endpoint(quic_listen, &ctl.pki, ctl.nodes.revoked_set())?;
    let quic_addr = endpoint
        .local_addr()
        .context("QUIC endpoint has no address")?;
    ctl.agent_addr =
        de_controller::agent_address(public_addr.as_ref(), quic_addr, &de_controller::hostname());
    if public_addr.is_none() && quic_addr.ip().is_unspecified() {
        warn!(agent_addr = %ctl.agent_addr, "agents are told to dial this host's name; set public_addr if nodes reach the controller by another name");
    } else {
        info!(agent_addr = %ctl.agent_addr, "agents are told to dial");
    }
    let listener = tokio::net::TcpListener::bind(api_listen)
        .await
        .with_context(|| {
            format!("could not listen for HTTP on {api_listen}: is the port in use?")
        })?;
    let api_addr = listener.local_addr()?;
    let metrics_listener = match metrics_listen {
        None => None,
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("could not listen for metrics on {addr}: is the port in use?")
        })?),
    };
    let tls = match api_tls {
        None => {
            if !api_addr.ip().is_loopback() {
                warn!(%api_addr, "the API is plain HTTP: tokens and install codes cross the network in clear; turn on api_tls");
            }
            None
        }
        Some(setting) => {
            let source = match setting {
                ApiTlsSetting::Files { cert, key } => http::tls::ApiCert::Files { cert, key },
                ApiTlsSetting::Own { names } => http::tls::ApiCert::Own {
                    data_dir: data_dir.clone(),
                    names: api_cert_names(names, &ctl.agent_addr, api_addr),
                },
            };
            let tls = http::tls::ApiTls::load(&ctl.pki, &source)
                .map_err(|e| anyhow::anyhow!("{}", de_common::ErrorChain(&e)))
                .context("could not set up HTTPS for the API")?;
            let dirs: Vec<&Path> = packages_dirs.iter().map(PathBuf::as_path).collect();
            let packages = de_controller::agents::join::Packages::scan(&dirs)
                .map_err(|e| anyhow::anyhow!("{}", de_common::ErrorChain(&e)))?;
            match packages.agent() {
                Some(p) => info!(package = %p.name, sha256 = %p.sha256, "nodes join with /join.sh"),
                None => {
                    warn!(dirs = ?packages_dirs, "no deployment-engine-agent_*.deb to offer nodes: install codes show the install-agent.sh line instead of /join.sh")
                }
            }
            ctl.join = Some(de_controller::agents::join::Join {
                api: de_controller::agents::join::Join::api_addr(&ctl.agent_addr, api_addr.port()),
                pin: tls.pin.clone(),
                packages,
            });
            Some(tls)
        }
    };
    let ctl = Arc::new(ctl);
    de_controller::Deployer::resume(&ctl).context("could not resume deployments")?;
    if let Some(tls) = &tls {
        // For scripts and for others to pin: the API key's pin, the CA's
        // fingerprint; before the listening lines, which scripts wait for.
        println!("api https pin {}", tls.pin);
        println!(
            "api https ca {} sha256 {}",
            data_dir.join("ca.pem").display(),
            http::tls::fingerprint(&ctl.pki.ca_der())
        );
    }
    let shutdown = CancellationToken::new();
    println!("api listening on {api_addr}");
    let metrics_task = match metrics_listener {
        None => None,
        Some(listener) => {
            let addr = listener.local_addr()?;
            println!("metrics listening on {addr}");
            info!(%addr, "GET /metrics is served here without a token");
            let shutdown = shutdown.clone();
            let metrics = axum::serve(listener, http::metrics_app(ctl.clone()))
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            Some(tokio::spawn(async move { metrics.await }))
        }
    };
    println!("quic listening on {quic_addr}");

    let quic_task = tokio::spawn(quic::serve(endpoint, ctl.clone(), shutdown.clone()));
    let watchdog = tokio::spawn(de_controller::agents::watchdog::run(
        ctl.clone(),
        node_grace,
        shutdown.clone(),
    ));
    let history_task = tokio::spawn(history::run(ctl.clone(), step_history, shutdown.clone()));
    let http_shutdown = shutdown.clone();
    let app = http::app(ctl.clone());
    let http_task = match &tls {
        None => {
            let http = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await });
            tokio::spawn(async move { http.await })
        }
        Some(tls) => {
            let listener = http::tls::TlsListener::new(listener, tls)?;
            let https = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await });
            tokio::spawn(async move { https.await })
        }
    };

    de_common::shutdown_signal().await;
    info!("shutting down");
    shutdown.cancel();
    let grace = Duration::from_secs(10);
    let _ = tokio::time::timeout(grace, quic_task).await;
    let _ = tokio::time::timeout(grace, http_task).await;
    let _ = tokio::time::timeout(grace, watchdog).await;
    let _ = tokio::time::timeout(grace, history_task).await;
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(grace, task).await;
    }
    info!("stopped");
    Ok(())
}

/// The names an API certificate from the CA holds: the operator's, or the
/// host nodes dial, this host's name, loopback, and the listen IP.
fn api_cert_names(given: Vec<String>, agent_addr: &str, api: SocketAddr) -> Vec<String> {
    if !given.is_empty() {
        return given;
    }
    let dial = agent_addr
        .rsplit_once(':')
        .map_or(agent_addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let mut names = vec![dial, de_controller::hostname(), "localhost".into()];
    if !api.ip().is_unspecified() {
        names.push(api.ip().to_string());
    }
    names.extend(["127.0.0.1".into(), "::1".into()]);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Whether stdout is connected to the systemd journal (`JOURNAL_STREAM` names its device and inode).
fn stdout_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/1") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["de-controller", "serve"].iter().chain(args))
    }

    #[test]
    fn out_of_range_flags_are_refused_naming_the_flag_the_value_and_the_range() {
        for (flag, value, range) in [
            ("--step-attempts", "0", "from 1 to 20"),
            ("--step-attempts", "21", "from 1 to 20"),
            ("--log-max-mb", "1048577", "from 0 to 1048576"),
            ("--log-keep", "101", "from 0 to 100"),
            ("--log-keep", "-1", "from 0 to 100"),
            ("--node-cert-days", "0", "from 1 to 1825"),
        ] {
            let e = serve(&[&format!("{flag}={value}")]).expect_err(flag);
            assert_eq!(e.exit_code(), 2, "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("invalid value '{value}' for '{flag}"))
                    && text.contains(range),
                "{flag} {value}: {text}"
            );
        }
    }

    #[test]
    fn https_comes_from_the_flag_or_the_file_and_a_half_given_certificate_is_refused() {
        let file = |text: &str| -> Config {
            de_common::parse_toml(Path::new("controller.toml"), text).expect("config")
        };
        let s = |args: &[&str], f: Config| Settings::resolve(serve(args).expect("args").command, f);
        let own = |names: &[&str]| {
            Some(ApiTlsSetting::Own {
                names: names.iter().map(|n| n.to_string()).collect(),
            })
        };
        assert_eq!(
            s(&["--api-tls"], Config::default()).expect("on").api_tls,
            own(&[])
        );
        assert_eq!(
            s(&[], file("api_tls = true")).expect("file").api_tls,
            own(&[])
        );
        assert_eq!(
            s(&["--api-tls=false"], file("api_tls = true"))
                .expect("flag wins")
                .api_tls,
            None
        );
        assert_eq!(
            s(
                &["--api-tls", "--api-name", "a.example,192.0.2.1"],
                file("api_names = [\"x\"]")
            )
            .expect("names")
            .api_tls,
            own(&["a.example", "192.0.2.1"])
        );
        assert_eq!(
            s(
                &["--api-cert", "c.pem", "--api-key", "k.pem"],
                Config::default()
            )
            .expect("files")
            .api_tls,
            Some(ApiTlsSetting::Files {
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        let e = s(&[], file("api_cert = \"c.pem\"")).expect_err("no key");
        assert!(e.contains("api_cert is set without api_key"), "{e}");
        let e = s(
            &["--api-tls=false"],
            file("api_cert = \"c.pem\"\napi_key = \"k.pem\""),
        )
        .expect_err("off with a cert");
        assert!(e.contains("api_tls is false"), "{e}");
        assert!(serve(&["--api-cert", "c.pem"]).is_err(), "clap wants both");
        let dirs = s(&["--data-dir", "d"], Config::default())
            .expect("dirs")
            .packages_dirs;
        assert_eq!(
            dirs,
            [
                PathBuf::from(PACKAGED_PACKAGES_DIR),
                PathBuf::from("d/packages")
            ]
        );
    }

    /// What the package ships: a completion script per shell and a man page
    /// per command, each naming the subcommand.
    #[test]
    fn completions_and_man_pages_name_every_subcommand() {
        use clap::CommandFactory;
        use de_common::cli_docs::{Shell, completions, man_pages};
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(Cli::command(), shell)).expect("utf-8");
            assert!(
                text.contains("serve") && text.contains("api-listen"),
                "{shell}: {text}"
            );
        }
        let pages = man_pages(Cli::command());
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(names, ["de-controller.1", "de-controller-serve.1"]);
        let top = String::from_utf8_lossy(&pages[0].roff);
        assert!(top.contains("de\\-controller\\-serve(1)"), "{top}");
        let serve = String::from_utf8_lossy(&pages[1].roff);
        assert!(
            serve.contains(".SH NAME") && serve.contains("\\-\\-api\\-listen"),
            "{serve}"
        );
        // The test-only flags stay out of the pages.
        assert!(!serve.contains("test\\-node"), "{serve}");
    }

    /// `text` read as `controller.toml`.
    fn config_file(text: &str) -> Config {
        de_common::parse_toml(Path::new("controller.toml"), text).expect("config")
    }

    /// The settings of `serve` with `args` and the config file `f`.
    fn settings(args: &[&str], f: Config) -> Settings {
        Settings::resolve(serve(args).expect("args").command, f).expect("settings")
    }

    #[test]
    fn step_history_comes_from_the_flag_then_the_file_then_the_defaults() {
        let file = config_file;
        let s = |args: &[&str], f: Config| settings(args, f).step_history;
        assert_eq!(s(&[], Config::default()), StepHistory::default());
        let f = || file("step_history_days = 2\nstep_history_per_lane = 10");
        assert_eq!(
            s(&[], f()),
            StepHistory {
                max_age: Duration::from_secs(2 * 86_400),
                per_lane: 10,
                ..StepHistory::default()
            }
        );
        assert_eq!(
            s(&["--step-history-per-lane", "3"], f()),
            StepHistory {
                max_age: Duration::from_secs(2 * 86_400),
                per_lane: 3,
                ..StepHistory::default()
            },
            "the flag wins"
        );
        assert!(serve(&["--step-history-days", "0"]).is_err());
    }

    #[test]
    fn the_handout_window_comes_from_the_flag_then_the_file_then_the_default() {
        let file = config_file;
        let w = |args: &[&str], f: Config| settings(args, f).handout_window;
        assert_eq!(
            w(&[], Config::default()),
            de_controller::agents::handout::DEFAULT_HANDOUT_WINDOW
        );
        assert_eq!(w(&[], file("handout_window = 5000")), 5000);
        assert_eq!(
            w(&["--handout-window", "70"], file("handout_window = 5000")),
            70,
            "the flag wins"
        );
        assert!(serve(&["--handout-window", "0"]).is_err());
    }

    #[test]
    fn the_metrics_listener_is_off_unless_the_flag_or_the_file_sets_it() {
        let file = |text: &str| -> Config {
            de_common::parse_toml(Path::new("controller.toml"), text).expect("config")
        };
        let s = |args: &[&str], f: Config| {
            Settings::resolve(serve(args).expect("args").command, f).expect("settings")
        };
        assert_eq!(s(&[], Config::default()).metrics_listen, None);
        let from_file = file("metrics_listen = \"127.0.0.1:9464\"");
        assert_eq!(
            s(&[], from_file).metrics_listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        let from_file = file("metrics_listen = \"127.0.0.1:9464\"");
        assert_eq!(
            s(&["--metrics-listen", "127.0.0.2:9100"], from_file).metrics_listen,
            Some("127.0.0.2:9100".parse().expect("addr")),
            "the flag wins"
        );
        assert!(
            serve(&["--metrics-listen", "9464"]).is_err(),
            "needs ADDR:PORT"
        );
    }

    #[test]
    fn flags_at_the_ends_of_their_ranges_are_used_as_given() {
        let cli = serve(&[
            "--step-attempts",
            "20",
            "--log-max-mb",
            "0",
            "--log-keep",
            "100",
        ])
        .expect("in range");
        let s = Settings::resolve(cli.command, Config::default()).expect("settings");
        assert_eq!(s.api_tls, None);
        assert_eq!(
            (s.step_attempts, s.log_limits.max_bytes, s.log_limits.keep),
            (20, 0, 100)
        );
    }
}
