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
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use de_common::{
    Lane, OutStream, Step, StepAction, StepEvent, StepEventKind, StepOutcome, StepRefusal,
    write_private,
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
    running: Option<(u64, String)>,
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

    pub fn acked(&mut self, step_id: &str) -> Result<(), LedgerError> {
        let before = self.state.unacked.len();
        self.state.unacked.retain(|e| e.step_id != step_id);
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
    running: HashMap<String, CancellationToken>,
    withdrawn: VecDeque<String>,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token of step `id`, which starts now: already cancelled when the
    /// controller withdrew the step before it came.
    fn register(&self, id: &str) -> CancellationToken {
        let mut inner = self.lock();
        let token = CancellationToken::new();
        if let Some(i) = inner.withdrawn.iter().position(|w| w == id) {
            inner.withdrawn.remove(i);
            token.cancel();
        }
        inner.running.insert(id.to_owned(), token.clone());
        token
    }

    fn unregister(&self, id: &str) {
        self.lock().running.remove(id);
    }

    /// Cancels each step: a running one now, one still to come when it comes.
    fn cancel(&self, ids: &[String]) -> String {
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
    step: (String, Lane, u64),
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
        .env("DE_STEP_ID", &step.id)
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

fn write_file(
    ctx: &ExecContext,
    path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let target = under_root(&ctx.root, path)?;
    let dir = target
        .parent()
        .ok_or_else(|| format!("{path:?} has no parent directory"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{path:?} names no file"))?;
    let tmp = dir.join(format!(".{name}.de-tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(&tmp)
        .map_err(|e| format!("open {}: {e}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    drop(f);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| format!("rename to {}: {e}", target.display()))?;
    Ok(target)
}

fn tail_of(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max {
        f.seek(SeekFrom::Start(len - max))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let mut out = Vec::new();
    f.take(max)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

/// How long output is still read after a script ended (or was killed)
/// while something it started keeps its stdout or stderr open.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Appended to stderr when a background process kept the output open.
const HELD_OPEN_NOTE: &str = "\n[deployment-engine: stopped reading output: a background process the script started kept stdout or stderr open; redirect its output (>/dev/null 2>&1)]\n";

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
        } => match write_file(ctx, path, contents, *mode) {
            Err(e) => failed(e),
            Ok(target) => match owner {
                None => ok(format!(
                    "wrote {} ({} bytes)",
                    target.display(),
                    contents.len()
                )),
                Some(owner) => match tokio::process::Command::new("chown")
                    .arg(owner)
                    .arg(&target)
                    .output()
                    .await
                {
                    Ok(o) if o.status.success() => {
                        ok(format!("wrote {} owned by {owner}", target.display()))
                    }
                    Ok(o) => failed(format!(
                        "chown {owner} {}: {}",
                        target.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => failed(format!("chown: {e}")),
                },
            },
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
                match under_root(&ctx.root, p).and_then(|full| tail_of(&full, per)) {
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

    fn ctx(root: &Path) -> ExecContext {
        ExecContext {
            cancels: Arc::default(),
            applied: Arc::new(crate::applied::Applied::load(root).expect("applied book")),
            root: root.to_owned(),
            monit: Monit::system(),
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
        let child_marker = dir.path().join("child-finished");
        let long = step(script(
            &format!("(sleep 2; touch {}) & sleep 60", child_marker.display()),
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
        while !c.cancels.lock().running.contains_key(&long.id) {
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
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !child_marker.exists(),
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
        let marker = dir.path().join("child-alive");
        let s = step(script(
            &format!("(sleep 3; touch {}) & sleep 30", marker.display()),
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
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(!marker.exists(), "the script's child survived the kill");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = Ledger::load(dir.path()).expect("load");
        let s = step(script("true", 1));
        l.begin(&s).expect("begin");
        drop(l);
        let mut l = Ledger::load(dir.path()).expect("reload");
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
        l.acked("s-1").expect("ack");
        let l = Ledger::load(dir.path()).expect("reload");
        assert!(l.unacked().is_empty());
        assert_eq!(l.last_done(Lane::Deploy), 0);
    }
}
