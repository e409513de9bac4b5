//! The controller's config file (TOML): every option of `serve`; unknown keys are refused.
//!
//! Precedence, resolved in `main.rs`: flag > environment variable > this file > built-in default.
//! The packaged file is [`PACKAGED_PATH`], read when it exists and no `--config` is given.
//!
//! A number out of its range is refused, in the file as on the command line, naming the
//! allowed range: the file's error names the file, the line and the key (and `main.rs` exits
//! 64), a flag's names the flag and the value (clap exits 2), as the agent does.
//!
//! Adding an option: a field here, a commented line in `packaging/controller/controller.toml`
//! (the tests below parse it with every commented line switched on), an `Option` clap arg in
//! `main.rs`, and one line where `main.rs` resolves it.

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{Deserializer, Error as _};

use de_controller::PublicAddr;

/// Where the package installs the controller's config file.
pub(crate) const PACKAGED_PATH: &str = "/etc/deployment-engine/controller.toml";

/// How many times a failing deployment step may be tried in all.
pub(crate) const STEP_ATTEMPTS: RangeInclusive<u32> = 1..=20;
/// The log rotation size in MiB (0: never rotate; at most 1 TiB).
pub(crate) const LOG_MAX_MB: RangeInclusive<u64> = 0..=1_048_576;
/// How many rotated files are kept per log.
pub(crate) const LOG_KEEP: RangeInclusive<u32> = 0..=100;
/// Seconds a node may be silent before its steps fail (at most a day).
pub(crate) const NODE_GRACE: RangeInclusive<u64> = 1..=86_400;
/// Days a node certificate is valid (at most 5 years); agents renew it in its last third.
pub(crate) const NODE_CERT_DAYS: RangeInclusive<u32> = 1..=1825;
pub(crate) const ARTIFACT_MAX_MB: RangeInclusive<u64> = 1..=1_048_576;
/// Days the records of ended steps are kept (at most 10 years).
pub(crate) const STEP_HISTORY_DAYS: RangeInclusive<u64> = 1..=3650;
/// Records of steps kept per node and lane.
pub(crate) const STEP_HISTORY_PER_LANE: RangeInclusive<usize> = 1..=1_000_000;
/// Steps handed out to agents and not answered yet, at most.
pub(crate) const HANDOUT_WINDOW: RangeInclusive<usize> = 1..=1_000_000;

/// The controller's config file; every field is optional and falls back to the built-in default.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) api_listen: Option<SocketAddr>,
    pub(crate) quic_listen: Option<SocketAddr>,
    /// Where `/metrics` is also served, without a token.
    pub(crate) metrics_listen: Option<SocketAddr>,
    pub(crate) public_addr: Option<PublicAddr>,
    /// How many times a deployment step is tried in all ([`STEP_ATTEMPTS`]).
    #[serde(default, deserialize_with = "step_attempts")]
    pub(crate) step_attempts: Option<u32>,
    /// Seconds a node may be silent before its steps fail naming it ([`NODE_GRACE`]).
    #[serde(default, deserialize_with = "node_grace")]
    pub(crate) node_grace: Option<u64>,
    /// Rotate a log file when it would pass this many MiB (0: never; [`LOG_MAX_MB`]).
    #[serde(default, deserialize_with = "log_max_mb")]
    pub(crate) log_max_mb: Option<u64>,
    /// Rotated files kept per log ([`LOG_KEEP`]).
    #[serde(default, deserialize_with = "log_keep")]
    pub(crate) log_keep: Option<u32>,
    pub(crate) api_tls: Option<bool>,
    pub(crate) api_cert: Option<PathBuf>,
    pub(crate) api_key: Option<PathBuf>,
    pub(crate) api_names: Option<Vec<String>>,
    pub(crate) packages_dir: Option<PathBuf>,
    /// Days a node certificate is valid ([`NODE_CERT_DAYS`]).
    #[serde(default, deserialize_with = "node_cert_days")]
    pub(crate) node_cert_days: Option<u32>,
    /// The largest artifact upload, MiB ([`ARTIFACT_MAX_MB`]).
    #[serde(default, deserialize_with = "artifact_max_mb")]
    pub(crate) artifact_max_mb: Option<u64>,
    /// `text` or `json`.
    pub(crate) log_format: Option<de_common::LogFormat>,
    /// Days an ended step's record is kept ([`STEP_HISTORY_DAYS`]).
    #[serde(default, deserialize_with = "step_history_days")]
    pub(crate) step_history_days: Option<u64>,
    /// Step records kept per node and lane, the newest ([`STEP_HISTORY_PER_LANE`]).
    #[serde(default, deserialize_with = "step_history_per_lane")]
    pub(crate) step_history_per_lane: Option<usize>,
    /// Steps handed out and not answered yet, at most ([`HANDOUT_WINDOW`]).
    #[serde(default, deserialize_with = "handout_window")]
    pub(crate) handout_window: Option<usize>,
}

fn in_file<'de, D, T>(d: D, range: &RangeInclusive<T>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + Display,
{
    let v = T::deserialize(d)?;
    if range.contains(&v) {
        Ok(Some(v))
    } else {
        Err(D::Error::custom(format!(
            "must be between {} and {}, got {v}",
            range.start(),
            range.end()
        )))
    }
}

