//! The operations log, `DATA/logs/local.log` (the original's `local.log`): one
//! line per operation with a UTC timestamp, appended, for operators to read
//! and download. Never holds secrets: callers write summaries, not plans.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use tracing::warn;

use crate::nodes::rfc3339;

/// The operations log's file name, as the original's log list shows it.
pub const OPLOG_FILE: &str = "local.log";

/// An append-only operations log.
#[derive(Debug)]
pub struct OpLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl OpLog {
    /// Opens (creating if needed) `dir/local.log` for appending; creates `dir`.
    pub fn open(dir: &Path) -> std::io::Result<OpLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(OPLOG_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(OpLog {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `<RFC 3339 time> <what>` as one line. A failure to write is
    /// logged, not returned: the operation itself already happened.
    pub fn record(&self, what: &str) {
        let line = format!(
            "{} {}\n",
            rfc3339(SystemTime::now()),
            what.replace(['\n', '\r'], " ")
        );
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            warn!(path = %self.path.display(), error = %e, "could not write the operations log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_appended_with_a_timestamp_and_stay_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        OpLog::open(&logs).expect("open").record("first");
        let log = OpLog::open(&logs).expect("reopen");
        log.record("second\nline");
        let text = std::fs::read_to_string(logs.join(OPLOG_FILE)).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].ends_with(" first") && lines[0].contains('T'),
            "{text}"
        );
        assert!(lines[1].ends_with(" second line"), "{text}");
    }
}
