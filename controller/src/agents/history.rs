//! Step history: how long the store keeps the records of steps that ended.
//!
//! Every step ever queued stays in the steps tree until this prunes it: an
//! exec to 10,000 nodes is 10,000 records, and without a bound the store
//! grew by a gigabyte in twenty of them, and with it the controller's
//! memory, its start (it scans the tree) and every exec after.
//!
//! A record is pruned when its step ended more than `max_age` ago, or when
//! `per_lane` newer steps are on its (node, lane) queue. Never pruned,
//! whatever the settings:
//! - a step not final yet (queued, running);
//! - a step that ended less than [`MIN_KEEP`] ago: an exec still gathering
//!   its answers, or a client reading one it was just given, finds it;
//! - a step of a deployment still running: its driver reads each step's
//!   record, and would queue a step it cannot find again;
//! - the last step of each queue: the next sequence number follows it.
//!
//! Every [`TICK`] (and once a minute after the start) one pass reads the
//! steps tree a page at a time, a few fields of each record, and removes
//! what it selects with one flush per page; a shutdown stops it between
//! pages (a pass over a million records takes tens of seconds). The id
//! index entry goes first, then the record: a crash between them leaves a
//! record no id finds, which the next pass removes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use de_common::api::DeployState;
use de_common::{DeploymentId, StepId};

use super::steps::StepState;
use crate::Controller;
use crate::store::{Store, StoreError, StoreExt, Tree, decode_json, for_each_paged};

/// The default `step_history_days`.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default `step_history_per_lane`.
pub const DEFAULT_PER_LANE: usize = 20;
/// A step that ended less than this ago is kept.
pub const MIN_KEEP: Duration = Duration::from_secs(600);
/// How often a pass runs.
pub const TICK: Duration = Duration::from_secs(600);
/// The first pass, after the start: past the reconnect burst of a restart.
const FIRST: Duration = Duration::from_secs(60);
/// Records read (and at most removed) per page of a pass.
const PAGE: usize = 1024;

/// What the store keeps of ended steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepHistory {
    /// A step that ended longer ago than this is pruned.
    pub max_age: Duration,
    /// Per (node, lane), at most this many steps are kept (the newest).
    pub per_lane: usize,
    /// A step that ended less than this ago is kept ([`MIN_KEEP`]; shorter
    /// only in tests).
    pub min_keep: Duration,
    /// Between two passes ([`TICK`]; shorter only in tests).
    pub every: Duration,
}

