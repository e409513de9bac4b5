//! Each node's clock skew as its agent last reported it (`AgentMsg::Clock`):
//! shown on the node (`NodeView::clock_skew_secs`), added to the `not_after`
//! of the steps issued to it (so an agent that checks expiry with a fast or
//! slow clock still gives a step its whole TTL), and warned about in the log
//! when it is large.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use de_common::{CLOCK_SKEW_WARN_SECS, NodeId};

/// The last skew (node's clock minus the controller's, seconds) of every
/// node that reported one since this controller started; shared by `Nodes`
/// (to show it) and `StepQueue` (to issue steps with it). In memory only:
/// an agent reports again as soon as it links.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClockSkews(Arc<Mutex<HashMap<NodeId, i64>>>);

impl ClockSkews {
    pub(crate) fn record(&self, node: &NodeId, skew_secs: i64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), skew_secs);
    }

    pub(crate) fn of(&self, node: &NodeId) -> Option<i64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }
}

/// What the log should say about a node's newest skew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockNote {
    /// Off by at least [`CLOCK_SKEW_WARN_SECS`]: new on this link, or moved
    /// that much since the last warning.
    Skewed(i64),
    /// Back within the bound after a warning.
    Fixed(i64),
}

/// One link's memory of what it warned, so a skewed node is warned about
/// once per link (and again when its clock moves), not at every heartbeat.
#[derive(Debug, Default)]
pub(crate) struct ClockWatch {
    warned: Option<i64>,
}

impl ClockWatch {
    pub(crate) fn observe(&mut self, skew_secs: i64) -> Option<ClockNote> {
        let far = skew_secs.unsigned_abs() >= CLOCK_SKEW_WARN_SECS.unsigned_abs();
        match (far, self.warned) {
            (true, Some(w)) if skew_secs.abs_diff(w) < CLOCK_SKEW_WARN_SECS.unsigned_abs() => None,
            (true, _) => {
                self.warned = Some(skew_secs);
                Some(ClockNote::Skewed(skew_secs))
            }
            (false, Some(_)) => {
                self.warned = None;
                Some(ClockNote::Fixed(skew_secs))
            }
            (false, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skewed_clock_is_warned_once_again_when_it_moves_and_when_fixed() {
        let mut w = ClockWatch::default();
        let notes: Vec<Option<ClockNote>> = [0, 1, -4, 75, 75, 76, 79, 80, 2, 2, -6, -6]
            .into_iter()
            .map(|s| w.observe(s))
            .collect();
        assert_eq!(
            notes,
            [
                None,
                None,
                None,
                Some(ClockNote::Skewed(75)),
                None,
                None,
                None,
                Some(ClockNote::Skewed(80)),
                Some(ClockNote::Fixed(2)),
                None,
                Some(ClockNote::Skewed(-6)),
                None,
            ]
        );
    }

    #[test]
    fn the_last_reported_skew_of_each_node_is_kept() {
        let skews = ClockSkews::default();
        let shared = skews.clone();
        assert_eq!(skews.of(&"n-1".into()), None);
        shared.record(&"n-1".into(), 75);
        shared.record(&"n-1".into(), 74);
        shared.record(&"n-2".into(), -3);
        assert_eq!(skews.of(&"n-1".into()), Some(74));
        assert_eq!(skews.of(&"n-2".into()), Some(-3));
    }
}
