//! Clock skew between a node and the controller: what the agent reports
//! (`AgentMsg::Clock`) turned into seconds, and how far off a clock may be
//! before either side warns.
//!
//! Step expiry (`Step::not_after`) is checked by the agent with its own
//! clock, so the controller issues each step with the node's measured skew
//! added to `not_after` (see `StepQueue::enqueue_many`): a step then lives
//! its full TTL on a node whose clock is fast or slow.

use std::time::SystemTime;

/// A clock this many seconds off the controller's is warned about (the
/// controller's log; the agent's log). Steps allow for any skew; this is
/// about fixing the node's clock (NTP), which TLS and logs depend on too.
pub const CLOCK_SKEW_WARN_SECS: i64 = 5;

/// Milliseconds since the Unix epoch (0 for a clock before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How far the node's clock is ahead of the controller's (negative: behind),
/// in whole seconds rounded to the nearest, from the two clocks read at (about)
/// the same moment.
pub fn skew_secs(node_unix_ms: u64, controller_unix_ms: u64) -> i64 {
    let ms = i128::from(node_unix_ms) - i128::from(controller_unix_ms);
    let secs = (ms + if ms < 0 { -500 } else { 500 }) / 1000;
    i64::try_from(secs).unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX })
}

/// `now_unix + ttl_secs` read on a clock `skew_secs` ahead of this one:
/// the `not_after` that gives a step its full TTL on that node. Never
/// below 0 nor past `u64::MAX`.
pub fn deadline_on_node(now_unix: u64, ttl_secs: u64, skew_secs: i64) -> u64 {
    let t = i128::from(now_unix) + i128::from(ttl_secs) + i128::from(skew_secs);
    u64::try_from(t.max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_is_the_nodes_clock_minus_the_controllers_rounded_to_seconds() {
        assert_eq!(skew_secs(1_075_000, 1_000_000), 75);
        assert_eq!(skew_secs(1_000_000, 1_075_000), -75);
        assert_eq!(skew_secs(1_000_499, 1_000_000), 0);
        assert_eq!(skew_secs(1_000_500, 1_000_000), 1);
        assert_eq!(skew_secs(999_400, 1_000_000), -1);
        assert_eq!(skew_secs(u64::MAX, 0), (u64::MAX / 1000 + 1) as i64);
        assert_eq!(skew_secs(0, u64::MAX), -((u64::MAX / 1000 + 1) as i64));
    }

    /// The case: a node 75 s fast refused every default exec
    /// (timeout 60 s + 15 s grace). With the skew added, the step is good
    /// on the node for its whole TTL and expired just after, as on a node
    /// with the controller's time.
    #[test]
    fn a_deadline_on_a_skewed_node_gives_the_step_its_whole_ttl() {
        let (now, ttl) = (1_000_000, 75);
        for skew in [75, -75, 0, 3600, -3600] {
            let not_after = deadline_on_node(now, ttl, skew);
            let node_now = |controller_now: u64| controller_now.saturating_add_signed(skew);
            // The agent refuses when its now > not_after.
            assert!(node_now(now) <= not_after, "{skew}");
            assert!(node_now(now + ttl) <= not_after, "{skew}");
            assert!(node_now(now + ttl + 1) > not_after, "{skew}");
        }
        assert!(now + 75 < deadline_on_node(now, 0, 75 + 1));
        assert_eq!(deadline_on_node(10, 5, -100), 0);
        assert_eq!(deadline_on_node(u64::MAX, 5, 100), u64::MAX);
    }
}
