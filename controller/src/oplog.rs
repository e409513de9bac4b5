//! The log hub: every operation and every line of step output goes to
//! `DATA/logs/local.log` (the original's operations log), to one file per
//! component instance (`DATA/logs/nats_0.log`, ...) and, live, to every
//! client of the `/deployment-engine/log` WebSocket.
//!
//! Invariants: writing a line never waits for a WebSocket client (a
//! `broadcast` ring: a client that falls behind loses the oldest lines and is
//! told how many, the files keep everything); nothing outside the log dir is
//! ever opened by name (`open` checks the name and the canonical parent);
//! files hold summaries and output, never plans or secrets.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use de_common::ErrorChain;
use tokio::sync::broadcast;
use tracing::warn;

use crate::util::rfc3339;

/// The operations log's file name, as the original's log list shows it.
pub(crate) const OPLOG_FILE: &str = "local.log";

/// How many lines wait for a slow WebSocket client before it starts losing
/// the oldest ones (it is told how many; the files keep all of them).
pub(crate) const LIVE_CAPACITY: usize = 4096;

/// The most per-instance files kept open at once; past it, all are closed and
/// reopened on their next line (a plan has far fewer instances).
const MAX_OPEN_FILES: usize = 512;

/// When a log file is rotated: once a write would take it past `max_bytes`
/// (0: never), it becomes `NAME.1` (the older ones `NAME.2` ... `NAME.<keep>`,
/// the oldest beyond that deleted) and a new `NAME` is begun. A batch of lines
/// is never split across two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    pub max_bytes: u64,
    pub keep: u32,
}

/// The default rotation size of each log file, in MiB.
pub const DEFAULT_LOG_MAX_MB: u64 = 64;
/// The default number of rotated files kept per log.
pub const DEFAULT_LOG_KEEP: u32 = 4;

impl Default for LogLimits {
    fn default() -> LogLimits {
        LogLimits {
            max_bytes: DEFAULT_LOG_MAX_MB << 20,
            keep: DEFAULT_LOG_KEEP,
        }
    }
}

/// One log file open for appending, with its size, rotated by [`LogLimits`].
#[derive(Debug)]
struct Sink {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl Sink {
    fn open(path: PathBuf) -> std::io::Result<Sink> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Sink { path, file, size })
    }

    /// Appends `text`, rotating first when it would pass the limit. A
    /// rotation that fails (a full or read-only disk) is logged and the text
    /// still appended: a file past its limit is better than a lost line.
    fn write(&mut self, text: &[u8], limits: LogLimits) -> std::io::Result<()> {
        let len = text.len() as u64;
        if limits.max_bytes > 0
            && self.size > 0
            && self.size + len > limits.max_bytes
            && let Err(e) = self.rotate(limits.keep)
        {
            warn!(path = %self.path.display(), error = %ErrorChain(&e), "could not rotate a log file; appending to it");
        }
        self.file.write_all(text)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self, keep: u32) -> std::io::Result<()> {
        let numbered = |i: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        };
        let gone_ok = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        gone_ok(std::fs::remove_file(numbered(keep.max(1))))?;
        for i in (1..keep).rev() {
            gone_ok(std::fs::rename(numbered(i), numbered(i + 1)))?;
        }
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            std::fs::rename(&self.path, numbered(1))?;
        }
        *self = Sink::open(self.path.clone())?;
        Ok(())
    }
}

/// Why a log file could not be opened by name.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error(
        "{0:?} is not a log file name: use a name from GET /deployment-engine/download (letters, digits, '_', '-', '.', not starting with '.')"
    )]
    InvalidName(String),
    #[error(
        "there is no log file named {0:?}: GET /deployment-engine/download lists the files there are"
    )]
    NotFound(String),
    #[error("could not read the log file {0}")]
    Io(String, #[source] std::io::Error),
}

