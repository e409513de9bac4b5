//! The address agents are told to dial (`--public-addr`), and the install command built from it.
//!
//! The value ends up in a shell command an operator copies to a node, so only host names,
//! IPv4 addresses and bracketed IPv6 addresses are accepted: nothing a shell would interpret.

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// `HOST[:PORT]`: a DNS name, an IPv4 address or a bracketed IPv6 address, with an optional port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct PublicAddr {
    host: String,
    port: Option<u16>,
}

/// Why a public address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not HOST or HOST:PORT: {reason}")]
pub struct PublicAddrError {
    input: String,
    reason: &'static str,
}

impl PublicAddr {
    /// `HOST:PORT`, with `default_port` when the address names none.
    pub fn with_port(&self, default_port: u16) -> String {
        format!("{}:{}", self.host, self.port.unwrap_or(default_port))
    }
}

impl fmt::Display for PublicAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

fn valid_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && !host.starts_with(['-', '.'])
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

impl FromStr for PublicAddr {
    type Err = PublicAddrError;

    fn from_str(input: &str) -> Result<PublicAddr, PublicAddrError> {
        let err = |reason| PublicAddrError {
            input: input.to_owned(),
            reason,
        };
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| err("an IPv6 address needs a closing ']'"))?;
            ip.parse::<Ipv6Addr>()
                .map_err(|_| err("not an IPv6 address between '[' and ']'"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("expected ':PORT' after ']'"))?,
                ),
            };
            (format!("[{ip}]"), port)
        } else {
            if input.matches(':').count() > 1 {
                return Err(err("write an IPv6 address in brackets, as [ADDR]:PORT"));
            }
            let (host, port) = match input.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (input, None),
            };
            if !valid_host_name(host) {
                return Err(err(
                    "the host must be a DNS name or an IP address (letters, digits, '-' and '.')",
                ));
            }
            (host.to_owned(), port)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return Err(err("the port must be a number from 1 to 65535")),
            },
        };
        Ok(PublicAddr { host, port })
    }
}

impl TryFrom<String> for PublicAddr {
    type Error = PublicAddrError;

    fn try_from(s: String) -> Result<PublicAddr, PublicAddrError> {
        s.parse()
    }
}

/// What agents should dial: `public` when given (with the QUIC port if it names none), else
/// the QUIC listen address, with `hostname` in place of an unspecified IP (0.0.0.0 or ::).
pub fn agent_address(public: Option<&PublicAddr>, quic: SocketAddr, hostname: &str) -> String {
    match public {
        Some(p) => p.with_port(quic.port()),
        None if quic.ip().is_unspecified() => format!("{hostname}:{}", quic.port()),
        None => quic.to_string(),
    }
}

/// This machine's host name (for [`agent_address`]), or `localhost` if it cannot be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| valid_host_name(h))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The one line that joins a node, as the console shows it next to the code:
/// the verified `/join.sh` line when the API speaks HTTPS and has an agent
/// package to offer, else the packaged `install-agent.sh`, run where the
/// package and script were copied by hand.
pub(crate) fn agent_command(
    agent_addr: &str,
    join: Option<&super::join::Join>,
    code: &str,
) -> String {
    match join {
        Some(j) if j.packages.agent().is_some() => j.command(code),
        _ => format!("packaging/install-agent.sh --controller {agent_addr} --code {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Result<String, String> {
        s.parse::<PublicAddr>()
            .map(|a| a.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn public_addresses_are_names_or_ips_with_an_optional_port() {
        for ok in [
            "ctl.example.com:50001",
            "ctl",
            "10.0.0.5:443",
            "10.0.0.5",
            "[2001:db8::1]:50001",
            "[::1]",
        ] {
            assert_eq!(addr(ok).as_deref(), Ok(ok));
        }
        for (bad, why) in [
            ("", "DNS name"),
            ("ctl:", "port"),
            ("ctl:0", "port"),
            ("ctl:65536", "port"),
            ("ctl:http", "port"),
            ("2001:db8::1", "brackets"),
            ("[2001:db8::1", "closing"),
            ("[nope]:1", "IPv6"),
            ("[::1]50001", "':PORT'"),
            ("ctl;rm -rf /", "DNS name"),
            ("$(id):1", "DNS name"),
            ("-x:1", "DNS name"),
            ("a b:1", "DNS name"),
        ] {
            let e = addr(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn agents_dial_the_public_address_else_the_listen_address_else_the_host_name() {
        let any: SocketAddr = "0.0.0.0:50001".parse().expect("addr");
        let local: SocketAddr = "10.1.2.3:50011".parse().expect("addr");
        let p: PublicAddr = "ctl.example".parse().expect("public");
        assert_eq!(agent_address(Some(&p), any, "h"), "ctl.example:50001");
        let p: PublicAddr = "ctl.example:443".parse().expect("public");
        assert_eq!(agent_address(Some(&p), local, "h"), "ctl.example:443");
        assert_eq!(agent_address(None, local, "h"), "10.1.2.3:50011");
        assert_eq!(agent_address(None, any, "ctl01"), "ctl01:50001");
        let v6: SocketAddr = "[::]:50001".parse().expect("addr");
        assert_eq!(agent_address(None, v6, "ctl01"), "ctl01:50001");
        assert_eq!(
            agent_command("ctl01:50001", None, "0427"),
            "packaging/install-agent.sh --controller ctl01:50001 --code 0427"
        );
    }
}
