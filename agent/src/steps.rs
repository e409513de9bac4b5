//! Running signed steps: the persisted ledger of what each lane has done, and
//! the executor for every step action.
//!
//! Invariants: a step runs only after `check_step` accepted it (signature,
//! node, sequence above the lane's last done, not expired); the lane's
//! "running" marker is on disk before the step starts and its "done" mark with
//! the result before the result is sent, so an agent killed mid-step reports
//! that step as interrupted on restart and never runs a completed one again.
//! Output is read in bounded chunks and batched: memory per step is bounded
//! however much a step prints.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use de_common::{
    Lane, NodeId, OutStream, SignedStep, Step, StepAction, StepEvent, StepEventKind, StepId,
    StepOutcome, StepRefusal, write_private,
};

use crate::monit::Monit;

/// Lines longer than this are cut.
pub(crate) const MAX_LINE: usize = 8 * 1024;
/// How much of each stream's end is kept for the result.
pub(crate) const TAIL_BYTES: usize = 64 * 1024;
/// Output lines per event at most.
const BATCH_LINES: usize = 256;
const BATCH_BYTES: usize = 32 * 1024;
/// Total bytes `CollectLogs` returns at most.
const MAX_COLLECT: u64 = 512 * 1024;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct LaneState {
    last_done: u64,
    running: Option<(u64, StepId)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LedgerState {
    lanes: BTreeMap<String, LaneState>,
    /// Finished/Refused events not yet acknowledged by the controller.
    unacked: Vec<StepEvent>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("could not save the step ledger {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the step ledger {path} is damaged ({why}): restore it, or remove it and re-enrol this node"
    )]
    Damaged { path: PathBuf, why: String },
}

/// What each lane has done, persisted in `steps.json` in the state dir.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    state: LedgerState,
}

impl Ledger {
    /// Loads the ledger; a step that was running when the agent stopped is
    /// marked done as interrupted and queued for reporting.
    pub fn load(state_dir: &Path) -> Result<Ledger, LedgerError> {
        let path = state_dir.join("steps.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| LedgerError::Damaged {
                path: path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerState::default(),
            Err(e) => {
                return Err(LedgerError::Damaged {
                    path,
                    why: e.to_string(),
                });
            }
        };
        let mut l = Ledger { path, state };
        let mut interrupted = Vec::new();
        for lane in Lane::ALL {
            if let Some((seq, id)) = l.lane(lane).running.clone() {
                interrupted.push((lane, seq, id));
            }
        }
        let ids: Vec<&StepId> = interrupted.iter().map(|(_, _, id)| id).collect();
        if !ids.is_empty() {
            kill_leftovers(&ids);
        }
        for (lane, seq, id) in interrupted {
            let outcome = StepOutcome {
                error: Some("interrupted: the agent stopped while this step ran".into()),
                ..StepOutcome::default()
            };
            l.finish(StepEvent {
                step_id: id,
                lane,
                seq,
                kind: StepEventKind::Finished(outcome),
            })?;
        }
        Ok(l)
    }

    fn lane(&mut self, lane: Lane) -> &mut LaneState {
        self.state
            .lanes
            .entry(lane.as_str().to_owned())
            .or_default()
    }

    fn save(&self) -> Result<(), LedgerError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| LedgerError::Damaged {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        write_private(&self.path, &bytes).map_err(|source| LedgerError::Write {
            path: self.path.clone(),
            source,
        })
    }

    pub fn last_done(&self, lane: Lane) -> u64 {
        self.state
            .lanes
            .get(lane.as_str())
            .map(|l| l.last_done)
            .unwrap_or(0)
    }

    pub fn last_done_all(&self) -> Vec<(Lane, u64)> {
        Lane::ALL.iter().map(|l| (*l, self.last_done(*l))).collect()
    }

    /// Marks `step` as running, durably, before it starts.
    pub fn begin(&mut self, step: &Step) -> Result<(), LedgerError> {
        self.lane(step.lane).running = Some((step.seq, step.id.clone()));
        self.save()
    }

    /// Records a finished step (advancing the lane) and keeps its event until acknowledged.
    pub fn finish(&mut self, event: StepEvent) -> Result<(), LedgerError> {
        let lane = self.lane(event.lane);
        lane.last_done = lane.last_done.max(event.seq);
        lane.running = None;
        self.state.unacked.push(event);
        self.save()
    }

    /// Keeps a refusal until acknowledged (the lane does not advance).
    pub fn refused(&mut self, event: StepEvent) -> Result<(), LedgerError> {
        self.state.unacked.push(event);
        self.save()
    }

    pub fn acked(&mut self, step_id: &StepId) -> Result<(), LedgerError> {
        let before = self.state.unacked.len();
        self.state.unacked.retain(|e| e.step_id != *step_id);
        if self.state.unacked.len() != before {
            self.save()?;
        }
        Ok(())
    }

    pub fn unacked(&self) -> Vec<StepEvent> {
        self.state.unacked.clone()
    }
}

/// Where steps act.
#[derive(Debug, Clone)]
pub(crate) struct ExecContext {
    pub root: PathBuf,
    pub monit: Monit,
    /// The artifact cache and the link artifacts come over (`Fetch`).
    pub fetcher: Option<crate::fetch::Fetcher>,
    pub cancels: Arc<Cancels>,
    /// What this node applied per instance (`MarkApplied`, `Unmark`).
    pub applied: Arc<crate::applied::Applied>,
}

/// How many withdrawn step ids are remembered (a cancel that arrives before
/// its step is kept until the step comes; older ones are forgotten).
const WITHDRAWN_KEPT: usize = 4096;

/// The steps running now, each with the token that cancels it, and the ids
/// the controller cancelled before they started.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    inner: Mutex<CancelsInner>,
}

#[derive(Debug, Default)]
struct CancelsInner {
    running: HashMap<StepId, CancellationToken>,
    withdrawn: VecDeque<StepId>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token of step `id`, which starts now: already cancelled when the
    /// controller withdrew the step before it came.
    fn register(&self, id: &StepId) -> CancellationToken {
        let mut inner = self.lock();
        let token = CancellationToken::new();
        if let Some(i) = inner.withdrawn.iter().position(|w| w == id) {
            inner.withdrawn.remove(i);
            token.cancel();
        }
        inner.running.insert(id.clone(), token.clone());
        token
    }

    fn unregister(&self, id: &StepId) {
        self.lock().running.remove(id);
    }

    /// Cancels each step: a running one now, one still to come when it comes.
    fn cancel(&self, ids: &[StepId]) -> String {
        let mut inner = self.lock();
        let mut report = String::new();
        for id in ids {
            if let Some(t) = inner.running.get(id) {
                t.cancel();
                report.push_str(&format!("{id}: running, cancelled\n"));
            } else {
                if inner.withdrawn.len() >= WITHDRAWN_KEPT {
                    inner.withdrawn.pop_front();
                }
                inner.withdrawn.push_back(id.clone());
                report.push_str(&format!("{id}: not running here, withdrawn\n"));
            }
        }
        report
    }
}

/// The error of a step the controller cancelled.
const CANCELLED: &str = "cancelled by the controller";

/// The agent's whole check of a step that came on a pull of `lane`:
/// signature with the pinned key, this node, a sequence above the lane's
/// last done, not expired ([`check_step`]), and signed for that lane
/// ([`pulled_on`]). Only a step this returns is ever run.
pub(crate) fn accept(
    signed: &SignedStep,
    keys: &(Vec<u8>, Option<de_common::PreviousStepKey>),
    node_id: &NodeId,
    lane: Lane,
    last_done: u64,
    now_unix: u64,
) -> Result<Step, StepRefusal> {
    crate::link::check_pulled(signed, keys, node_id, last_done, now_unix)
        .and_then(|step| pulled_on(step, lane))
}