/// Whether `name` may name a file in the log dir: `[A-Za-z0-9_.-]+`, not
/// starting with a dot (so no `.`, `..` or hidden files), at most 255 bytes.
pub(crate) fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The operations log, the per-instance logs and the live feed. Cheap to
/// share: callers hold it inside the `Controller`.
#[derive(Debug)]
pub struct LogHub {
    dir: PathBuf,
    path: PathBuf,
    limits: LogLimits,
    local: Mutex<Sink>,
    instances: Mutex<HashMap<String, Sink>>,
    live: broadcast::Sender<Arc<str>>,
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl LogHub {
    /// Opens (creating if needed) `dir/local.log` for appending; creates `dir`.
    pub fn open(dir: &Path) -> std::io::Result<LogHub> {
        LogHub::with_capacity(dir, LIVE_CAPACITY)
    }

    /// As [`LogHub::open`], with `capacity` lines buffered per live client.
    pub(crate) fn with_capacity(dir: &Path, capacity: usize) -> std::io::Result<LogHub> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(OPLOG_FILE);
        let local = Sink::open(path.clone())?;
        let (live, _) = broadcast::channel(capacity.max(1));
        Ok(LogHub {
            dir: dir.to_owned(),
            path,
            limits: LogLimits::default(),
            local: Mutex::new(local),
            instances: Mutex::new(HashMap::new()),
            live,
        })
    }

    /// Sets when the files are rotated (the controller's `--log-max-mb` and
    /// `--log-keep`).
    pub fn set_limits(&mut self, limits: LogLimits) {
        self.limits = limits;
    }

    /// `DATA/logs/local.log`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `DATA/logs`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// An operation, as one line of `local.log` and the live feed: the same as
    /// `line(None, what)`.
    pub fn record(&self, what: &str) {
        self.line(None, what);
    }

    /// Appends `<RFC 3339 time> [<instance>] <text>` to `local.log` and, with
    /// an instance (`"nats_0"`), `<time> <text>` to `<instance>.log`; then
    /// sends the `local.log` line to every live client. Newlines in `text`
    /// become spaces. Never waits for a client and never fails: a write error
    /// is logged (the operation itself already happened). A line whose
    /// instance is no usable file name (not `[A-Za-z0-9_.-]+`, starting with a
    /// dot, or `local`) goes to `local.log` only, with a warning.
    pub fn line(&self, instance: Option<&str>, text: &str) {
        self.lines(instance, &[text]);
    }

    /// As [`LogHub::line`] for each of `texts` (a step's `Output` batch), with
    /// one write per file for the whole batch.
    pub fn lines<S: AsRef<str>>(&self, instance: Option<&str>, texts: &[S]) {
        if texts.is_empty() {
            return;
        }
        let now = rfc3339(SystemTime::now());
        let mut local = String::new();
        let mut own = String::new();
        let mut shared: Vec<Arc<str>> = Vec::with_capacity(texts.len());
        for text in texts {
            let text = text.as_ref().replace(['\n', '\r'], " ");
            let line = match instance {
                Some(i) => format!("{now} [{i}] {text}"),
                None => format!("{now} {text}"),
            };
            local.push_str(&line);
            local.push('\n');
            if instance.is_some() {
                own.push_str(&format!("{now} {text}\n"));
            }
            shared.push(line.into());
        }
        if let Some(instance) = instance {
            self.write_instance(instance, &own);
        }
        let mut f = self.local.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write(local.as_bytes(), self.limits) {
            warn!(path = %self.path.display(), error = %ErrorChain(&e), "could not write the operations log");
        }
        // Under the same lock, so clients see lines in local.log's order.
        // Err only means that no client is connected.
        for line in shared {
            let _ = self.live.send(line);
        }
    }

