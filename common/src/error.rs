//! One way to print an error with its causes, for logs and for the binaries'
//! last line: `err: cause: cause`.
//!
//! Error types follow one rule so that this prints each cause once: a
//! `Display` says what failed at its own level and never includes its
//! source; a variant that only wraps another error is `#[error(transparent)]`.

use std::error::Error;
use std::fmt;

/// Displays `err` followed by each of its sources, `": "`-separated, each once.
///
/// `tracing::warn!(error = %ErrorChain(&e), "...")` logs the full chain;
/// `eprintln!("de-agent: {}", ErrorChain(&e))` prints it for an operator.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Low {
        #[error("disk full")]
        Full,
    }

    #[derive(Debug, thiserror::Error)]
    enum Mid {
        #[error("could not save the ledger")]
        Save(#[source] Low),
    }

    #[derive(Debug, thiserror::Error)]
    enum Top {
        #[error(transparent)]
        Mid(#[from] Mid),
        #[error("the link failed")]
        Link(#[source] Mid),
    }

    #[test]
    fn each_cause_is_printed_once_in_order() {
        let e = Top::Link(Mid::Save(Low::Full));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "the link failed: could not save the ledger: disk full"
        );
    }

    #[test]
    fn a_transparent_wrapper_adds_nothing() {
        let e = Top::from(Mid::Save(Low::Full));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "could not save the ledger: disk full"
        );
    }

    #[test]
    fn an_error_without_a_source_is_its_own_message() {
        assert_eq!(ErrorChain(&Low::Full).to_string(), "disk full");
    }
}
