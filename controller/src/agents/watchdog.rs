//! The step watchdog: nothing waits for ever on a node that cannot answer.
//!
//! Every second it looks at the steps not final yet and fails, with a reason
//! naming the node, each one whose node was revoked, whose node has been
//! silent longer than the node grace (`--node-grace`), or that has been
//! running past its own budget (a script's timeout, or two minutes for the
//! other actions) plus the grace. The step queue makes the failure durable
//! and tells its waiters (deployments, exec), which decide what follows
//! (deployments retry by their policy). A result that arrives afterwards is
//! acknowledged and ignored: the step already ended.
//!
//! `judge` is pure (the step, what is known of its node, the grace and the
//! time in; a reason or nothing out) and tested without a clock.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::steps::ActiveStep;
use crate::Controller;

/// The default `--node-grace`.
pub const DEFAULT_NODE_GRACE: Duration = Duration::from_secs(60);
/// How often the watchdog looks.
const TICK: Duration = Duration::from_secs(1);

/// What the watchdog knows of a step's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeState {
    /// `n-... (10.0.0.2)`, for messages.
    pub(crate) label: String,
    pub(crate) revoked: bool,
    pub(crate) silent_for: Duration,
    /// The interval its agent sends heartbeats at: silence counts past it.
    pub(crate) heartbeat: Duration,
}

/// Why `step` must fail now, if it must.
pub(crate) fn judge(
    step: &ActiveStep,
    node: Option<&NodeState>,
    grace: Duration,
    now: Instant,
) -> Option<String> {
    let Some(node) = node else {
        return Some(format!(
            "node {} is not enrolled with this controller",
            step.node
        ));
    };
    if node.revoked {
        return Some(format!(
            "node {} was revoked: its steps cannot run",
            node.label
        ));
    }
    if node.silent_for > grace + node.heartbeat {
        return Some(format!(
            "node {} has been silent for {} s, past the node grace of {} s (--node-grace): \
             check that its agent runs and reaches the controller",
            node.label,
            node.silent_for.as_secs(),
            grace.as_secs()
        ));
    }
    let started = step.started?;
    let ran = now.saturating_duration_since(started);
    (ran > step.budget + grace).then(|| {
        format!(
            "no result from node {} {} s after the step started (its budget of {} s plus the node grace of {} s)",
            node.label,
            ran.as_secs(),
            step.budget.as_secs(),
            grace.as_secs()
        )
    })
}

/// One look: fails every step `judge` condemns. Returns how many it failed.
pub(crate) fn sweep(ctl: &Controller, grace: Duration) -> usize {
    let now = Instant::now();
    let wall = SystemTime::now();
    let mut failed = 0;
    for step in ctl.steps.active() {
        let node = ctl
            .nodes
            .watch(&step.node, wall)
            .map(|(revoked, ip, silent_for, heartbeat)| NodeState {
                label: match ip {
                    Some(ip) => format!("{} ({ip})", step.node),
                    None => step.node.to_string(),
                },
                revoked,
                silent_for,
                heartbeat,
            });
        let Some(reason) = judge(&step, node.as_ref(), grace, now) else {
            continue;
        };
        match ctl.steps.fail(&step.id, &reason) {
            Ok(_) => {
                warn!(step = %step.id, node = %step.node, %reason, "step failed by the watchdog");
                failed += 1;
            }
            Err(e) => {
                warn!(step = %step.id, error = %de_common::ErrorChain(&e), "could not fail a step; will try again")
            }
        }
    }
    failed
}

/// Runs the watchdog until `shutdown`.
pub async fn run(ctl: Arc<Controller>, grace: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ctl2 = ctl.clone();
        // The store is synchronous: keep it off the async workers.
        if tokio::task::spawn_blocking(move || sweep(&ctl2, grace))
            .await
            .is_err()
        {
            warn!("the step watchdog's sweep panicked; it runs again next tick");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn step(started_secs_ago: Option<u64>, budget: u64, now: Instant) -> ActiveStep {
        ActiveStep {
            id: "s-1".into(),
            node: "n-1".into(),
            lane: de_common::Lane::Deploy,
            started: started_secs_ago.map(|s| now - Duration::from_secs(s)),
            budget: Duration::from_secs(budget),
            fetch: None,
        }
    }

    fn node(revoked: bool, silent: u64) -> NodeState {
        NodeState {
            label: "n-1 (10.0.0.2)".into(),
            revoked,
            silent_for: Duration::from_secs(silent),
            heartbeat: Duration::ZERO,
        }
    }

    #[test]
    fn a_live_node_keeps_its_steps_until_their_budget_and_grace_pass() {
        let now = Instant::now() + Duration::from_secs(1000);
        assert_eq!(
            judge(&step(None, 60, now), Some(&node(false, 2)), GRACE, now),
            None
        );
        assert_eq!(
            judge(&step(Some(69), 60, now), Some(&node(false, 2)), GRACE, now),
            None
        );
        let why =
            judge(&step(Some(71), 60, now), Some(&node(false, 2)), GRACE, now).expect("overdue");
        assert!(
            why.contains("n-1 (10.0.0.2)") && why.contains("71 s"),
            "{why}"
        );
    }

    #[test]
    fn a_silent_node_fails_queued_and_running_steps_naming_it() {
        let now = Instant::now() + Duration::from_secs(1000);
        assert_eq!(
            judge(&step(Some(1), 60, now), Some(&node(false, 10)), GRACE, now),
            None
        );
        for s in [step(None, 60, now), step(Some(1), 60, now)] {
            let why = judge(&s, Some(&node(false, 11)), GRACE, now).expect("silent");
            assert!(
                why.contains("n-1 (10.0.0.2)")
                    && why.contains("silent for 11 s")
                    && why.contains("--node-grace"),
                "{why}"
            );
        }
    }

    #[test]
    fn silence_counts_past_the_nodes_own_heartbeat_interval() {
        let now = Instant::now() + Duration::from_secs(1000);
        let slow = NodeState {
            heartbeat: Duration::from_secs(120),
            ..node(false, 100)
        };
        assert_eq!(
            judge(&step(Some(1), 600, now), Some(&slow), GRACE, now),
            None
        );
        let gone = NodeState {
            silent_for: Duration::from_secs(131),
            ..slow
        };
        assert!(judge(&step(Some(1), 600, now), Some(&gone), GRACE, now).is_some());
    }

    #[test]
    fn a_revoked_or_unknown_node_fails_its_steps_at_once() {
        let now = Instant::now();
        let why = judge(&step(None, 60, now), Some(&node(true, 0)), GRACE, now).expect("revoked");
        assert!(why.contains("revoked") && why.contains("n-1"), "{why}");
        let why = judge(&step(None, 60, now), None, GRACE, now).expect("unknown");
        assert!(why.contains("not enrolled"), "{why}");
    }
}