    fn write_instance(&self, instance: &str, line: &str) {
        if !valid_file_name(instance) || instance == "local" {
            warn!(
                instance,
                "not a usable log file name: the line went to local.log only"
            );
            return;
        }
        let mut files = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        if !files.contains_key(instance) {
            if files.len() >= MAX_OPEN_FILES {
                files.clear();
            }
            let path = self.dir.join(format!("{instance}.log"));
            match Sink::open(path.clone()) {
                Ok(f) => {
                    files.insert(instance.to_owned(), f);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %ErrorChain(&e), "could not open an instance log");
                    return;
                }
            }
        }
        if let Some(f) = files.get_mut(instance)
            && let Err(e) = f.write(line.as_bytes(), self.limits)
        {
            warn!(instance, error = %ErrorChain(&e), "could not write an instance log");
            // Reopened on the next line, in case the file was moved away.
            files.remove(instance);
        }
    }

    /// A live feed of every line from now on (nothing older).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.live.subscribe()
    }

    /// The log files there are, sorted by name.
    pub fn files(&self) -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Some(name) = entry.file_name().to_str()
                && valid_file_name(name)
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Opens the log file `name` for reading, refusing any name that is not a
    /// plain file name and anything that resolves outside the log dir.
    pub fn open_file(&self, name: &str) -> Result<(PathBuf, std::fs::File), LogFileError> {
        if !valid_file_name(name) {
            return Err(LogFileError::InvalidName(name.to_owned()));
        }
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => LogFileError::NotFound(name.to_owned()),
            _ => LogFileError::Io(self.dir.join(name).display().to_string(), e),
        };
        let dir = self.dir.canonicalize().map_err(io)?;
        let path = self.dir.join(name).canonicalize().map_err(io)?;
        if path.parent() != Some(dir.as_path()) || !path.is_file() {
            // A symlink leading out, or a directory: not a log file.
            return Err(LogFileError::NotFound(name.to_owned()));
        }
        let file = std::fs::File::open(&path).map_err(io)?;
        Ok((path, file))
    }
}

/// The most bytes [`tail_lines`] reads, whatever the line count asked for.
pub(crate) const TAIL_MAX_BYTES: u64 = 4 << 20;

