//! `Fetch` steps: an artifact comes from the controller over the agent's own
//! link (one QUIC stream per transfer, flow-controlled by QUIC) into the
//! agent's cache (`STATE/cache/<sha256>`), keyed by hash, so a node never
//! downloads the same bytes twice; the cache is bounded and evicts the least
//! recently used entries.
//!
//! Invariants: nothing uses an artifact before its SHA-256, pinned by the
//! signed step, is checked: a cache entry is checked every time it is used
//! (a corrupted or swapped entry is deleted and fetched again), and a
//! download is checked before it becomes an entry. A transfer cut short
//! (the link broke) resumes from the bytes already on disk
//! (`<sha256>.part`), asking the controller for the rest.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use de_common::{AgentMsg, ControllerMsg, read_frame, write_frame};

/// Default bound of the artifact cache, in MiB.
pub const DEFAULT_CACHE_MAX_MB: u64 = 4096;
/// How many times a transfer is resumed after its link broke.
const MAX_RESUMES: u32 = 100;

/// Where artifacts are cached, and the link they come over.
#[derive(Debug, Clone)]
pub(crate) struct Fetcher {
    dir: PathBuf,
    max_bytes: u64,
    conn: watch::Receiver<Option<quinn::Connection>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The SHA-256 of a file, read in blocks (the blocking pool).
async fn sha256_of(path: &Path) -> Result<String, String> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("read {}: {e}", p.display()))?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(hex(ctx.finish().as_ref()))
    })
    .await
    .map_err(|e| format!("hashing stopped: {e}"))?
}

fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Fetcher {
    /// A cache in `dir` (created, mode 0700) of at most `max_bytes`.
    pub(crate) fn new(
        dir: PathBuf,
        max_bytes: u64,
        conn: watch::Receiver<Option<quinn::Connection>>,
    ) -> std::io::Result<Fetcher> {
        de_common::ensure_private_dir(&dir)?;
        Ok(Fetcher {
            dir,
            max_bytes,
            conn,
        })
    }

    /// The verified cache entry of `sha256` (`size` bytes): from the cache
    /// when it holds it intact, else fetched. Says what it did in `notes`.
    pub(crate) async fn get(
        &self,
        sha256: &str,
        size: u64,
        cancel: &CancellationToken,
        notes: &mut Vec<String>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PathBuf, String> {
        if !valid_sha256(sha256) {
            return Err(format!("{sha256:?} is not a SHA-256"));
        }
        let entry = self.dir.join(sha256);
        if entry.is_file() {
            if sha256_of(&entry).await? == sha256 {
                touch(&entry);
                notes.push(format!("from the cache ({size} bytes, sha256 verified)"));
                return Ok(entry);
            }
            let _ = std::fs::remove_file(&entry);
            notes.push("the cached copy did not match its SHA-256: deleted, fetched again".into());
        }
        let part = self.dir.join(format!("{sha256}.part"));
        let mut resumes = 0u32;
        if let Ok(m) = std::fs::metadata(&part)
            && m.len() > 0
            && m.len() < size
        {
            notes.push(format!(
                "resuming at byte {} of an earlier transfer",
                m.len()
            ));
        }
        loop {
            let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            if have > size {
                let _ = std::fs::remove_file(&part);
                continue;
            }
            if have == size {
                break;
            }
            match self
                .transfer(sha256, size, have, &part, cancel, progress)
                .await
            {
                Ok(()) => {}
                Err(Transfer::Refused(why)) => {
                    return Err(format!("the controller refused the artifact: {why}"));
                }
                Err(Transfer::Cancelled) => return Err("cancelled".into()),
                Err(Transfer::Cut(why)) => {
                    resumes += 1;
                    if resumes > MAX_RESUMES {
                        return Err(format!(
                            "the transfer broke {MAX_RESUMES} times, the last: {why}"
                        ));
                    }
                    let now = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
                    notes.push(format!("transfer cut at byte {now} ({why}); resuming"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let got = sha256_of(&part).await?;
        if got != sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(format!(
                "the bytes received do not match the step's SHA-256 ({got}, wanted {sha256}): deleted"
            ));
        }
        std::fs::rename(&part, &entry)
            .map_err(|e| format!("rename to {}: {e}", entry.display()))?;
        notes.push(format!(
            "fetched {size} bytes from the controller, sha256 verified"
        ));
        self.evict(sha256);
        Ok(entry)
    }

    /// One attempt: the bytes from `offset` on, appended to `part`.
    async fn transfer(
        &self,
        sha256: &str,
        size: u64,
        offset: u64,
        part: &Path,
        cancel: &CancellationToken,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), Transfer> {
        let mut conn_rx = self.conn.clone();
        let conn = tokio::select! {
            () = cancel.cancelled() => return Err(Transfer::Cancelled),
            c = conn_rx.wait_for(Option::is_some) => match c {
                Ok(c) => c.clone().ok_or_else(|| Transfer::Cut("no link".into()))?,
                Err(_) => return Err(Transfer::Cut("the agent is stopping".into())),
            },
        };
        let cut = |e: &dyn std::fmt::Display| Transfer::Cut(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| cut(&e))?;
        write_frame(
            &mut send,
            &AgentMsg::Fetch {
                sha256: sha256.to_owned(),
                offset,
            },
        )
        .await
        .map_err(|e| cut(&e))?;
        let _ = send.finish();
        match read_frame::<_, ControllerMsg>(&mut recv).await {
            Ok(Some(ControllerMsg::Artifact { size: s })) if s == size => {}
            Ok(Some(ControllerMsg::Artifact { size: s })) => {
                return Err(Transfer::Refused(format!(
                    "it is {s} bytes, the step says {size}"
                )));
            }
            Ok(Some(ControllerMsg::FetchRefused(why))) => return Err(Transfer::Refused(why)),
            Ok(other) => return Err(Transfer::Cut(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(cut(&e)),
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .await
            .map_err(|e| Transfer::Refused(format!("open {}: {e}", part.display())))?;
        // Writes of 4 MiB: each write of a tokio file is a trip to the
        // blocking pool, and QUIC hands over the bytes in small chunks.
        let mut file = tokio::io::BufWriter::with_capacity(4 << 20, file);
        let mut left = size - offset;
        // Progress every tenth of the artifact (at least every 16 MiB).
        let every = (size / 10).clamp(1, 16 << 20);
        let mut next = offset + every;
        while left > 0 {
            let chunk = tokio::select! {
                () = cancel.cancelled() => return Err(Transfer::Cancelled),
                c = recv.read_chunk(1 << 20, true) => c.map_err(|e| cut(&e))?,
            };
            let Some(chunk) = chunk else {
                return Err(Transfer::Cut(format!(
                    "the stream ended {left} bytes early"
                )));
            };
            let take = chunk
                .bytes
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            file.write_all(&chunk.bytes[..take])
                .await
                .map_err(|e| Transfer::Refused(format!("write {}: {e}", part.display())))?;
            left -= take as u64;
            let done = size - left;
            if done >= next && left > 0 {
                // What the progress line reports is on disk (a resume starts there).
                file.flush()
                    .await
                    .map_err(|e| Transfer::Refused(format!("write {}: {e}", part.display())))?;
                progress(done);
                next = done + every;
            }
        }
        file.flush()
            .await
            .map_err(|e| Transfer::Refused(format!("write {}: {e}", part.display())))?;
        file.get_ref()
            .sync_all()
            .await
            .map_err(|e| Transfer::Refused(format!("write {}: {e}", part.display())))?;
        Ok(())
    }

    /// Deletes the least recently used entries (but `keep`) until the cache
    /// is within its bound.
    fn evict(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then(|| {
                    (
                        m.modified().unwrap_or(std::time::UNIX_EPOCH),
                        m.len(),
                        e.path(),
                    )
                })
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path.file_name().and_then(|n| n.to_str()) == Some(keep) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(len);
            }
        }
    }
}

/// Marks a cache entry used now (eviction goes by modification time).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

enum Transfer {
    /// The link broke: resume.
    Cut(String),
    /// The controller said no, or this node cannot write: stop.
    Refused(String),
    Cancelled,
}