/// `step`, if it is signed for `lane`, the lane whose pull brought it: its
/// sequence number was checked against that lane's last done, so a step of
/// another lane would run out of its own lane's order.
pub(crate) fn pulled_on(step: Step, lane: Lane) -> Result<Step, StepRefusal> {
    if step.lane == lane {
        Ok(step)
    } else {
        Err(StepRefusal::WrongLane {
            expected: lane,
            got: step.lane,
        })
    }
}

/// `path` inside the node root; `..` is refused.
pub(crate) fn under_root(root: &Path, path: &str) -> Result<PathBuf, String> {
    // Catalog templates render absolute paths that already include the node root.
    let p = Path::new(path);
    let p = p.strip_prefix(root).unwrap_or(p);
    let mut out = root.to_owned();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("path {path:?} leaves the node root"));
            }
        }
    }
    Ok(out)
}

/// Keeps the last `cap` bytes written to it.
#[derive(Debug)]
struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn new(cap: usize) -> Tail {
        Tail {
            buf: Vec::new(),
            cap,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.cap..]);
            return;
        }
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        if over > 0 {
            self.buf.drain(..over);
        }
        self.buf.extend_from_slice(bytes);
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// Splits a byte stream into lines of at most `MAX_LINE` bytes.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    cut: bool,
}

impl Lines {
    fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.take(&bytes[..i]);
                    out.push(self.line());
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.take(bytes);
                    bytes = &[];
                }
            }
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.partial.len());
        if bytes.len() > room {
            self.cut = true;
        }
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn line(&mut self) -> String {
        let mut s = String::from_utf8_lossy(&self.partial).into_owned();
        if self.cut {
            s.push_str(" [line cut at 8 KiB]");
        }
        self.partial.clear();
        self.cut = false;
        s
    }

    fn finish(&mut self, out: &mut Vec<String>) {
        if !self.partial.is_empty() || self.cut {
            out.push(self.line());
        }
    }
}

/// Reads `r` to its end (or until `stop`), sending batched lines as events
/// and keeping a tail.
async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    stream: OutStream,
    step: (StepId, Lane, u64),
    events: mpsc::Sender<StepEvent>,
    stop: CancellationToken,
) -> String {
    let mut tail = Tail::new(TAIL_BYTES);
    let mut lines = Lines::default();
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0;
    let mut chunk = vec![0u8; 16 * 1024];
    let send = |batch: Vec<String>| {
        let events = events.clone();
        let (id, lane, seq) = step.clone();
        async move {
            let _ = events
                .send(StepEvent {
                    step_id: id,
                    lane,
                    seq,
                    kind: StepEventKind::Output {
                        stream,
                        lines: batch,
                    },
                })
                .await;
        }
    };
    loop {
        let read = tokio::select! {
            biased;
            r = r.read(&mut chunk) => r,
            _ = stop.cancelled() => break,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.push(&chunk[..n]);
        let mut new = Vec::new();
        lines.feed(&chunk[..n], &mut new);
        for l in new {
            batch_bytes += l.len();
            batch.push(l);
            if batch.len() >= BATCH_LINES || batch_bytes >= BATCH_BYTES {
                send(std::mem::take(&mut batch)).await;
                batch_bytes = 0;
            }
        }
    }
    lines.finish(&mut batch);
    if !batch.is_empty() {
        send(batch).await;
    }
    tail.text()
}

fn ok(stdout: String) -> StepOutcome {
    StepOutcome {
        exit_code: Some(0),
        stdout_tail: stdout,
        ..StepOutcome::default()
    }
}

fn failed(error: String) -> StepOutcome {
    StepOutcome {
        exit_code: None,
        error: Some(error),
        ..StepOutcome::default()
    }
}

async fn run_script(
    step: &Step,
    ctx: &ExecContext,
    events: &mpsc::Sender<StepEvent>,
    cancel: &CancellationToken,
) -> StepOutcome {
    let StepAction::Script {
        script,
        user,
        env,
        timeout_secs,
    } = &step.action
    else {
        return failed("not a script step".to_owned());
    };
    let timeout = Duration::from_secs(u64::from((*timeout_secs).max(1)));
    let script = script.as_str();
    let mut cmd = match user.as_deref() {
        Some(u) if u != "root" => {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", u, "--", "/bin/sh", "-c", script]);
            c
        }
        _ => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.args(["-c", script]);
            c
        }
    };
    let cwd = if ctx.root.is_dir() {
        ctx.root.clone()
    } else {
        PathBuf::from("/")
    };
    cmd.current_dir(cwd)
        .env("DE_ROOT", &ctx.root)
        .env("DE_STEP_ID", step.id.as_str())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("could not start /bin/sh: {e}")),
    };
    let pgid = child.id();
    let deadline = tokio::time::Instant::now() + timeout;
    let key = (step.id.clone(), step.lane, step.seq);
    let stop = CancellationToken::new();
    let out = child.stdout.take().map(|o| {
        tokio::spawn(pump(
            o,
            OutStream::Stdout,
            key.clone(),
            events.clone(),
            stop.clone(),
        ))
    });
    let err = child.stderr.take().map(|e| {
        tokio::spawn(pump(
            e,
            OutStream::Stderr,
            key,
            events.clone(),
            stop.clone(),
        ))
    });
    let (status, timed_out, cancelled) = tokio::select! {
        s = tokio::time::timeout_at(deadline, child.wait()) => match s {
            Ok(s) => (s.ok(), false, false),
            Err(_) => {
                kill_group(pgid).await;
                (child.wait().await.ok(), true, false)
            }
        },
        _ = cancel.cancelled() => {
            kill_group(pgid).await;
            (child.wait().await.ok(), false, true)
        }
    };
    // The pipes close when every process holding them has exited. A
    // background child (`nohup svc &`) may hold them for ever: read for a
    // short drain after the script's own end (never past its deadline, and
    // only briefly after a kill), then stop reading. The step never outlives
    // its timeout by more than the drain.
    let now = tokio::time::Instant::now();
    let drain_until = if timed_out || cancelled {
        now + OUTPUT_DRAIN
    } else {
        (now + OUTPUT_DRAIN).min(deadline.max(now))
    };
    let pumps = async {
        let o = match out {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        let e = match err {
            Some(h) => h.await.unwrap_or_default(),
            None => String::new(),
        };
        (o, e)
    };
    tokio::pin!(pumps);
    let (stdout_tail, mut stderr_tail, held_open) =
        match tokio::time::timeout_at(drain_until, &mut pumps).await {
            Ok((o, e)) => (o, e, false),
            Err(_) => {
                stop.cancel();
                let (o, e) = pumps.await;
                (o, e, true)
            }
        };
    if held_open {
        stderr_tail.push_str(HELD_OPEN_NOTE);
    }
    StepOutcome {
        exit_code: status.and_then(|s| s.code()),
        error: if cancelled {
            Some(format!("{CANCELLED}; its process group was killed"))
        } else {
            timed_out.then(|| format!("timed out after {} s and was killed", timeout.as_secs()))
        },
        timed_out,
        duration_ms: 0,
        stdout_tail,
        stderr_tail,
        files: Vec::new(),
    }
}

/// Writes `contents` to `path` under the node root safely even in a directory
/// another user can write (a component's own directory, as
/// `/var/vcap/deploy` owned by `vcap`):
///
/// - the directories from the node root down are walked by [`walk_to`], so
///   a planted symbolic link on the way is refused, naming it;
/// - the data goes to a new file with an unpredictable name, created
///   exclusively and without following links (`O_CREAT|O_EXCL|O_NOFOLLOW`:
///   an existing name, a link included, is never opened);
/// - owner and mode are set on the open file (`fchown`, `fchmod`), never by
///   path; the file is synced, then renamed over the target;
/// - after the rename the target must be that very file (same device and
///   inode), or another user swapped something meanwhile and the step fails.
///
/// Residual race (closing it needs `openat`, which std does not offer
/// without `unsafe`): the create and the rename name their files by path
/// from the node root, so a directory whose *parent* another user can
/// write could be swapped for a link between the walk and those calls. The
/// walk checks each directory just before the write, narrowing that window,
/// and the check after the rename catches a swap not undone in time. A
/// directory another user can only write *into* is not exposed: its own
/// entry sits in a directory only root writes.
fn write_file(
    root: &Path,
    path: &str,
    contents: &[u8],
    mode: u32,
    owner: Option<&str>,
) -> Result<PathBuf, String> {
    write_file_from(root, path, Source::Bytes(contents), mode, owner)
}

