//! Small helpers every domain uses: timestamps as the API writes them,
//! random ids, and what counts as an empty request body.

use std::time::SystemTime;

use ring::rand::SecureRandom;

/// The system's random number generator failed (it does not, short of a
/// broken kernel; callers turn this into their own error).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct NoRandomness;

/// `t` as an RFC 3339 UTC timestamp (`2026-11-21T22:00:00Z`).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Whether a request body is empty or only whitespace (so: not given).
pub(crate) fn is_blank(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
}

/// A random lowercase hex string of `bytes` bytes.
pub(crate) fn random_hex(bytes: usize) -> Result<String, NoRandomness> {
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| NoRandomness)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn only_whitespace_is_a_blank_body() {
        for blank in ["", " ", "\r\n\t "] {
            assert!(is_blank(blank.as_bytes()), "{blank:?}");
        }
        for given in ["{}", " 0 ", "\"\""] {
            assert!(!is_blank(given.as_bytes()), "{given:?}");
        }
    }

    #[test]
    fn random_hex_has_two_digits_a_byte_and_differs() {
        let a = random_hex(8).expect("rng");
        let b = random_hex(8).expect("rng");
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