/// The last `n` lines of `file` (each ending in `\n`, as in the file), read
/// backwards from its end in blocks, so a large log costs only what is asked
/// for: at most [`TAIL_MAX_BYTES`], cut at a line start.
pub(crate) fn tail_lines(file: &mut std::fs::File, n: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 * 1024;
    let len = file.seek(SeekFrom::End(0))?;
    let floor = len.saturating_sub(TAIL_MAX_BYTES);
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    // A final line without its newline still counts as a line.
    let mut wanted_newlines = n;
    loop {
        if start == floor {
            break;
        }
        let from = start.saturating_sub(BLOCK).max(floor);
        let mut block = vec![0u8; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&buf);
        buf = block;
        start = from;
        let trailing = buf.last() == Some(&b'\n') && start + (buf.len() as u64) == len;
        let count = buf.iter().filter(|b| **b == b'\n').count();
        wanted_newlines = if trailing { n + 1 } else { n };
        if count >= wanted_newlines {
            break;
        }
    }
    // Keep what follows the newline that ends the line before the n-th last.
    let mut seen = 0;
    let mut cut = None;
    for (i, b) in buf.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == wanted_newlines {
                cut = Some(i + 1);
                break;
            }
        }
    }
    let cut = match cut {
        Some(c) => c,
        // Began mid-file at the byte cap: drop the partial first line.
        None if start > 0 => buf
            .iter()
            .position(|b| *b == b'\n')
            .map_or(buf.len(), |p| p + 1),
        None => 0,
    };
    Ok(String::from_utf8_lossy(&buf[cut..]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line in the files of one log, oldest first (`NAME.keep` ... `NAME`).
    fn all_lines(dir: &Path, name: &str, keep: u32) -> Vec<String> {
        let mut files: Vec<PathBuf> = (1..=keep)
            .rev()
            .map(|i| dir.join(format!("{name}.{i}")))
            .collect();
        files.push(dir.join(name));
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| t.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    #[test]
    fn files_rotate_at_the_limit_and_keep_every_line_that_fits_the_kept_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        let mut hub = LogHub::open(&logs).expect("open");
        hub.set_limits(LogLimits {
            max_bytes: 4096,
            keep: 3,
        });
        // About 60 bytes a line: a few hundred lines fill the 4 files (3 kept + current).
        for i in 0..200 {
            hub.line(
                Some("nats_0"),
                &format!("line {i:04} of the first instance"),
            );
        }
        let names = hub.files().expect("files");
        for want in [
            "local.log",
            "local.log.1",
            "local.log.2",
            "local.log.3",
            "nats_0.log",
            "nats_0.log.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.ends_with(".4")),
            "kept only 3: {names:?}"
        );
        for name in &names {
            let len = std::fs::metadata(logs.join(name)).expect("meta").len();
            assert!(len <= 4096, "{name} is {len} bytes");
        }
        // What the kept files hold is the newest lines, in order, none missing.
        let lines = all_lines(&logs, "local.log", 3);
        let numbers: Vec<u32> = lines
            .iter()
            .map(|l| {
                l.split("line ")
                    .nth(1)
                    .and_then(|r| r[..4].parse().ok())
                    .expect("numbered")
            })
            .collect();
        assert_eq!(numbers.last(), Some(&199));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert!(numbers.len() > 100, "{} lines kept", numbers.len());
        // The live feed and the opened files still work by name after rotation.
        assert!(hub.open_file("local.log.2").is_ok());
    }

    #[test]
    fn a_reopened_hub_counts_what_is_already_in_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        // Ten lines (about 470 bytes) fit; twenty do not.
        let limits = LogLimits {
            max_bytes: 600,
            keep: 1,
        };
        {
            let mut hub = LogHub::open(&logs).expect("open");
            hub.set_limits(limits);
            for i in 0..10 {
                hub.record(&format!("before restart {i}"));
            }
        }
        let mut hub = LogHub::open(&logs).expect("reopen");
        hub.set_limits(limits);
        for i in 0..10 {
            hub.record(&format!("after restart {i}"));
        }
        let len = std::fs::metadata(logs.join("local.log"))
            .expect("meta")
            .len();
        assert!(len <= 600, "{len}");
        assert!(logs.join("local.log.1").exists());
    }

    #[test]
    fn no_limit_and_keep_zero_behave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        let mut hub = LogHub::open(&logs).expect("open");
        hub.set_limits(LogLimits {
            max_bytes: 0,
            keep: 3,
        });
        for i in 0..100 {
            hub.record(&format!("unlimited {i}"));
        }
        assert_eq!(hub.files().expect("files"), ["local.log"]);
        hub.set_limits(LogLimits {
            max_bytes: 500,
            keep: 0,
        });
        for i in 0..100 {
            hub.record(&format!("limited {i}"));
        }
        assert_eq!(
            hub.files().expect("files"),
            ["local.log"],
            "keep 0: no old files"
        );
        let text = std::fs::read_to_string(logs.join("local.log")).expect("read");
        assert!(
            text.len() <= 500 && text.ends_with("limited 99\n"),
            "{text}"
        );
    }

    #[test]
    fn the_tail_is_the_last_lines_whatever_the_block_boundaries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        // Lines of varying length, enough to span several 64 KiB blocks.
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("line {i} {}", "x".repeat(i % 37)))
            .collect();
        let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
        std::fs::write(&path, &text).expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        for n in [0, 1, 2, 10, 500, 4_000, 19_999, 20_000, 30_000] {
            let got = tail_lines(&mut f, n).expect("tail");
            let want: String = lines[lines.len().saturating_sub(n)..]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(got, want, "n = {n}");
        }
        // Without a final newline, the last partial line is one of the n.
        std::fs::write(&path, "a\nb\nc").expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        assert_eq!(tail_lines(&mut f, 2).expect("tail"), "b\nc");
        assert_eq!(tail_lines(&mut f, 5).expect("tail"), "a\nb\nc");
        std::fs::write(&path, "").expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        assert_eq!(tail_lines(&mut f, 3).expect("tail"), "");
    }

    #[test]
    fn the_tail_of_a_huge_file_is_capped_at_a_line_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.log");
        let line = format!("{}\n", "y".repeat(999));
        let count = (TAIL_MAX_BYTES as usize / line.len()) * 2;
        std::fs::write(&path, line.repeat(count)).expect("write");
        let mut f = std::fs::File::open(&path).expect("open");
        let got = tail_lines(&mut f, count).expect("tail");
        assert!(got.len() as u64 <= TAIL_MAX_BYTES, "{}", got.len());
        assert!(
            !got.is_empty() && got.len().is_multiple_of(line.len()),
            "whole lines only"
        );
    }

    #[test]
    fn lines_are_appended_with_a_timestamp_and_stay_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        LogHub::open(&logs).expect("open").record("first");
        let log = LogHub::open(&logs).expect("reopen");
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

    #[test]
    fn instance_lines_go_to_local_log_and_their_own_file_mode_0640() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = LogHub::open(dir.path()).expect("open");
        let mut live = hub.subscribe();
        hub.line(Some("nats_0"), "starting nats");
        hub.line(Some("nats_1"), "starting nats");
        hub.line(Some("nats_0"), "nats is up");
        hub.line(Some("../evil"), "refused as a file name");
        hub.line(Some("local"), "would be local.log twice");
        let local = std::fs::read_to_string(hub.path()).expect("local.log");
        assert_eq!(local.lines().count(), 5, "{local}");
        assert!(local.contains(" [nats_0] nats is up\n"), "{local}");
        assert!(local.contains(" [../evil] refused"), "{local}");
        let nats0 = std::fs::read_to_string(dir.path().join("nats_0.log")).expect("nats_0.log");
        let lines: Vec<&str> = nats0.lines().collect();
        assert_eq!(lines.len(), 2, "{nats0}");
        assert!(lines[1].ends_with(" nats is up") && !lines[1].contains('['));
        let mode = std::fs::metadata(dir.path().join("nats_1.log"))
            .expect("nats_1.log")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(!dir.path().join("../evil.log").exists());
        assert_eq!(
            hub.files().expect("files"),
            ["local.log", "nats_0.log", "nats_1.log"]
        );
        let first = live.try_recv().expect("a live line");
        assert!(first.ends_with(" [nats_0] starting nats"), "{first}");
    }

    #[test]
    fn a_batch_is_written_in_order_to_both_files_and_the_feed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = LogHub::open(dir.path()).expect("open");
        let mut live = hub.subscribe();
        let batch = vec!["one".to_owned(), "two".to_owned(), "three".to_owned()];
        hub.lines(Some("uaa_0"), &batch);
        hub.lines::<&str>(Some("uaa_0"), &[]);
        let own = std::fs::read_to_string(dir.path().join("uaa_0.log")).expect("uaa_0.log");
        let local = std::fs::read_to_string(hub.path()).expect("local.log");
        for (text, want) in [(&own, " "), (&local, " [uaa_0] ")] {
            let got: Vec<&str> = text.lines().collect();
            assert_eq!(got.len(), 3, "{text}");
            for (line, word) in got.iter().zip(&batch) {
                assert!(line.ends_with(&format!("{want}{word}")), "{text}");
            }
        }
        for word in &batch {
            let line = live.try_recv().expect("a live line");
            assert!(line.ends_with(&format!(" [uaa_0] {word}")), "{line}");
        }
        assert!(live.try_recv().is_err(), "an empty batch sends nothing");
    }

    #[test]
    fn the_list_is_sorted_and_shows_only_plain_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub = LogHub::open(dir.path()).expect("open");
        for i in ["router_1", "dea_0", "uaa_0"] {
            hub.line(Some(i), "x");
        }
        std::fs::write(dir.path().join(".hidden"), "x").expect("write");
        std::fs::create_dir(dir.path().join("sub.log")).expect("mkdir");
        assert_eq!(
            hub.files().expect("files"),
            ["dea_0.log", "local.log", "router_1.log", "uaa_0.log"]
        );
    }

    #[test]
    fn names_that_could_reach_outside_the_log_dir_are_refused() {
        let parent = tempfile::tempdir().expect("tempdir");
        let logs = parent.path().join("logs");
        let hub = LogHub::open(&logs).expect("open");
        std::fs::write(parent.path().join("secret.txt"), "secret").expect("write");
        std::os::unix::fs::symlink(parent.path().join("secret.txt"), logs.join("link.log"))
            .expect("symlink");
        for bad in [
            "",
            ".",
            "..",
            "../secret.txt",
            "/etc/passwd",
            "a/b",
            ".hidden",
            "nul\0.log",
            "sp ace.log",
            "é.log",
        ] {
            assert!(
                matches!(hub.open_file(bad), Err(LogFileError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            hub.open_file("link.log"),
            Err(LogFileError::NotFound(_))
        ));
        assert!(matches!(
            hub.open_file("nats_9.log"),
            Err(LogFileError::NotFound(_))
        ));
        let (path, _) = hub.open_file("local.log").expect("local.log");
        assert_eq!(path, logs.canonicalize().expect("dir").join("local.log"));
    }
}
