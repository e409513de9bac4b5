//! The controller's config file (TOML): every option of `serve`; unknown keys are refused.
//!
//! Precedence, resolved in `main.rs`: flag > environment variable > this file > built-in default.
//! The packaged file is [`PACKAGED_PATH`], read when it exists and no `--config` is given.
//!
//! Adding an option: a field here, a commented line in `packaging/controller/controller.toml`
//! (the tests below parse it with every commented line switched on), an `Option` clap arg in
//! `main.rs`, and one line where `main.rs` resolves it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use de_controller::PublicAddr;

/// Where the package installs the controller's config file.
pub(crate) const PACKAGED_PATH: &str = "/etc/deployment-engine/controller.toml";

/// The controller's config file; every field is optional and falls back to the built-in default.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) api_listen: Option<SocketAddr>,
    pub(crate) quic_listen: Option<SocketAddr>,
    pub(crate) public_addr: Option<PublicAddr>,
    /// How many times a deployment step is tried in all (1-20).
    pub(crate) step_attempts: Option<u32>,
    /// Seconds a node may be silent before its steps fail naming it (1-86400).
    pub(crate) node_grace: Option<u64>,
    /// Rotate a log file when it would pass this many MiB (0: never).
    pub(crate) log_max_mb: Option<u64>,
    /// Rotated files kept per log (0-100).
    pub(crate) log_keep: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SHIPPED: &str = include_str!("../../packaging/controller/controller.toml");

    fn parse(text: &str) -> Result<Config, String> {
        de_common::parse_toml(Path::new("controller.toml"), text).map_err(|e| e.to_string())
    }

    /// The shipped file with every commented `# key = value` example switched on.
    fn uncommented(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_shipped_config_parses_and_puts_the_data_in_var_lib() {
        let c = parse(SHIPPED).expect("shipped controller.toml");
        assert_eq!(
            c,
            Config {
                data_dir: Some("/var/lib/deployment-engine/controller".into()),
                ..Config::default()
            }
        );
    }

    #[test]
    fn every_documented_option_in_the_shipped_config_is_real() {
        let all = parse(&uncommented(SHIPPED)).expect("uncommented shipped config");
        assert_eq!(all.api_listen, Some("0.0.0.0:50000".parse().expect("addr")));
        assert_eq!(
            all.quic_listen,
            Some("0.0.0.0:50001".parse().expect("addr"))
        );
        assert_eq!(
            all.public_addr.map(|a| a.to_string()).as_deref(),
            Some("controller.example:50001")
        );
        assert_eq!(all.step_attempts, Some(3));
        assert_eq!(all.log_max_mb, Some(de_controller::DEFAULT_LOG_MAX_MB));
        assert_eq!(all.log_keep, Some(de_controller::DEFAULT_LOG_KEEP));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = parse("data_dir = \"/x\"\ndatadir = \"/y\"\n").expect_err("unknown");
        assert!(
            e.starts_with("config file controller.toml, line 2: unknown field `datadir`"),
            "{e}"
        );
        let e = parse("api_listen = \"0.0.0.0\"\n").expect_err("no port");
        assert!(e.contains("line 1, key `api_listen`"), "{e}");
        let e = parse("public_addr = \"ctl; reboot\"\n").expect_err("shell");
        assert!(e.contains("key `public_addr`"), "{e}");
    }

    /// Every config file shipped in `packaging/` is parsed by a test (here or in the agent).
    #[test]
    fn packaging_ships_no_config_file_that_no_test_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read packaging/") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    let rel = path.strip_prefix(&root).expect("under packaging/");
                    found.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        found.sort();
        assert_eq!(found, ["agent/agent.toml", "controller/controller.toml"]);
    }
}