/// What [`write_file_from`] writes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source<'a> {
    Bytes(&'a [u8]),
    /// A file's contents, copied (an artifact in the agent's cache).
    File(&'a Path),
}

/// [`write_file`], the contents from `source`.
pub(crate) fn write_file_from(
    root: &Path,
    path: &str,
    source: Source<'_>,
    mode: u32,
    owner: Option<&str>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let target = under_root(root, path)?;
    let ids = match owner {
        Some(o) => {
            Some(resolve_owner(o).map_err(|e| format!("chown {o} {}: {e}", target.display()))?)
        }
        None => None,
    };
    let (dir, name) = walk_to(root, &target, true, "write")?;
    let dest = dir.path.join(name);
    // rename(2) replaces a link at the target name rather than writing
    // through it, so such a link is no danger to this write. It is refused
    // all the same: either someone planted it, or an operator expects writes
    // to land where it points, and silently replacing it surprises both.
    if let Ok(m) = std::fs::symlink_metadata(&dest)
        && m.file_type().is_symlink()
    {
        return Err(format!(
            "{} is a symbolic link{}; refusing to replace it: remove the link, or write to the file it points to",
            target.display(),
            link_target(&dest)
        ));
    }
    let (tmp, file) = create_temp(&dir.path, name)?;
    let chown = format!("chown {} {}", owner.unwrap_or_default(), target.display());
    let filled = fill_temp(&file, &tmp, source, mode, ids, &chown).and_then(|()| {
        std::fs::rename(&tmp, &dest).map_err(|e| format!("rename to {}: {e}", target.display()))
    });
    if let Err(e) = filled {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let ours = file
        .metadata()
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    match std::fs::symlink_metadata(&dest) {
        Ok(m) if m.is_file() && m.dev() == ours.dev() && m.ino() == ours.ino() => {}
        _ => {
            return Err(format!(
                "{} is not the file just written: something replaced it, or a directory above it, while it was written; check who else can write {}",
                target.display(),
                dir.path.display()
            ));
        }
    }
    // Makes the rename durable; the new file is in place whether or not this works.
    let _ = dir.file.sync_all();
    Ok(target)
}

/// Unpacks `archive` (a verified cache entry) into the directory `path`
/// under the node root: into a new private directory beside it first (the
/// walk to it refuses planted links, as [`write_file`]'s does), owned by
/// `owner` when given, its top directory given `mode`; then that directory
/// takes the place of the old one, which is deleted. `tar` (always on
/// Debian) unpacks `.tar.gz` without keeping the archive's owners; `unzip`
/// (Debian's `unzip` package) unpacks `.zip`.
pub(crate) async fn unpack(
    root: &Path,
    path: &str,
    archive: &Path,
    kind: de_common::Unpack,
    mode: u32,
    owner: Option<&str>,
) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let target = under_root(root, path)?;
    let (dir, name) = walk_to(root, &target, true, "unpack into")?;
    let dest = dir.path.join(name);
    if let Ok(m) = std::fs::symlink_metadata(&dest)
        && !m.is_dir()
    {
        return Err(format!(
            "{} exists and is not a directory; refusing to replace it: remove it, or unpack elsewhere",
            target.display()
        ));
    }
    let fresh = dir.path.join(temp_name(name)?);
    std::fs::create_dir(&fresh).map_err(|e| format!("mkdir {}: {e}", fresh.display()))?;
    let cleanup = |e: String| {
        let _ = std::fs::remove_dir_all(&fresh);
        e
    };
    let (program, args): (&str, Vec<std::ffi::OsString>) = match kind {
        de_common::Unpack::TarGz => (
            "tar",
            vec![
                "-xzf".into(),
                archive.into(),
                "-C".into(),
                fresh.clone().into(),
                "--no-same-owner".into(),
            ],
        ),
        de_common::Unpack::Zip => (
            "unzip",
            vec![
                "-q".into(),
                archive.into(),
                "-d".into(),
                fresh.clone().into(),
            ],
        ),
    };
    let out = tokio::process::Command::new(program)
        .args(&args)
        .output()
        .await
        .map_err(|e| {
            cleanup(format!(
                "could not run {program} ({e}){}",
                if program == "unzip" {
                    ": install Debian's unzip package"
                } else {
                    ""
                }
            ))
        })?;
    if !out.status.success() {
        return Err(cleanup(format!(
            "{program} failed to unpack {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if let Some(o) = owner {
        let out = tokio::process::Command::new("chown")
            .arg("-R")
            .arg(o)
            .arg(&fresh)
            .output()
            .await
            .map_err(|e| cleanup(format!("chown: {e}")))?;
        if !out.status.success() {
            return Err(cleanup(format!(
                "chown -R {o} {}: {}",
                target.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| cleanup(format!("chmod {}: {e}", fresh.display())))?;
    let old = dir.path.join(temp_name(name)?);
    let had_old = std::fs::rename(&dest, &old).is_ok();
    if let Err(e) = std::fs::rename(&fresh, &dest) {
        if had_old {
            let _ = std::fs::rename(&old, &dest);
        }
        return Err(cleanup(format!("rename to {}: {e}", target.display())));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    let _ = dir.file.sync_all();
    Ok(target)
}

/// Writes, owns (`chown` names that action in a message), chmods and syncs
/// the open temporary file.
fn fill_temp(
    file: &std::fs::File,
    tmp: &Path,
    source: Source<'_>,
    mode: u32,
    ids: Option<(Option<u32>, Option<u32>)>,
    chown: &str,
) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let mut w = file;
    match source {
        Source::Bytes(contents) => w
            .write_all(contents)
            .map_err(|e| format!("write {}: {e}", tmp.display()))?,
        Source::File(from) => {
            let mut r =
                std::fs::File::open(from).map_err(|e| format!("read {}: {e}", from.display()))?;
            std::io::copy(&mut r, &mut w).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        }
    }
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::fchown(file, uid, gid).map_err(|e| format!("{chown}: {e}"))?;
    }
    // After the chown, which clears the set-user-id and set-group-id bits.
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
    file.sync_all()
        .map_err(|e| format!("write {}: {e}", tmp.display()))
}

/// Creates a new, empty, private temporary file next to `name` in `dir`.
fn create_temp(dir: &Path, name: &OsStr) -> Result<(PathBuf, std::fs::File), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut taken = Vec::new();
    for _ in 0..4 {
        let tmp = dir.join(temp_name(name)?);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => taken.push(tmp),
            Err(e) => return Err(format!("open {}: {e}", tmp.display())),
        }
    }
    Err(format!(
        "could not create a temporary file in {}: every random name tried was taken ({}); check who else writes there",
        dir.display(),
        taken
            .iter()
            .map(|t| t.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// `.<name>.<24 random hex digits>.de-tmp`: a name nobody can create ahead
/// (the name part cut to 64 bytes to stay within the file name limit).
fn temp_name(name: &OsStr) -> Result<OsString, String> {
    use ring::rand::SecureRandom;
    let mut random = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| "the system's random source failed".to_owned())?;
    let mut short = String::new();
    for c in name.to_string_lossy().chars() {
        if short.len() + c.len_utf8() > 64 {
            break;
        }
        short.push(c);
    }
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(".{short}.{hex}.de-tmp").into())
}

/// ` (to X)` for the link at `p`, or nothing when it cannot be read.
fn link_target(p: &Path) -> String {
    std::fs::read_link(p)
        .map(|t| format!(" (to {})", t.display()))
        .unwrap_or_default()
}

/// How many symbolic links a walk follows at most (the kernel's limit too).
const MAX_LINKS: usize = 40;

/// A directory reached by [`walk_to`]: its path with links resolved, and the
/// directory itself, open.
#[derive(Debug)]
struct WalkedDir {
    path: PathBuf,
    file: std::fs::File,
}

/// One move of a walk.
#[derive(Debug)]
enum Hop {
    Down(OsString),
    Up,
}

fn open_dir(p: &Path, follow: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = if follow {
        libc::O_DIRECTORY
    } else {
        libc::O_DIRECTORY | libc::O_NOFOLLOW
    };
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(p)
}

/// Whether a symbolic link may be followed: it and the directory holding it
/// are root's and nobody else may write that directory, so only root could
/// have made the link or could swap it (as `/lib -> usr/lib` or
/// `/var/run -> /run`).
fn trusted_link(link: &std::fs::Metadata, holder: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    link.uid() == 0 && holder.uid() == 0 && holder.mode() & 0o022 == 0
}

/// Walks from the node root to the directory holding `full` (a path
/// [`under_root`] made), one directory at a time, each opened with
/// `O_NOFOLLOW|O_DIRECTORY` and checked to be the one just looked at;
/// missing ones are made when `create`. A directory that is a symbolic link
/// is refused, naming it, unless [`trusted_link`]; a trusted link is
/// followed, and the directories its target names are checked the same
/// way. Returns the directory reached and the file name. `verb` ("write",
/// "read") is for messages.
fn walk_to<'a>(
    root: &Path,
    full: &'a Path,
    create: bool,
    verb: &str,
) -> Result<(WalkedDir, &'a OsStr), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = full.display();
    let rel = full
        .strip_prefix(root)
        .map_err(|_| format!("{shown} is not under the node root {}", root.display()))?;
    let name = rel
        .file_name()
        .ok_or_else(|| format!("{shown} names no file under the node root"))?;
    let mut hops: VecDeque<Hop> = rel
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Hop::Down(n.to_owned())),
            _ => None,
        })
        .collect();
    let open_trusted = |p: &Path| {
        open_dir(p, true)
            .map(|file| WalkedDir {
                path: p.to_owned(),
                file,
            })
            .map_err(|e| format!("open {}: {e}", p.display()))
    };
    let mut here = open_trusted(root)?;
    let mut above: Vec<WalkedDir> = Vec::new();
    let mut links = 0;
    while let Some(hop) = hops.pop_front() {
        let next = match hop {
            Hop::Up => {
                here = match above.pop() {
                    Some(d) => d,
                    None => match here.path.parent() {
                        // Above the node root: only a trusted link leads here.
                        Some(p) => open_trusted(p)?,
                        None => here,
                    },
                };
                continue;
            }
            Hop::Down(n) => n,
        };
        let p = here.path.join(&next);
        let meta = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                match std::fs::create_dir(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(format!("create {}: {e}", p.display())),
                }
                std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{shown}: {e}"));
            }
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        if meta.file_type().is_symlink() {
            let holder = here
                .file
                .metadata()
                .map_err(|e| format!("{}: {e}", here.path.display()))?;
            if !trusted_link(&meta, &holder) {
                return Err(format!(
                    "{} is a symbolic link{} that a user other than root could have planted; refusing to {verb} {shown} through it: remove the link, or give the step the real path",
                    p.display(),
                    link_target(&p)
                ));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(format!(
                    "{shown}: more than {MAX_LINKS} symbolic links on the way"
                ));
            }
            let to = std::fs::read_link(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in to.components().rev() {
                match c {
                    Component::Normal(n) => hops.push_front(Hop::Down(n.to_owned())),
                    Component::ParentDir => hops.push_front(Hop::Up),
                    Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                }
            }
            if to.has_root() {
                above.clear();
                here = open_trusted(Path::new("/"))?;
            }
            continue;
        }
        if !meta.is_dir() {
            return Err(format!(
                "{} is not a directory; cannot {verb} {shown}",
                p.display()
            ));
        }
        let file = open_dir(&p, false).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                format!(
                    "{} became a symbolic link while it was checked; refusing to {verb} {shown} through it",
                    p.display()
                )
            } else {
                format!("open {}: {e}", p.display())
            }
        })?;
        let opened = file
            .metadata()
            .map_err(|e| format!("{}: {e}", p.display()))?;
        if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
            return Err(format!(
                "{} was replaced while it was checked; refusing to {verb} {shown}",
                p.display()
            ));
        }
        above.push(std::mem::replace(&mut here, WalkedDir { path: p, file }));
    }
    Ok((here, name))
}