fn step_attempts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    in_file(d, &STEP_ATTEMPTS)
}

fn log_max_mb<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    in_file(d, &LOG_MAX_MB)
}

fn log_keep<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    in_file(d, &LOG_KEEP)
}

fn node_grace<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    in_file(d, &NODE_GRACE)
}

fn node_cert_days<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    in_file(d, &NODE_CERT_DAYS)
}

fn artifact_max_mb<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    in_file(d, &ARTIFACT_MAX_MB)
}

fn step_history_days<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    in_file(d, &STEP_HISTORY_DAYS)
}

fn step_history_per_lane<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    in_file(d, &STEP_HISTORY_PER_LANE)
}

fn handout_window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    in_file(d, &HANDOUT_WINDOW)
}

/// A flag's (or its environment variable's) value: a number in `range`.
pub(crate) fn flag<T: FromStr + PartialOrd + Display>(
    s: &str,
    range: &RangeInclusive<T>,
) -> Result<T, String> {
    match s.trim().parse::<T>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!(
            "must be a number from {} to {}",
            range.start(),
            range.end()
        )),
    }
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
                api_tls: Some(true),
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
            all.metrics_listen,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        assert_eq!(
            all.public_addr.map(|a| a.to_string()).as_deref(),
            Some("controller.example:50001")
        );
        assert_eq!(all.step_attempts, Some(3));
        assert_eq!(all.log_max_mb, Some(de_controller::DEFAULT_LOG_MAX_MB));
        assert_eq!(all.log_keep, Some(de_controller::DEFAULT_LOG_KEEP));
        assert_eq!(
            all.api_names,
            Some(vec!["controller.example".into(), "192.0.2.1".into()])
        );
        assert!(all.api_cert.is_some() && all.api_key.is_some());
        assert_eq!(
            all.packages_dir.as_deref(),
            Some(Path::new("/usr/share/deployment-engine/packages"))
        );
        assert_eq!(
            all.node_cert_days,
            Some(de_controller::DEFAULT_NODE_CERT_DAYS)
        );
        assert_eq!(all.log_format, Some(de_common::LogFormat::Json));
        assert_eq!(
            all.artifact_max_mb,
            Some(de_controller::artifacts::DEFAULT_ARTIFACT_MAX_MB)
        );
        let history = de_controller::agents::history::StepHistory::default();
        assert_eq!(
            all.step_history_days.map(|d| d * 86_400),
            Some(history.max_age.as_secs())
        );
        assert_eq!(all.step_history_per_lane, Some(history.per_lane));
        assert_eq!(
            all.handout_window,
            Some(de_controller::agents::handout::DEFAULT_HANDOUT_WINDOW)
        );
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

    #[test]
    fn numbers_out_of_range_are_refused_naming_the_key_and_the_range() {
        for (text, key, range) in [
            (
                "step_attempts = 0",
                "step_attempts",
                "between 1 and 20, got 0",
            ),
            (
                "step_attempts = 21",
                "step_attempts",
                "between 1 and 20, got 21",
            ),
            (
                "log_max_mb = 1048577",
                "log_max_mb",
                "between 0 and 1048576, got 1048577",
            ),
            ("log_keep = 101", "log_keep", "between 0 and 100, got 101"),
            (
                "node_cert_days = 0",
                "node_cert_days",
                "between 1 and 1825, got 0",
            ),
            (
                "node_cert_days = 1826",
                "node_cert_days",
                "between 1 and 1825, got 1826",
            ),
            (
                "step_history_days = 0",
                "step_history_days",
                "between 1 and 3650, got 0",
            ),
            (
                "step_history_per_lane = 0",
                "step_history_per_lane",
                "between 1 and 1000000, got 0",
            ),
            (
                "handout_window = 0",
                "handout_window",
                "between 1 and 1000000, got 0",
            ),
        ] {
            let e = parse(&format!("data_dir = \"/x\"\n{text}\n")).expect_err(text);
            assert!(
                e.starts_with(&format!(
                    "config file controller.toml, line 2, key `{key}`: must be {range}"
                )),
                "{text}: {e}"
            );
        }
        let e = parse("log_keep = -1\n").expect_err("negative");
        assert!(e.contains("key `log_keep`"), "{e}");
    }

    #[test]
    fn the_ends_of_each_range_are_accepted() {
        let low = parse("step_attempts = 1\nlog_max_mb = 0\nlog_keep = 0\n").expect("low ends");
        assert_eq!(
            (low.step_attempts, low.log_max_mb, low.log_keep),
            (Some(1), Some(0), Some(0))
        );
        let high =
            parse("step_attempts = 20\nlog_max_mb = 1048576\nlog_keep = 100\n").expect("high ends");
        assert_eq!(
            (high.step_attempts, high.log_max_mb, high.log_keep),
            (Some(20), Some(1_048_576), Some(100))
        );
    }

    #[test]
    fn a_flag_takes_a_number_in_its_range_only() {
        assert_eq!(flag("20", &STEP_ATTEMPTS), Ok(20));
        assert_eq!(flag("0", &LOG_KEEP), Ok(0));
        for bad in ["0", "21", "-1", "three", ""] {
            assert_eq!(
                flag(bad, &STEP_ATTEMPTS),
                Err("must be a number from 1 to 20".to_owned()),
                "{bad:?}"
            );
        }
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
