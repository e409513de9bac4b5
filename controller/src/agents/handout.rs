//! The hand-out window: at most so many steps handed out to agents and not
//! answered yet, controller-wide (`handout_window`, 50 by default).
//!
//! Why: an idle link's round-trip estimate is that of its heartbeats, about
//! a millisecond, so QUIC's probe timeout is about 27 ms. A fan-out to
//! thousands of nodes at once queues their answers in the controller for
//! longer than that, and every connection whose answer waits then sends
//! probes, and probes again after twice the time: more packets for the side
//! that is already behind. The first exec to 10,000 simulated agents after
//! enrolment moved 31 datagrams per node and took 5.5 s; with a window of
//! 200 it moved 14.8 and took 2.9 s. After three quiet minutes, a window
//! of 50 drew a seventh of the probes 200 did, and its execs took 1.7 to
//! 1.8 s against 1.9 to 3.0 s (docs/BENCHMARKS.md).
//!
//! A pull that finds a step waits for room in the window (up to the end of
//! its long-poll, then it is told `Idle` and pulls again); the room comes
//! back when the node's first event on that lane arrives (`Started`, or the
//! result, or a refusal), or after [`HANDOUT_EXPIRY`] without one, so a
//! silent or frozen node holds its place for a second at most and a
//! long-running step not at all. The window bounds steps per round trip:
//! across a WAN with 50 ms round trips, 50 is 1,000 steps a second; raise
//! it there. (A window that adapted to the answers' delay was tried and
//! not kept: on shared cores the delay does not follow the window.)
//!
//! Nothing of this is stored: after a restart the window is empty.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use de_common::{Lane, NodeId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Steps handed out and not answered, at most, by default.
pub const DEFAULT_HANDOUT_WINDOW: usize = 50;

/// How long a step handed out holds its place without an answer.
pub(crate) const HANDOUT_EXPIRY: Duration = Duration::from_secs(1);

/// The places taken, per node and lane (one step at a time runs on a
/// lane), each with the serial of its hand-out.
type Taken = HashMap<(NodeId, Lane), (u64, OwnedSemaphorePermit)>;

/// The window, shared by every pull.
#[derive(Debug)]
pub(crate) struct HandOuts {
    room: Arc<Semaphore>,
    out: Arc<Mutex<Taken>>,
    serial: AtomicU64,
}

impl HandOuts {
    pub(crate) fn new(limit: usize) -> HandOuts {
        HandOuts {
            room: Arc::new(Semaphore::new(limit.clamp(1, Semaphore::MAX_PERMITS))),
            out: Arc::default(),
            serial: AtomicU64::new(0),
        }
    }

    fn out(&self) -> MutexGuard<'_, Taken> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place in the window, waiting until `deadline` at most.
    pub(crate) async fn place(&self, deadline: tokio::time::Instant) -> Option<Place> {
        let permit = match self.room.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::time::timeout_at(deadline, self.room.clone().acquire_owned())
                .await
                .ok()?
                .ok()?,
        };
        Some(Place(permit))
    }

    /// Step of (`node`, `lane`) handed out in `place`: the place is taken
    /// until [`HandOuts::answered`] or [`HANDOUT_EXPIRY`].
    pub(crate) fn handed(&self, node: &NodeId, lane: Lane, place: Place) {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let key = (node.clone(), lane);
        // A place still held for this lane (its step expired unanswered, or
        // the agent pulls it again after a reconnect) is given back.
        self.out().insert(key.clone(), (serial, place.0));
        let out = self.out.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HANDOUT_EXPIRY).await;
            let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
            if out.get(&key).is_some_and(|(s, _)| *s == serial) {
                out.remove(&key);
            }
        });
    }

    /// `node` sent events on `lanes`: the steps handed out there are
    /// answered, and their places are free.
    pub(crate) fn answered(&self, node: &NodeId, lanes: impl IntoIterator<Item = Lane>) {
        let mut out = self.out();
        if out.is_empty() {
            return;
        }
        for lane in lanes {
            out.remove(&(node.clone(), lane));
        }
    }

    /// Places free now.
    #[cfg(test)]
    pub(crate) fn free(&self) -> usize {
        self.room.available_permits()
    }
}

/// A place in the window, not yet given to a step: dropped, it is free again.
#[derive(Debug)]
pub(crate) struct Place(OwnedSemaphorePermit);

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from(format!("node-{n}"))
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(50)
    }

    /// A step of node `n`'s `lane` handed out, in a place there is room for.
    async fn hand(h: &HandOuts, n: u8, lane: Lane) {
        let place = h.place(soon()).await.expect("room");
        h.handed(&node(n), lane, place);
    }

    #[tokio::test]
    async fn a_full_window_waits_until_an_answer_frees_a_place() {
        let h = HandOuts::new(2);
        hand(&h, 1, Lane::Adhoc).await;
        hand(&h, 2, Lane::Adhoc).await;
        assert_eq!(h.free(), 0);
        assert!(
            h.place(soon()).await.is_none(),
            "full: the pull is told Idle"
        );
        // An event on another lane of that node frees nothing.
        h.answered(&node(1), [Lane::Deploy]);
        assert!(h.place(soon()).await.is_none());
        h.answered(&node(1), [Lane::Adhoc]);
        assert_eq!(h.free(), 1);
        let c = h.place(soon()).await.expect("room again");
        drop(c);
        assert_eq!(h.free(), 1, "a place never given to a step is free again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_step_frees_its_place_after_the_expiry() {
        let h = HandOuts::new(1);
        hand(&h, 1, Lane::Adhoc).await;
        let started = tokio::time::Instant::now();
        let far = started + Duration::from_secs(10);
        let _b = h.place(far).await.expect("the expiry frees the place");
        assert!(started.elapsed() >= HANDOUT_EXPIRY);
        assert!(started.elapsed() < HANDOUT_EXPIRY * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_steps_expiry_does_not_free_the_lanes_next_hand_out() {
        let h = HandOuts::new(1);
        hand(&h, 1, Lane::Adhoc).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.answered(&node(1), [Lane::Adhoc]);
        assert_eq!(h.free(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        hand(&h, 1, Lane::Adhoc).await;
        // The first step's expiry runs at 1 s: the second (handed out at
        // 0.5 s) keeps its place until its own, at 1.5 s.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(h.free(), 0, "the first expiry freed the later hand-out");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(h.free(), 1, "its own expiry frees it");
    }

    #[tokio::test]
    async fn a_lane_handed_a_step_again_gives_back_the_place_it_held() {
        let h = HandOuts::new(2);
        hand(&h, 1, Lane::Deploy).await;
        hand(&h, 1, Lane::Deploy).await;
        assert_eq!(h.free(), 1, "one lane holds one place");
    }
}