/// The uid and gid `owner` names, read as chown(1) reads it: `user`,
/// `user:group`, `user:` (the user's login group) or `:group`, each a name
/// or a numeric id.
fn resolve_owner(owner: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    if user.is_empty() && group.is_none() {
        return Err("no user or group given".to_owned());
    }
    let id = |fields: &[String], key: &str| {
        fields
            .get(2)
            .and_then(|f| f.parse::<u32>().ok())
            .ok_or_else(|| format!("the entry for {key:?} has no numeric id"))
    };
    let mut login_group = None;
    let uid = if user.is_empty() {
        None
    } else {
        Some(match lookup("passwd", user)? {
            Some(f) => {
                login_group = f.get(3).and_then(|g| g.parse::<u32>().ok());
                id(&f, user)?
            }
            None => user
                .parse()
                .map_err(|_| format!("no user {user:?} on this node"))?,
        })
    };
    let gid = match group {
        None => None,
        // ":" alone changes nothing, as with chown(1).
        Some("") if user.is_empty() => None,
        Some("") => Some(
            login_group.ok_or_else(|| format!("user {user:?} has no login group on this node"))?,
        ),
        Some(g) => Some(match lookup("group", g)? {
            Some(f) => id(&f, g)?,
            None => g
                .parse()
                .map_err(|_| format!("no group {g:?} on this node"))?,
        }),
    };
    Ok((uid, gid))
}

/// The fields of the entry for `key` (a name or numeric id) in `db`
/// (`passwd` or `group`): through getent, so users from NSS count too, or
/// from /etc/<db> where getent is missing.
fn lookup(db: &str, key: &str) -> Result<Option<Vec<String>>, String> {
    let fields = |line: &str| line.split(':').map(str::to_owned).collect::<Vec<_>>();
    match std::process::Command::new("getent")
        .args([db, "--", key])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .map(fields)),
        // getent's exit status for "no such entry".
        Ok(o) if o.status.code() == Some(2) => Ok(None),
        Ok(o) => Err(format!(
            "getent {db} {key}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = Path::new("/etc").join(db);
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok(text.lines().map(fields).find(|f| {
                f.first().is_some_and(|n| n == key) || f.get(2).is_some_and(|n| n == key)
            }))
        }
        Err(e) => Err(format!("getent: {e}")),
    }
}

/// The last `max` bytes of the log at `full` (a path [`under_root`] made).
/// Log directories belong to their component's user, who could plant a link
/// to a file only root may read: the directories are walked as for a write,
/// and the log is opened with `O_NOFOLLOW` (and `O_NONBLOCK`, so a planted
/// FIFO cannot hang the step) and must be a regular file.
fn tail_of(root: &Path, full: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let shown = full.display();
    let (dir, name) = walk_to(root, full, false, "read")?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.path.join(name))
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                format!(
                    "{shown}: a symbolic link{}; logs are read from regular files only, never through a link",
                    link_target(&dir.path.join(name))
                )
            } else {
                format!("{shown}: {e}")
            }
        })?;
    let meta = f.metadata().map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{shown}: not a regular file; logs are read from regular files only"
        ));
    }
    let len = meta.len();
    if len > max {
        f.seek(SeekFrom::Start(len - max))
            .map_err(|e| format!("{shown}: {e}"))?;
    }
    let mut out = Vec::new();
    f.take(max)
        .read_to_end(&mut out)
        .map_err(|e| format!("{shown}: {e}"))?;
    Ok(out)
}

