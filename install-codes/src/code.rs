//! The 4-digit install code itself: generation, parsing, and a `Debug` that never shows it.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// How many random draws [`InstallCode::generate`] makes before it gives up.
///
/// Each draw is accepted with probability 60000/65536 (about 92 %), so a
/// working random source never gets near this; it only stops a broken one
/// from looping forever.
const MAX_DRAWS: usize = 64;

/// Largest multiple of 10 000 that fits in a `u16` draw: values at or above it
/// are rejected so every code is equally likely.
const ACCEPT_BELOW: u16 = 60_000;

/// A 4-digit install code ("0000".."9999").
///
/// `Debug` prints `InstallCode(****)` so the code does not end up in logs;
/// use [`InstallCode::as_str`] where the digits must really be shown (the
/// console). Deserializing checks the format like [`InstallCode::parse`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstallCode(String);

impl InstallCode {
    /// A fresh code, uniform over 0000-9999 (rejection sampling from the
    /// operating system's random source).
    pub fn generate() -> Result<InstallCode, CodeError> {
        let rng = SystemRandom::new();
        for _ in 0..MAX_DRAWS {
            let mut buf = [0u8; 2];
            rng.fill(&mut buf).map_err(|_| CodeError::Random)?;
            let draw = u16::from_be_bytes(buf);
            if draw < ACCEPT_BELOW {
                return Ok(InstallCode(format!("{:04}", draw % 10_000)));
            }
        }
        Err(CodeError::Random)
    }

    /// Exactly 4 ASCII digits once surrounding whitespace is trimmed.
    pub fn parse(s: &str) -> Result<InstallCode, CodeError> {
        let s = s.trim();
        if s.len() == 4 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(InstallCode(s.to_owned()))
        } else {
            Err(CodeError::Malformed)
        }
    }

    /// The 4 digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for InstallCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InstallCode(****)")
    }
}

impl TryFrom<String> for InstallCode {
    type Error = CodeError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        InstallCode::parse(&s)
    }
}

impl From<InstallCode> for String {
    fn from(code: InstallCode) -> String {
        code.0
    }
}

/// Why an install code could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("install code must be exactly 4 digits, like 0427")]
    Malformed,
    #[error(
        "no system randomness available: cannot generate an install code; check the host's random source"
    )]
    Random,
    #[error(
        "the install code lifetime is too long: the expiry time cannot be represented; use a shorter TTL"
    )]
    TtlTooLong,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_four_digits_with_surrounding_whitespace() {
        assert_eq!(InstallCode::parse("0427").expect("valid").as_str(), "0427");
        assert_eq!(
            InstallCode::parse(" 0427\n").expect("valid").as_str(),
            "0427"
        );
        assert_eq!(InstallCode::parse("0000").expect("valid").as_str(), "0000");
        assert_eq!(InstallCode::parse("9999").expect("valid").as_str(), "9999");
    }

    #[test]
    fn parse_rejects_anything_but_four_digits() {
        for bad in [
            "", "427", "04275", "04a7", "04 7", "-427", "+427", "٠٤٢٧", "0427x", "0x27",
        ] {
            assert_eq!(
                InstallCode::parse(bad),
                Err(CodeError::Malformed),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(
            CodeError::Malformed.to_string(),
            "install code must be exactly 4 digits, like 0427"
        );
    }

    #[test]
    fn debug_does_not_show_the_digits() {
        let code = InstallCode::parse("0427").expect("valid");
        let shown = format!("{code:?}");
        assert_eq!(shown, "InstallCode(****)");
        assert!(!shown.contains("0427"));
        let shown = format!("{:?}", Some(&code));
        assert!(!shown.contains("0427"));
    }

    #[test]
    fn generate_gives_four_digits_and_varies() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let code = InstallCode::generate().expect("system randomness");
            assert_eq!(code.as_str().len(), 4);
            assert!(code.as_str().bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(InstallCode::parse(code.as_str()).as_ref(), Ok(&code));
            seen.insert(code.as_str().to_owned());
        }
        // 50 draws from 10 000 values: all equal would mean a broken generator.
        assert!(seen.len() > 1);
    }

    #[test]
    fn conversion_to_and_from_string_validates() {
        let code = InstallCode::try_from("1234".to_owned()).expect("valid");
        assert_eq!(String::from(code), "1234");
        assert_eq!(
            InstallCode::try_from("12345".to_owned()),
            Err(CodeError::Malformed)
        );
    }
}