impl Default for StepHistory {
    fn default() -> StepHistory {
        StepHistory {
            max_age: DEFAULT_MAX_AGE,
            per_lane: DEFAULT_PER_LANE,
            min_keep: MIN_KEEP,
            every: TICK,
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Step records read.
    pub read: usize,
    /// Step records removed.
    pub removed: usize,
}

/// The fields of a stored step record a pass reads.
#[derive(Deserialize)]
struct Brief {
    step: BriefStep,
    state: StepState,
    finished_at: Option<String>,
}

#[derive(Deserialize)]
struct BriefStep {
    id: StepId,
    deployment_id: Option<DeploymentId>,
    issued_at: u64,
}

/// One record of a queue, as a pass sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Past {
    key: String,
    id: StepId,
    /// Unix seconds it ended at; `None` while it has not.
    ended: Option<u64>,
    deployment: Option<DeploymentId>,
}

/// Which records of one queue (`lane`, oldest first) go: their indexes.
fn select(
    lane: &[Past],
    history: StepHistory,
    running: &HashSet<DeploymentId>,
    now: u64,
) -> Vec<usize> {
    let Some(last) = lane.len().checked_sub(1) else {
        return Vec::new();
    };
    let max_age = history.max_age.as_secs();
    let min_keep = history.min_keep.as_secs();
    (0..last)
        .filter(|&i| {
            let p = &lane[i];
            let Some(ended) = p.ended else { return false };
            let age = now.saturating_sub(ended);
            let newer = last - i;
            let of_running = p.deployment.as_ref().is_some_and(|d| running.contains(d));
            !of_running && age >= min_keep && (age > max_age || newer >= history.per_lane)
        })
        .collect()
}

/// The deployments the store holds as running (their state alone is read).
fn running_deployments(store: &dyn Store) -> Result<HashSet<DeploymentId>, StoreError> {
    #[derive(Deserialize)]
    struct State {
        state: DeployState,
    }
    let mut running = HashSet::new();
    for_each_paged(store, Tree::Deployments, 16, |id, bytes| {
        let State { state } = decode_json(Tree::Deployments, &id, &bytes)?;
        if state == DeployState::Running {
            running.insert(DeploymentId::from(id));
        }
        Ok(())
    })?;
    Ok(running)
}

fn unix_of(rfc3339: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// One pass over the steps in `store`: removes the records `history` no
/// longer keeps (see the module's comment), as of `now`.
pub fn prune(
    store: &dyn Store,
    history: StepHistory,
    now: SystemTime,
    stop: &dyn Fn() -> bool,
) -> Result<Pruned, StoreError> {
    // Read first: a deployment started after this queues new steps only,
    // which are too young to go.
    let running = running_deployments(store)?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut done = Pruned::default();
    // The queue is the key's `node/lane/` prefix: a queue's records are
    // next to each other in key order, oldest first.
    let mut queue: Option<String> = None;
    let mut lane: Vec<Past> = Vec::new();
    let mut gone: Vec<(Tree, String)> = Vec::new();
    let judge = |lane: &mut Vec<Past>, gone: &mut Vec<(Tree, String)>| -> Result<(), StoreError> {
        for i in select(lane, history, &running, now) {
            let p = &lane[i];
            // The id index entry only if it still names this record.
            if store
                .get_json::<String>(Tree::StepIds, p.id.as_str())?
                .as_deref()
                == Some(p.key.as_str())
            {
                gone.push((Tree::StepIds, p.id.to_string()));
            }
            gone.push((Tree::Steps, p.key.clone()));
        }
        lane.clear();
        Ok(())
    };
    let mut from = String::new();
    loop {
        if stop() {
            // What was selected is gone already; the rest waits for the
            // next pass.
            break;
        }
        let page = store.scan(Tree::Steps, "", &from, PAGE)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        from = format!("{last}\u{0}");
        for (key, bytes) in page {
            let b: Brief = decode_json(Tree::Steps, &key, &bytes)?;
            done.read += 1;
            let this = key.rsplit_once('/').map_or("", |(prefix, _)| prefix);
            if queue.as_deref() != Some(this) {
                judge(&mut lane, &mut gone)?;
                queue = Some(this.to_owned());
            }
            let ended = b.state.is_final().then(|| {
                b.finished_at
                    .as_deref()
                    .and_then(unix_of)
                    .unwrap_or(b.step.issued_at)
            });
            lane.push(Past {
                key,
                id: b.step.id,
                ended,
                deployment: b.step.deployment_id,
            });
        }
        store.remove_many(&gone)?;
        done.removed += gone.iter().filter(|(t, _)| *t == Tree::Steps).count();
        gone.clear();
    }
    // The queue the pass ended in is judged only when the tree was read to
    // its end: a stopped pass saw part of it, and its newest records may be
    // the ones it did not read.
    if stop() {
        return Ok(done);
    }
    judge(&mut lane, &mut gone)?;
    store.remove_many(&gone)?;
    done.removed += gone.iter().filter(|(t, _)| *t == Tree::Steps).count();
    Ok(done)
}

/// One pass over the controller's store ([`prune`]), counted in
/// `de_step_records_pruned_total`.
pub fn pass(
    ctl: &Controller,
    history: StepHistory,
    now: SystemTime,
    stop: &dyn Fn() -> bool,
) -> Result<Pruned, StoreError> {
    let p = prune(&*ctl.store, history, now, stop)?;
    ctl.metrics.step_records_pruned.add(p.removed as u64);
    Ok(p)
}

/// Prunes the step history every [`TICK`] until `shutdown`.
pub async fn run(ctl: Arc<Controller>, history: StepHistory, shutdown: CancellationToken) {
    let mut next = tokio::time::Instant::now() + FIRST.min(history.every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = tokio::time::Instant::now() + history.every;
        let c = ctl.clone();
        let stop = shutdown.clone();
        let started = std::time::Instant::now();
        // The store is synchronous: keep it off the async workers.
        match tokio::task::spawn_blocking(move || {
            pass(&c, history, SystemTime::now(), &|| stop.is_cancelled())
        })
        .await
        {
            Ok(Ok(p)) => {
                let ms = started.elapsed().as_millis();
                if p.removed > 0 {
                    info!(
                        read = p.read,
                        removed = p.removed,
                        ms,
                        "pruned the step history"
                    );
                } else {
                    debug!(read = p.read, ms, "step history: nothing to prune");
                }
            }
            Ok(Err(e)) => {
                warn!(error = %de_common::ErrorChain(&e), "could not prune the step history; trying again later");
            }
            Err(_) => warn!("a pass over the step history panicked; trying again later"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agents::clock::ClockSkews;
    use crate::agents::steps::{DEFAULT_STEP_TTL, StepQueue, StepRecord};
    use crate::store::SledStore;
    use de_common::{Lane, NodeId, StepAction, StepEvent, StepEventKind, StepOutcome};

    fn past(i: u64, ended: Option<u64>, deployment: Option<&str>) -> Past {
        Past {
            key: format!("n1/adhoc/{i:020}"),
            id: StepId::from(format!("s-{i}")),
            ended,
            deployment: deployment.map(DeploymentId::from),
        }
    }

    const NOW: u64 = 1_000_000_000;
    const OLD: u64 = NOW - 3600;

    fn keep(per_lane: usize, days: u64) -> StepHistory {
        StepHistory {
            max_age: Duration::from_secs(days * 86_400),
            per_lane,
            ..StepHistory::default()
        }
    }

    #[test]
    fn the_newest_per_lane_are_kept_and_the_last_always() {
        let lane: Vec<Past> = (1..=5).map(|i| past(i, Some(OLD), None)).collect();
        let none = HashSet::new();
        assert_eq!(select(&lane, keep(2, 7), &none, NOW), vec![0, 1, 2]);
        assert_eq!(select(&lane, keep(5, 7), &none, NOW), Vec::<usize>::new());
        // Even a bound of 1 keeps the last: the next number follows it.
        assert_eq!(select(&lane, keep(1, 7), &none, NOW), vec![0, 1, 2, 3]);
        assert_eq!(select(&[], keep(1, 7), &none, NOW), Vec::<usize>::new());
    }

    #[test]
    fn old_steps_go_young_open_and_running_deployments_steps_stay() {
        let eight_days = NOW - 8 * 86_400;
        let lane = vec![
            past(1, Some(eight_days), None),              // too old: goes
            past(2, None, None),                          // not ended: stays
            past(3, Some(eight_days), Some("d-running")), // its deployment runs
            past(4, Some(eight_days), Some("d-ended")),   // goes
            past(5, Some(NOW - 60), None),                // ended a minute ago
            past(6, Some(eight_days), None),              // the last: stays
        ];
        let running = HashSet::from([DeploymentId::from("d-running")]);
        assert_eq!(select(&lane, keep(100, 7), &running, NOW), vec![0, 3]);
        // Beyond the count too, a young step stays.
        assert_eq!(select(&lane, keep(1, 7), &running, NOW), vec![0, 3]);
    }

    fn never() -> bool {
        false
    }

    fn script() -> StepAction {
        StepAction::Script {
            script: "echo".into(),
            user: None,
            env: vec![],
            timeout_secs: 5,
        }
    }

    fn done(r: &StepRecord) -> StepEvent {
        StepEvent {
            step_id: r.step.id.clone(),
            lane: r.step.lane,
            seq: r.step.seq,
            kind: StepEventKind::Finished(StepOutcome {
                exit_code: Some(0),
                ..Default::default()
            }),
        }
    }

    /// A step queued on `node`'s `lane` and reported done.
    async fn ended(
        q: &StepQueue,
        node: &NodeId,
        lane: Lane,
        deployment: Option<&DeploymentId>,
    ) -> StepRecord {
        let r = q
            .enqueue(node, lane, script(), deployment.cloned(), DEFAULT_STEP_TTL)
            .expect("enqueue");
        assert!(q.on_event(node, done(&r)).await.expect("event"));
        r
    }

    /// The default history, keeping `per_lane` steps per lane.
    fn keeping(per_lane: usize) -> StepHistory {
        StepHistory {
            per_lane,
            ..StepHistory::default()
        }
    }

    fn open(dir: &std::path::Path) -> (Arc<dyn Store>, StepQueue) {
        let store: Arc<dyn Store> = Arc::new(crate::testkit::reopen(|| SledStore::open(dir)));
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("gen");
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key");
        let q = StepQueue::open(store.clone(), Arc::new(key), ClockSkews::default()).expect("open");
        (store, q)
    }

    /// On a real store: what goes is gone by id and from the node's queue,
    /// what stays reads as before, and numbering goes on after the last
    /// step, also after a restart.
    #[tokio::test]
    async fn a_pass_removes_records_and_numbering_goes_on_past_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, q) = open(dir.path());
        let (n1, n2) = (NodeId::from("n1"), NodeId::from("n2"));
        let mut n1_steps = Vec::new();
        for _ in 0..5 {
            n1_steps.push(ended(&q, &n1, Lane::Adhoc, None).await);
        }
        // Still running on n1's deploy lane, of a deployment that runs;
        // and one ended step on n2.
        let deploying = q
            .enqueue(&n1, Lane::Deploy, script(), None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        let n2_step = ended(&q, &n2, Lane::Adhoc, None).await;

        // Just ended: nothing goes, whatever the bound.
        let history = keeping(2);
        let now = SystemTime::now();
        assert_eq!(
            prune(&*store, history, now, &never).expect("prune"),
            Pruned {
                read: 7,
                removed: 0
            }
        );
        // Past the minimum: n1's adhoc lane keeps its newest two.
        let later = now + MIN_KEEP + Duration::from_secs(1);
        assert_eq!(
            prune(&*store, history, later, &never).expect("prune"),
            Pruned {
                read: 7,
                removed: 3
            }
        );
        for (i, r) in n1_steps.iter().enumerate() {
            let found = q.get(&r.step.id).expect("get").map(|r| r.step.seq);
            let want = (i >= 3).then_some(r.step.seq);
            assert_eq!(found, want, "step {}", r.step.seq);
        }
        assert!(q.get(&deploying.step.id).expect("get").is_some());
        assert!(q.get(&n2_step.step.id).expect("get").is_some());
        // A second pass finds nothing more.
        assert_eq!(
            prune(&*store, history, later, &never)
                .expect("prune")
                .removed,
            0
        );
        let next = q
            .enqueue(&n1, Lane::Adhoc, script(), None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        assert_eq!(next.step.seq, 6);
        drop((q, store));

        // After a restart, keeping one step and that for a second only:
        // the last stays, and numbering goes on from it.
        let (store, q) = open(dir.path());
        let one = StepHistory {
            max_age: Duration::from_secs(1),
            per_lane: 1,
            ..StepHistory::default()
        };
        // Steps 4 and 5 go; 6, ended too, stays as the last.
        assert!(q.on_event(&n1, done(&next)).await.expect("event"));
        let after_that = later + MIN_KEEP + Duration::from_secs(1);
        assert_eq!(
            prune(&*store, one, after_that, &never)
                .expect("prune")
                .removed,
            2
        );
        assert!(q.get(&n1_steps[4].step.id).expect("get").is_none());
        assert!(q.get(&next.step.id).expect("get").is_some());
        drop((q, store));
        let (_store, q) = open(dir.path());
        let after = q
            .enqueue(&n1, Lane::Adhoc, script(), None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        assert_eq!(after.step.seq, 7);
    }

    /// A pass stopped (the controller shuts down) removes what it selected
    /// in the queues it read whole, and leaves the queue it was reading:
    /// its newest records may be the ones not read.
    #[tokio::test]
    async fn a_stopped_pass_leaves_the_queue_it_was_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, q) = open(dir.path());
        for node in ["n1", "n2"] {
            let node = NodeId::from(node);
            for _ in 0..3 {
                ended(&q, &node, Lane::Adhoc, None).await;
            }
        }
        let history = keeping(1);
        let later = SystemTime::now() + MIN_KEEP + Duration::from_secs(1);
        // Stopped after the first page (all six records here): n1's queue
        // was read whole and is pruned, n2's is left.
        let calls = std::cell::Cell::new(0);
        let after_one_page = || {
            calls.set(calls.get() + 1);
            calls.get() > 1
        };
        assert_eq!(
            prune(&*store, history, later, &after_one_page).expect("prune"),
            Pruned {
                read: 6,
                removed: 2
            }
        );
        let left = |node: &str| {
            store
                .scan(Tree::Steps, &format!("{node}/"), "", usize::MAX)
                .expect("scan")
                .len()
        };
        assert_eq!((left("n1"), left("n2")), (1, 3));
        assert_eq!(
            prune(&*store, history, later, &never)
                .expect("prune")
                .removed,
            2
        );
        assert_eq!((left("n1"), left("n2")), (1, 1));
    }

    /// Through the controller: what a pass removes is counted in
    /// `de_step_records_pruned_total`.
    #[tokio::test]
    async fn a_pass_is_counted_in_the_metrics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctl, _) = Controller::open(dir.path()).expect("open");
        let n1 = NodeId::from("n1");
        for _ in 0..3 {
            ended(&ctl.steps, &n1, Lane::Adhoc, None).await;
        }
        let history = keeping(1);
        let later = SystemTime::now() + MIN_KEEP + Duration::from_secs(1);
        assert_eq!(pass(&ctl, history, later, &never).expect("pass").removed, 2);
        let text = crate::metrics::render(&ctl);
        assert!(
            text.lines().any(|l| l == "de_step_records_pruned_total 2"),
            "{text}"
        );
    }

    /// A step of a deployment the store holds as running stays however old;
    /// once that deployment has ended, it goes.
    #[tokio::test]
    async fn a_running_deployments_steps_stay_until_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, q) = open(dir.path());
        let n1 = NodeId::from("n1");
        let d = DeploymentId::from("d-1");
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(ended(&q, &n1, Lane::Deploy, Some(&d)).await.step.id);
        }
        let put_state = |state: &str| {
            store
                .put(
                    Tree::Deployments,
                    d.as_str(),
                    format!(r#"{{"id":"d-1","state":"{state}"}}"#).as_bytes(),
                )
                .expect("put");
        };
        put_state("running");
        let history = StepHistory {
            max_age: Duration::from_secs(1),
            per_lane: 1,
            ..StepHistory::default()
        };
        let later = SystemTime::now() + Duration::from_secs(30 * 86_400);
        assert_eq!(
            prune(&*store, history, later, &never)
                .expect("prune")
                .removed,
            0
        );
        put_state("succeeded");
        assert_eq!(
            prune(&*store, history, later, &never)
                .expect("prune")
                .removed,
            2
        );
        assert!(q.get(&ids[0]).expect("get").is_none());
        assert!(q.get(&ids[2]).expect("get").is_some());
    }
}