/// How long output is still read after a script ended (or was killed)
/// while something it started keeps its stdout or stderr open.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Appended to stderr when a background process kept the output open.
const HELD_OPEN_NOTE: &str = "\n[deployment-engine: stopped reading output: a background process the script started kept stdout or stderr open; redirect its output (>/dev/null 2>&1)]\n";

/// Kills what is left of steps that were running when the agent stopped:
/// a script leads a process group of its own, which outlives a killed agent
/// and would otherwise run on beside the steps after it. Its processes are
/// found by the `DE_STEP_ID` they inherit, so a reused pid is never hit.
/// Passes until one finds nothing, for children forked during a pass.
fn kill_leftovers(ids: &[&StepId]) {
    let wanted: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| format!("DE_STEP_ID={}", id.as_str()).into_bytes())
        .collect();
    for _ in 0..10 {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        let mut found = 0;
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(env) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if env
                .split(|b| *b == 0)
                .any(|var| wanted.iter().any(|w| w == var))
            {
                tracing::warn!(
                    pid,
                    "killing a process left by a step the agent's stop interrupted"
                );
                match std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status()
                {
                    Ok(st) if st.success() => {}
                    // Gone between the scan and the kill: the next pass says.
                    Ok(st) => tracing::warn!(pid, %st, "kill -KILL failed"),
                    Err(e) => tracing::warn!(pid, error = %e, "could not run kill"),
                }
                found += 1;
            }
        }
        if found == 0 {
            return;
        }
    }
}

/// Kills the whole process group `pgid` a script leads (its children too).
async fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid {
        let _ = tokio::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status()
            .await;
    }
}

