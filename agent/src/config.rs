//! The agent's config file (TOML): every option of `enroll` and `run`; unknown keys are refused.
//!
//! Precedence, resolved in `main.rs`: flag > environment variable > this file > built-in default.
//! The packaged file is [`PACKAGED_PATH`], read when it exists and no `--config` is given.
//!
//! The install code is deliberately *not* an option: it is used once, at enrolment, and must
//! not stay on disk, so a `code` key is refused with a message saying how to pass it.
//! `controller` is the address to enrol with; after enrolment the agent dials the address
//! recorded in the state dir's `agent.json`.
//!
//! Adding an option: a field here, a commented line in `packaging/agent/agent.toml` (the tests
//! below parse it with every commented line switched on), an `Option` clap arg in `main.rs`,
//! and one line where `main.rs` resolves it.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{Deserializer, Error as _};

/// Where the package installs the agent's config file.
pub(crate) const PACKAGED_PATH: &str = "/etc/deployment-engine/agent.toml";

/// The longest interval (seconds) `heartbeat_secs`, `max_backoff_secs` and `connect_timeout_secs` take.
pub(crate) const MAX_SECS: u64 = 3600;

/// The agent's config file; every field is optional and falls back to the built-in default.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) advertise_ip: Option<IpAddr>,
    pub(crate) root: Option<PathBuf>,
    #[serde(default, deserialize_with = "secs")]
    pub(crate) connect_timeout_secs: Option<u64>,
    #[serde(default, deserialize_with = "secs")]
    pub(crate) heartbeat_secs: Option<u64>,
    #[serde(default, deserialize_with = "secs")]
    pub(crate) max_backoff_secs: Option<u64>,
    /// The controller's QUIC address (HOST:PORT) to enrol with.
    pub(crate) controller: Option<String>,
    /// A private monit control file; unset: the system monit.
    pub(crate) monit_control: Option<PathBuf>,
    /// The artifact cache's bound, MiB (1-1048576).
    #[serde(default, deserialize_with = "cache_max_mb")]
    pub(crate) cache_max_mb: Option<u64>,
    /// `text` or `json`.
    pub(crate) log_format: Option<de_common::LogFormat>,
    /// Always refused: see the module docs.
    #[serde(default, rename = "code", deserialize_with = "refuse_code")]
    _code: (),
}

fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = u64::deserialize(d)?;
    if (1..=MAX_SECS).contains(&v) {
        Ok(Some(v))
    } else {
        Err(D::Error::custom(format!(
            "must be between 1 and {MAX_SECS} seconds, got {v}"
        )))
    }
}

fn cache_max_mb<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = u64::deserialize(d)?;
    if (1..=1_048_576).contains(&v) {
        Ok(Some(v))
    } else {
        Err(D::Error::custom(format!(
            "must be between 1 and 1048576 MiB, got {v}"
        )))
    }
}

fn refuse_code<'de, D: Deserializer<'de>>(_: D) -> Result<(), D::Error> {
    Err(D::Error::custom(
        "the install code does not belong in a config file (it is used once, at enrolment): pass it in DE_INSTALL_CODE or with --code-stdin",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const SHIPPED: &str = include_str!("../../packaging/agent/agent.toml");

    fn parse(text: &str) -> Result<Config, String> {
        de_common::parse_toml(Path::new("agent.toml"), text).map_err(|e| e.to_string())
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
    fn the_shipped_config_parses_and_sets_nothing() {
        assert_eq!(parse(SHIPPED), Ok(Config::default()));
    }

    #[test]
    fn every_documented_option_in_the_shipped_config_is_real() {
        let all = parse(&uncommented(SHIPPED)).expect("uncommented shipped config");
        assert_eq!(
            all.state_dir.as_deref(),
            Some(Path::new("/var/lib/deployment-engine/agent"))
        );
        assert_eq!(all.root.as_deref(), Some(Path::new("/")));
        assert!(all.advertise_ip.is_some());
        assert_eq!(all.controller.as_deref(), Some("controller.example:50001"));
        assert_eq!(
            (
                all.connect_timeout_secs,
                all.heartbeat_secs,
                all.max_backoff_secs
            ),
            (Some(10), Some(5), Some(30))
        );
    }

    #[test]
    fn unknown_keys_bad_values_and_the_code_are_refused_by_name() {
        let e = parse("controller = \"c:50001\"\nheartbeat = 5\n").expect_err("unknown");
        assert!(
            e.starts_with("config file agent.toml, line 2: unknown field `heartbeat`"),
            "{e}"
        );
        let e = parse("heartbeat_secs = 0\n").expect_err("zero");
        assert!(
            e.contains("key `heartbeat_secs`: must be between 1 and 3600"),
            "{e}"
        );
        let e = parse("max_backoff_secs = 3601\n").expect_err("too long");
        assert!(e.contains("key `max_backoff_secs`"), "{e}");
        let e = parse("advertise_ip = \"10.0.0.300\"\n").expect_err("bad ip");
        assert!(e.contains("line 1, key `advertise_ip`"), "{e}");
        let e = parse("controller = \"c:50001\"\ncode = \"0427\"\n").expect_err("code");
        assert!(
            e.contains("line 2, key `code`: the install code does not belong in a config file"),
            "{e}"
        );
    }
}