/// Runs one accepted step.
pub(crate) async fn execute(
    step: &Step,
    ctx: &ExecContext,
    events: &mpsc::Sender<StepEvent>,
) -> StepOutcome {
    let started = Instant::now();
    let cancel = ctx.cancels.register(&step.id);
    if cancel.is_cancelled() {
        ctx.cancels.unregister(&step.id);
        return failed(format!("{CANCELLED} before it started"));
    }
    let mut outcome = match &step.action {
        StepAction::Script { .. } => run_script(step, ctx, events, &cancel).await,
        StepAction::Cancel { step_ids } => ok(ctx.cancels.cancel(step_ids)),
        StepAction::MarkApplied {
            instance,
            fingerprint,
            files,
            check,
        } => match ctx.applied.mark(
            &ctx.root,
            &ctx.monit,
            instance,
            fingerprint,
            files,
            check.as_deref(),
        ) {
            Ok(summary) => ok(summary),
            Err(e) => failed(de_common::ErrorChain(&e).to_string()),
        },
        StepAction::Unmark { instance } => match ctx.applied.unmark(instance) {
            Ok(summary) => ok(summary),
            Err(e) => failed(de_common::ErrorChain(&e).to_string()),
        },
        StepAction::WriteFile {
            path,
            contents,
            mode,
            owner,
        } => match write_file(&ctx.root, path, contents, *mode, owner.as_deref()) {
            Err(e) => failed(e),
            Ok(target) => ok(match owner {
                None => format!("wrote {} ({} bytes)", target.display(), contents.len()),
                Some(owner) => format!("wrote {} owned by {owner}", target.display()),
            }),
        },
        StepAction::Fetch {
            artifact,
            sha256,
            size,
            path,
            mode,
            owner,
            unpack: how,
        } => match &ctx.fetcher {
            None => failed("this agent has no artifact cache".into()),
            Some(fetcher) => {
                let mut notes = Vec::new();
                // Progress lines go out as the step's output (live log, step view).
                let progress = |done: u64| {
                    let _ = events.try_send(StepEvent {
                        step_id: step.id.clone(),
                        lane: step.lane,
                        seq: step.seq,
                        kind: StepEventKind::Output {
                            stream: OutStream::Stdout,
                            lines: vec![format!(
                                "fetch {artifact}: {done} of {size} bytes ({}%)",
                                done * 100 / (*size).max(1)
                            )],
                        },
                    });
                };
                match fetcher
                    .get(sha256, *size, &cancel, &mut notes, &progress)
                    .await
                {
                    Err(e) => failed(format!("fetch {artifact}: {e}")),
                    Ok(entry) => {
                        let placed = match how {
                            Some(kind) => {
                                unpack(&ctx.root, path, &entry, *kind, *mode, owner.as_deref())
                                    .await
                            }
                            None => {
                                let (root, path, owner, mode) =
                                    (ctx.root.clone(), path.clone(), owner.clone(), *mode);
                                tokio::task::spawn_blocking(move || {
                                    write_file_from(
                                        &root,
                                        &path,
                                        Source::File(&entry),
                                        mode,
                                        owner.as_deref(),
                                    )
                                })
                                .await
                                .unwrap_or_else(|e| Err(format!("the write stopped: {e}")))
                            }
                        };
                        match placed {
                            Ok(target) => ok(format!(
                                "{artifact}: {}; {} {}",
                                notes.join("; "),
                                if how.is_some() {
                                    "unpacked into"
                                } else {
                                    "written to"
                                },
                                target.display()
                            )),
                            Err(e) => failed(format!("{artifact}: {}; {e}", notes.join("; "))),
                        }
                    }
                }
            }
        },
        StepAction::MonitAdd { name, check } => match ctx.monit.add(name, check).await {
            Ok(out) => ok(out),
            Err(e) => failed(e.to_string()),
        },
        StepAction::MonitRemove { name } => match ctx.monit.remove(name).await {
            Ok(out) => ok(out),
            Err(e) => failed(e.to_string()),
        },
        StepAction::Monit { name, op } => match ctx.monit.op(name, *op).await {
            Ok(out) => ok(out),
            Err(e) => failed(e.to_string()),
        },
        StepAction::CollectLogs { paths, max_bytes } => {
            let mut budget = MAX_COLLECT;
            let mut files = Vec::new();
            let mut errors = Vec::new();
            for p in paths {
                let per = (*max_bytes).min(budget);
                match under_root(&ctx.root, p).and_then(|full| tail_of(&ctx.root, &full, per)) {
                    Ok(bytes) => {
                        budget = budget.saturating_sub(bytes.len() as u64);
                        files.push((p.clone(), bytes));
                    }
                    Err(e) => errors.push(e),
                }
            }
            StepOutcome {
                exit_code: Some(0),
                stderr_tail: errors.join("\n"),
                files,
                ..StepOutcome::default()
            }
        }
    };
    ctx.cancels.unregister(&step.id);
    outcome.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether process `pid` runs: `/proc/PID/stat` exists and its state is
    /// not Z (a zombie has exited) nor X.
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let state = s.rsplit_once(')')?.1.trim_start().chars().next()?;
                Some(!matches!(state, 'Z' | 'X'))
            })
            .unwrap_or(false)
    }

    /// Waits, at most `limit`, for the process whose pid a script wrote to
    /// `pidfile` to exit; false (and the process killed) if it still runs.
    async fn exits_within(pidfile: &Path, limit: Duration) -> bool {
        let pid = std::fs::read_to_string(pidfile).expect("the child wrote its pid");
        let pid = pid.trim();
        assert!(pid.parse::<u32>().is_ok(), "pid {pid:?}");
        let deadline = Instant::now() + limit;
        while alive(pid) {
            if Instant::now() >= deadline {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", pid])
                    .status();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn step(action: StepAction) -> Step {
        Step {
            id: "s-1".into(),
            deployment_id: None,
            node_id: "n-1".into(),
            lane: Lane::Adhoc,
            seq: 1,
            issued_at: 0,
            not_after: u64::MAX,
            action,
        }
    }

    #[tokio::test]
    async fn an_archive_is_unpacked_into_a_fresh_directory_that_replaces_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("bin")).expect("mkdir");
        std::fs::write(src.join("bin/app"), "v2").expect("write");
        let archive = dir.path().join("app.tgz");
        let made = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(&src)
            .arg("bin")
            .status()
            .expect("tar");
        assert!(made.success());
        // The old release, with a file the new one does not have.
        std::fs::create_dir_all(root.join("opt/app/bin")).expect("mkdir");
        std::fs::write(root.join("opt/app/stale"), "v1").expect("write");
        let target = unpack(
            &root,
            "opt/app",
            &archive,
            de_common::Unpack::TarGz,
            0o755,
            None,
        )
        .await
        .expect("unpack");
        assert_eq!(target, root.join("opt/app"));
        assert_eq!(
            std::fs::read_to_string(root.join("opt/app/bin/app")).expect("read"),
            "v2"
        );
        assert!(
            !root.join("opt/app/stale").exists(),
            "the old directory was replaced"
        );
        let left: Vec<_> = std::fs::read_dir(root.join("opt"))
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["app"], "no temporary directory is left");
        // A file where the directory should go is not replaced; garbage is not an archive.
        std::fs::write(root.join("opt/file"), "x").expect("write");
        let e = unpack(
            &root,
            "opt/file",
            &archive,
            de_common::Unpack::TarGz,
            0o755,
            None,
        )
        .await
        .expect_err("a file");
        assert!(e.contains("is not a directory"), "{e}");
        std::fs::write(dir.path().join("junk.tgz"), "not gzip").expect("write");
        let e = unpack(
            &root,
            "opt/junk",
            &dir.path().join("junk.tgz"),
            de_common::Unpack::TarGz,
            0o755,
            None,
        )
        .await
        .expect_err("junk");
        assert!(e.contains("tar failed"), "{e}");
        assert!(!root.join("opt/junk").exists());
    }

    fn ctx(root: &Path) -> ExecContext {
        ExecContext {
            cancels: Arc::default(),
            applied: Arc::new(crate::applied::Applied::load(root).expect("applied book")),
            root: root.to_owned(),
            monit: Monit::system(),
            fetcher: None,
        }
    }

    fn script(s: &str, timeout_secs: u32) -> StepAction {
        StepAction::Script {
            script: s.into(),
            user: None,
            env: vec![("GREETING".into(), "hello".into())],
            timeout_secs,
        }
    }

    #[tokio::test]
    async fn scripts_stream_lines_and_report_exit_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::channel(16);
        let s = step(script("echo $GREETING; echo oops >&2; pwd; exit 3", 10));
        let out = execute(&s, &ctx(dir.path()), &tx).await;
        drop(tx);
        assert_eq!(out.exit_code, Some(3));
        assert!(!out.succeeded());
        let root = std::fs::canonicalize(dir.path()).expect("canon");
        assert_eq!(out.stdout_tail, format!("hello\n{}\n", root.display()));
        assert_eq!(out.stderr_tail, "oops\n");
        let mut lines = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let StepEventKind::Output { stream, lines: l } = ev.kind {
                lines.extend(l.into_iter().map(|x| (stream, x)));
            }
        }
        assert!(lines.contains(&(OutStream::Stdout, "hello".into())));
        assert!(lines.contains(&(OutStream::Stderr, "oops".into())));
    }

    #[tokio::test]
    async fn a_cancel_kills_a_running_script_and_withdraws_one_not_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(64);
        let c = ctx(dir.path());
        let child_pid = dir.path().join("child.pid");
        let long = step(script(
            &format!(
                "sh -c 'echo $$ > {}; exec sleep 60' & sleep 60",
                child_pid.display()
            ),
            120,
        ));
        let running = {
            let (c, tx, long) = (c.clone(), tx.clone(), long.clone());
            tokio::spawn(async move { execute(&long, &c, &tx).await })
        };
        // Cancel it once it runs (bounded wait for the registration).
        let mut cancel = step(StepAction::Cancel {
            step_ids: vec![long.id.clone(), "s-later".into()],
        });
        cancel.id = "s-cancel".into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(c.cancels.lock().running.contains_key(&long.id) && child_pid.exists()) {
            assert!(Instant::now() < deadline, "the script never registered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = execute(&cancel, &c, &tx).await;
        assert_eq!(report.exit_code, Some(0), "{report:?}");
        assert!(
            report.stdout_tail.contains("running, cancelled"),
            "{report:?}"
        );
        assert!(
            report
                .stdout_tail
                .contains("s-later: not running here, withdrawn")
        );
        let out = tokio::time::timeout(Duration::from_secs(20), running)
            .await
            .expect("the cancelled step ended")
            .expect("join");
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("cancelled by the controller"),
            "{out:?}"
        );
        assert!(!out.timed_out && out.exit_code.is_none(), "{out:?}");
        // A step withdrawn before it came does not run at all.
        let marker = dir.path().join("ran");
        let mut later = step(script(&format!("touch {}", marker.display()), 10));
        later.id = "s-later".into();
        let out = execute(&later, &c, &tx).await;
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("before it started"),
            "{out:?}"
        );
        assert!(!marker.exists(), "a withdrawn step ran");
        // The killed group took the script's child with it.
        assert!(
            exits_within(&child_pid, Duration::from_secs(10)).await,
            "the cancelled script's child survived"
        );
    }

    #[tokio::test]
    async fn a_background_child_holding_stdout_does_not_keep_the_step_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(64);
        let pidfile = dir.path().join("bg.pid");
        // The script ends at once with 0; its child keeps stdout open for 30 s.
        let s = step(script(
            &format!(
                "echo started; sleep 30 & echo $! > {}; exit 0",
                pidfile.display()
            ),
            60,
        ));
        let out = tokio::time::timeout(Duration::from_secs(20), execute(&s, &ctx(dir.path()), &tx))
            .await
            .expect("the step ended before its background child");
        let bg = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let alive = std::path::Path::new(&format!("/proc/{}", bg.trim())).exists();
        let _ = std::process::Command::new("kill").arg(bg.trim()).status();
        assert_eq!(out.exit_code, Some(0), "{out:?}");
        assert!(!out.timed_out, "{out:?}");
        assert!(out.stdout_tail.contains("started"), "{out:?}");
        assert!(
            out.stderr_tail.contains("kept stdout or stderr open"),
            "{out:?}"
        );
        assert!(alive, "a service the script started is left running");
    }

    #[tokio::test]
    async fn a_timeout_ends_the_step_even_when_an_escaped_child_holds_the_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(64);
        let pidfile = dir.path().join("escaped.pid");
        // setsid puts the child outside the script's process group, so the kill misses it.
        let s = step(script(
            &format!(
                "setsid sleep 30 & echo $! > {}; sleep 30",
                pidfile.display()
            ),
            1,
        ));
        let out = tokio::time::timeout(Duration::from_secs(20), execute(&s, &ctx(dir.path()), &tx))
            .await
            .expect("the step ended at its timeout");
        let bg = std::fs::read_to_string(&pidfile).unwrap_or_default();
        let _ = std::process::Command::new("kill").arg(bg.trim()).status();
        assert!(out.timed_out, "{out:?}");
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("timed out"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_script_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let child_pid = dir.path().join("child.pid");
        let s = step(script(
            &format!(
                "sh -c 'echo $$ > {}; exec sleep 60' & sleep 30",
                child_pid.display()
            ),
            1,
        ));
        let out = execute(&s, &ctx(dir.path()), &tx).await;
        assert!(out.timed_out, "{out:?}");
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("timed out")
        );
        assert!(out.duration_ms < 10_000, "{out:?}");
        // The background child was in the killed process group.
        assert!(
            exits_within(&child_pid, Duration::from_secs(10)).await,
            "the script's child survived the kill"
        );
    }

    #[test]
    fn long_lines_are_cut_and_tails_are_bounded() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        let big = vec![b'x'; MAX_LINE * 3];
        l.feed(&big, &mut out);
        l.feed(b"\nshort\npart", &mut out);
        l.finish(&mut out);
        assert_eq!(out.len(), 3);
        assert!(out[0].len() < MAX_LINE + 64 && out[0].ends_with("[line cut at 8 KiB]"));
        assert_eq!(out[1], "short");
        assert_eq!(out[2], "part");
        let mut t = Tail::new(4);
        t.push(b"abc");
        t.push(b"def");
        assert_eq!(t.text(), "cdef");
        t.push(b"0123456789");
        assert_eq!(t.text(), "6789");
    }

    #[tokio::test]
    async fn files_are_written_under_the_root_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let w = |path: &str| {
            step(StepAction::WriteFile {
                path: path.into(),
                contents: b"data".to_vec(),
                mode: 0o640,
                owner: None,
            })
        };
        let out = execute(&w("/etc/app/conf"), &ctx(dir.path()), &tx).await;
        assert!(out.succeeded(), "{out:?}");
        let target = dir.path().join("etc/app/conf");
        assert_eq!(std::fs::read(&target).expect("read"), b"data");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&target)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let inside = format!("{}/etc/app/other", dir.path().display());
        let out = execute(&w(&inside), &ctx(dir.path()), &tx).await;
        assert!(out.succeeded(), "{out:?}");
        assert!(
            dir.path().join("etc/app/other").exists(),
            "an absolute path inside the root is kept"
        );
        let out = execute(&w("../escape"), &ctx(dir.path()), &tx).await;
        assert!(!out.succeeded());
        assert!(
            out.error
                .unwrap_or_default()
                .contains("leaves the node root")
        );
        let logs = step(StepAction::CollectLogs {
            paths: vec!["etc/app/conf".into(), "missing.log".into()],
            max_bytes: 2,
        });
        let out = execute(&logs, &ctx(dir.path()), &tx).await;
        assert_eq!(out.files, vec![("etc/app/conf".to_owned(), b"ta".to_vec())]);
        assert!(out.stderr_tail.contains("missing.log"));
    }

    /// Whether the tests run as root: then a planted link must be made to
    /// look like another user's, or the walk would rightly trust it.
    fn running_as_root(dir: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir)
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    }

    /// Gives `path` (a link itself, not what it points to) to `nobody`, as a
    /// component's user would own it, when running as root; unprivileged,
    /// it already belongs to a user other than root.
    fn give_away(path: &Path) {
        if running_as_root(Path::new("/")) {
            std::os::unix::fs::lchown(path, Some(65534), Some(65534)).expect("lchown");
        }
    }

    fn write_step(path: &str, mode: u32, owner: Option<&str>) -> Step {
        step(StepAction::WriteFile {
            path: path.into(),
            contents: b"data".to_vec(),
            mode,
            owner: owner.map(str::to_owned),
        })
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn is_link(p: &Path) -> bool {
        std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
    }

    #[tokio::test]
    async fn a_planted_temporary_or_target_link_is_never_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let c = ctx(dir.path());
        let secret = outside.path().join("passwd");
        std::fs::write(&secret, b"root:x:0:0::/root:/bin/sh\n").expect("write");
        let app = dir.path().join("etc/app");
        std::fs::create_dir_all(&app).expect("mkdir");
        give_away(&app);
        // The temporary name the agent used to write through, and a guess at a new one.
        let old_tmp = app.join(".conf.de-tmp");
        std::os::unix::fs::symlink(&secret, &old_tmp).expect("symlink");
        give_away(&old_tmp);
        let guess = app.join(".conf.000000000000000000000000.de-tmp");
        std::os::unix::fs::symlink(&secret, &guess).expect("symlink");
        give_away(&guess);

        let out = execute(&write_step("etc/app/conf", 0o640, None), &c, &tx).await;
        assert!(out.succeeded(), "{out:?}");
        assert_eq!(
            std::fs::read(&secret).expect("read"),
            b"root:x:0:0::/root:/bin/sh\n"
        );
        assert!(is_link(&old_tmp) && is_link(&guess));
        assert_eq!(std::fs::read(app.join("conf")).expect("read"), b"data");
        assert!(!is_link(&app.join("conf")));
        assert_eq!(
            names_in(&app),
            [
                ".conf.000000000000000000000000.de-tmp",
                ".conf.de-tmp",
                "conf"
            ],
            "no temporary file is left behind"
        );

        // A link at the target name is refused, naming it, and left alone.
        let linked = app.join("linked");
        std::os::unix::fs::symlink(&secret, &linked).expect("symlink");
        give_away(&linked);
        let out = execute(&write_step("etc/app/linked", 0o640, None), &c, &tx).await;
        let error = out.error.unwrap_or_default();
        assert!(
            error.contains(&format!("{} is a symbolic link", linked.display())),
            "{error}"
        );
        assert!(is_link(&linked));
        assert_eq!(
            std::fs::read(&secret).expect("read"),
            b"root:x:0:0::/root:/bin/sh\n"
        );

        // Temporary names cannot be known ahead.
        let a = temp_name(OsStr::new("conf")).expect("name");
        let b = temp_name(OsStr::new("conf")).expect("name");
        assert_ne!(a, b);
        let a = a.to_string_lossy().into_owned();
        assert!(
            a.starts_with(".conf.") && a.ends_with(".de-tmp") && a.len() == 37,
            "{a}"
        );
        let long = "x".repeat(255);
        assert!(temp_name(OsStr::new(&long)).expect("name").len() <= 255);
    }

    #[tokio::test]
    async fn a_symlinked_directory_on_the_way_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let c = ctx(dir.path());
        std::fs::write(outside.path().join("cf.yml"), b"original").expect("write");
        // A prepare step gave /var/vcap/deploy to vcap; vcap plants a link in it.
        let deploy = dir.path().join("var/vcap/deploy");
        std::fs::create_dir_all(&deploy).expect("mkdir");
        give_away(&deploy);
        let planted = deploy.join("conf");
        std::os::unix::fs::symlink(outside.path(), &planted).expect("symlink");
        give_away(&planted);

        let out = execute(
            &write_step("/var/vcap/deploy/conf/cf.yml", 0o600, None),
            &c,
            &tx,
        )
        .await;
        assert!(!out.succeeded(), "{out:?}");
        let error = out.error.unwrap_or_default();
        assert!(
            error.contains(&format!("{} is a symbolic link", planted.display())),
            "{error}"
        );
        assert_eq!(names_in(outside.path()), ["cf.yml"]);
        assert_eq!(
            std::fs::read(outside.path().join("cf.yml")).expect("read"),
            b"original"
        );
        // Writing into the directory vcap owns is fine.
        let out = execute(&write_step("var/vcap/deploy/cf.yml", 0o600, None), &c, &tx).await;
        assert!(out.succeeded(), "{out:?}");
        assert_eq!(std::fs::read(deploy.join("cf.yml")).expect("read"), b"data");

        if !running_as_root(dir.path()) {
            return;
        }
        // A link only root could have made is followed (as /lib -> usr/lib),
        // and what its target names is checked the same way.
        std::fs::create_dir_all(dir.path().join("usr/lib")).expect("mkdir");
        std::os::unix::fs::symlink("usr/lib", dir.path().join("lib")).expect("symlink");
        let out = execute(&write_step("lib/app.conf", 0o644, None), &c, &tx).await;
        assert!(out.succeeded(), "{out:?}");
        assert_eq!(
            std::fs::read(dir.path().join("usr/lib/app.conf")).expect("read"),
            b"data"
        );
        std::os::unix::fs::symlink("../../var/vcap/deploy", dir.path().join("usr/lib/deploy"))
            .expect("symlink");
        let out = execute(&write_step("lib/deploy/up.yml", 0o644, None), &c, &tx).await;
        assert!(out.succeeded(), "{out:?}");
        assert_eq!(std::fs::read(deploy.join("up.yml")).expect("read"), b"data");
        std::os::unix::fs::symlink("var/vcap/deploy/conf", dir.path().join("via"))
            .expect("symlink");
        let out = execute(&write_step("via/cf.yml", 0o600, None), &c, &tx).await;
        let error = out.error.unwrap_or_default();
        assert!(
            error.contains(&format!("{} is a symbolic link", planted.display())),
            "{error}"
        );
        assert_eq!(names_in(outside.path()), ["cf.yml"]);
    }

    #[tokio::test]
    async fn logs_are_read_from_regular_files_only_never_through_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let secret = outside.path().join("shadow");
        std::fs::write(&secret, b"TOP SECRET").expect("write");
        let logs = dir.path().join("var/vcap/sys/log/app");
        std::fs::create_dir_all(&logs).expect("mkdir");
        give_away(&logs);
        std::fs::write(logs.join("app.log"), b"line one\nline two\n").expect("write");
        std::os::unix::fs::symlink(&secret, logs.join("stolen.log")).expect("symlink");
        give_away(&logs.join("stolen.log"));
        std::os::unix::fs::symlink(outside.path(), logs.join("sub")).expect("symlink");
        give_away(&logs.join("sub"));
        let fifo = logs.join("pipe.log");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());

        let rel = |n: &str| format!("var/vcap/sys/log/app/{n}");
        let step = step(StepAction::CollectLogs {
            paths: vec![rel("app.log"), rel("stolen.log"), rel("sub/shadow")],
            max_bytes: 9,
        });
        let out = execute(&step, &ctx(dir.path()), &tx).await;
        assert_eq!(out.files, vec![(rel("app.log"), b"line two\n".to_vec())]);
        assert!(!format!("{out:?}").contains("TOP SECRET"), "{out:?}");
        let errors = out.stderr_tail;
        assert!(
            errors.contains(&format!(
                "{}: a symbolic link",
                logs.join("stolen.log").display()
            )),
            "{errors}"
        );
        assert!(
            errors.contains(&format!(
                "{} is a symbolic link",
                logs.join("sub").display()
            )),
            "{errors}"
        );

        // A FIFO is refused at once (opening one to read would wait for a writer).
        let (done, got) = std::sync::mpsc::channel();
        let (root, path) = (dir.path().to_owned(), fifo.clone());
        std::thread::spawn(move || {
            let _ = done.send(tail_of(&root, &path, 16));
        });
        let read = got
            .recv_timeout(Duration::from_secs(10))
            .expect("reading a FIFO returned");
        assert_eq!(
            read,
            Err(format!(
                "{}: not a regular file; logs are read from regular files only",
                fifo.display()
            ))
        );
    }

    fn id(args: &[&str]) -> String {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[tokio::test]
    async fn mode_and_owner_are_those_asked_set_on_the_file_written() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, _rx) = mpsc::channel(16);
        let c = ctx(dir.path());
        let mut cases = vec![(format!("{}:{}", id(&["-un"]), id(&["-gn"])), ["", ""])];
        if running_as_root(dir.path()) {
            cases.push(("nobody:".to_owned(), ["nobody", "nobody"]));
        }
        for (i, (owner, of)) in cases.iter().enumerate() {
            let path = format!("etc/app/tool-{i}");
            // Set-user-id survives only if the mode is set after the owner.
            let out = execute(&write_step(&path, 0o4750, Some(owner)), &c, &tx).await;
            assert!(out.succeeded(), "{out:?}");
            assert!(
                out.stdout_tail.ends_with(&format!("owned by {owner}")),
                "{out:?}"
            );
            let meta = std::fs::metadata(dir.path().join(&path)).expect("meta");
            let want = |flag: &str, who: &str| {
                let args: Vec<&str> = [flag]
                    .into_iter()
                    .chain((!who.is_empty()).then_some(who))
                    .collect();
                id(&args).parse::<u32>().expect("numeric id")
            };
            assert_eq!(meta.uid(), want("-u", of[0]), "{owner}");
            assert_eq!(meta.gid(), want("-g", of[1]), "{owner}");
            assert_eq!(meta.mode() & 0o7777, 0o4750, "{owner}");
        }
        // An unknown owner fails before anything is written.
        let out = execute(
            &write_step("etc/app/bad", 0o640, Some("no-such-user-de:root")),
            &c,
            &tx,
        )
        .await;
        let error = out.error.unwrap_or_default();
        assert!(error.contains("no user \"no-such-user-de\""), "{error}");
        assert!(!dir.path().join("etc/app/bad").exists());
        assert!(
            names_in(&dir.path().join("etc/app"))
                .iter()
                .all(|n| !n.ends_with(".de-tmp"))
        );
    }

    #[test]
    fn owners_are_read_as_chown_reads_them() {
        assert_eq!(resolve_owner("root"), Ok((Some(0), None)));
        assert_eq!(resolve_owner("0:0"), Ok((Some(0), Some(0))));
        assert_eq!(resolve_owner("root:"), Ok((Some(0), Some(0))));
        assert_eq!(resolve_owner(":0"), Ok((None, Some(0))));
        assert_eq!(resolve_owner(":"), Ok((None, None)));
        assert_eq!(resolve_owner("4242:4343"), Ok((Some(4242), Some(4343))));
        assert!(resolve_owner("").is_err());
        assert_eq!(
            resolve_owner("root:no-such-group-de"),
            Err("no group \"no-such-group-de\" on this node".to_owned())
        );
    }

    #[test]
    fn a_step_signed_for_another_lane_is_refused() {
        let s = step(script("true", 1));
        assert_eq!(pulled_on(s.clone(), Lane::Adhoc), Ok(s.clone()));
        let refusal = pulled_on(s, Lane::Deploy).expect_err("refused");
        assert_eq!(
            refusal,
            StepRefusal::WrongLane {
                expected: Lane::Deploy,
                got: Lane::Adhoc
            }
        );
        assert_eq!(
            refusal.to_string(),
            "step is signed for lane adhoc, but came on a pull of lane deploy"
        );
    }

    #[test]
    fn an_interrupted_step_is_reported_once_and_not_rerun() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = Ledger::load(dir.path()).expect("load");
        let mut s = step(script("sleep 60", 120));
        // An id of its own: the reload kills every process carrying it.
        s.id = "s-interrupted-by-a-stop".into();
        l.begin(&s).expect("begin");
        // The script the stopped agent left, in a process group of its own.
        let mut left = std::process::Command::new("sleep")
            .arg("60")
            .env("DE_STEP_ID", s.id.as_str())
            .process_group(0)
            .spawn()
            .expect("spawn");
        // `spawn` returns once the exec began, but the kernel sets a new
        // program's environment up after that: until then its environ
        // reads empty, and a scan finds nothing (the CI failure this
        // test once had). A stopped agent's leftovers are long past it.
        let marker = format!("DE_STEP_ID={}", s.id.as_str());
        let environ = format!("/proc/{}/environ", left.id());
        let ready = Instant::now() + Duration::from_secs(10);
        while !std::fs::read(&environ)
            .unwrap_or_default()
            .split(|b| *b == 0)
            .any(|v| v == marker.as_bytes())
        {
            assert!(
                Instant::now() < ready,
                "the script never showed its environment"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(l);
        let mut l = Ledger::load(dir.path()).expect("reload");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = left.try_wait().expect("try_wait") {
                break st;
            }
            if Instant::now() >= deadline {
                // Say what the scan would have seen, so a failure can be read.
                let carries = std::fs::read(&environ)
                    .map(|e| e.split(|b| *b == 0).any(|v| v == marker.as_bytes()));
                let _ = left.kill();
                panic!(
                    "the interrupted step's script (pid {}) still runs after the reload; \
                     its environ carries the step id: {carries:?}",
                    left.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(9), "{status}");
        assert_eq!(l.last_done(Lane::Adhoc), 1);
        let unacked = l.unacked();
        assert_eq!(unacked.len(), 1);
        match &unacked[0].kind {
            StepEventKind::Finished(o) => {
                assert!(
                    o.error
                        .as_deref()
                        .unwrap_or_default()
                        .contains("interrupted")
                )
            }
            other => panic!("unexpected {other:?}"),
        }
        l.acked(&s.id).expect("ack");
        let l = Ledger::load(dir.path()).expect("reload");
        assert!(l.unacked().is_empty());
        assert_eq!(l.last_done(Lane::Deploy), 0);
    }
}
