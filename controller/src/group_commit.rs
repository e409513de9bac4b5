//! Group commit for the store: writers apply their changes, then wait until
//! one flush on the flusher thread has covered them; every writer waiting
//! at that moment shares that flush instead of paying for one each.
//!
//! Invariant: a waiter for [`Written`] `g` is told `Ok` only after a flush
//! that started after write `g` was applied returned `Ok`, so what it wrote
//! is on disk. The flush runs on its own thread: neither the tokio runtime's
//! threads nor any lock of the caller is held while the disk works.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tokio::sync::watch;

/// Where a write stands in the store's order: durable once a flush has
/// reached it. Marks only grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a write is durable only once its mark is synced"]
pub struct Written(u64);

/// How far the flushes have come: every write up to `flushed` is on disk;
/// the writes after it up to `failed_through` were in a flush that failed.
#[derive(Debug, Clone, Default)]
struct Progress {
    flushed: u64,
    failed_through: u64,
    error: Option<Arc<sled::Error>>,
}

impl Progress {
    /// The answer for a waiter on `g`, once there is one.
    fn outcome(&self, g: u64) -> Option<Result<(), Arc<sled::Error>>> {
        if self.flushed >= g {
            Some(Ok(()))
        } else if self.failed_through >= g {
            Some(Err(self.error.clone().unwrap_or_else(|| {
                Arc::new(sled::Error::ReportableBug("flush failed".into()))
            })))
        } else {
            None
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The highest mark a waiter asked to be flushed.
    requested: u64,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    /// The last mark handed out; a write takes its mark after it is applied.
    applied: AtomicU64,
    state: Mutex<State>,
    /// Wakes the flusher thread.
    work: Condvar,
    /// Wakes blocked waiters after every flush.
    done: Condvar,
    progress: watch::Sender<Progress>,
    /// Flushes made (for tests and the figures).
    flushes: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(&self, g: u64) {
        let mut state = self.state();
        if state.requested < g {
            state.requested = g;
            self.work.notify_one();
        }
    }
}

/// The flusher thread and the marks of the writes it makes durable.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the flusher thread; `flush` makes every write applied before
    /// the call durable.
    pub(crate) fn start(
        mut flush: impl FnMut() -> Result<(), sled::Error> + Send + 'static,
    ) -> std::io::Result<GroupCommit> {
        let (progress, _) = watch::channel(Progress::default());
        let shared = Arc::new(Shared {
            applied: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            progress,
            flushes: AtomicU64::new(0),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn(move || {
                loop {
                    {
                        let mut state = s.state();
                        loop {
                            let reached = {
                                let p = s.progress.borrow();
                                p.flushed.max(p.failed_through)
                            };
                            if state.requested > reached {
                                break;
                            }
                            if state.stop {
                                return;
                            }
                            state = s.work.wait(state).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    // Every mark up to here belongs to a write already applied.
                    let target = s.applied.load(Ordering::SeqCst);
                    let result = flush();
                    s.flushes.fetch_add(1, Ordering::Relaxed);
                    // Under the state lock, so a blocked waiter cannot miss the wake-up.
                    let _state = s.state();
                    s.progress.send_modify(|p| match result {
                        Ok(()) => p.flushed = p.flushed.max(target),
                        Err(e) => {
                            p.failed_through = p.failed_through.max(target);
                            p.error = Some(Arc::new(e));
                        }
                    });
                    s.done.notify_all();
                }
            })?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks a write that was just applied (call it after the engine took
    /// the write, never before).
    pub(crate) fn applied(&self) -> Written {
        Written(self.shared.applied.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// The mark of every write applied so far.
    pub(crate) fn mark(&self) -> Written {
        Written(self.shared.applied.load(Ordering::SeqCst))
    }

    /// Blocks until `w` is on disk.
    pub(crate) fn sync(&self, w: Written) -> Result<(), Arc<sled::Error>> {
        if let Some(out) = self.shared.progress.borrow().outcome(w.0) {
            return out;
        }
        self.shared.request(w.0);
        let mut state = self.shared.state();
        loop {
            if let Some(out) = self.shared.progress.borrow().outcome(w.0) {
                return out;
            }
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits, without holding a thread, until `w` is on disk.
    pub(crate) async fn synced(&self, w: Written) -> Result<(), Arc<sled::Error>> {
        let mut rx = self.shared.progress.subscribe();
        if let Some(out) = rx.borrow_and_update().outcome(w.0) {
            return out;
        }
        self.shared.request(w.0);
        match rx.wait_for(|p| p.outcome(w.0).is_some()).await {
            Ok(p) => p.outcome(w.0).unwrap_or(Ok(())),
            // The sender lives as long as `self`.
            Err(_) => Err(Arc::new(sled::Error::ReportableBug(
                "the store's flusher is gone".into(),
            ))),
        }
    }

    /// How many flushes the flusher thread made.
    #[cfg(test)]
    pub(crate) fn flushes(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }
}

impl Drop for GroupCommit {
    /// Flushes what was asked for, then stops the thread (which lets go of
    /// the engine).
    fn drop(&mut self) {
        {
            let mut state = self.shared.state();
            state.stop = true;
            self.shared.work.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn concurrent_writers_share_flushes_and_each_waits_for_its_own() {
        let slow = Arc::new(AtomicBool::new(true));
        let flushed = Arc::new(AtomicU64::new(0));
        let (s, f) = (slow.clone(), flushed.clone());
        let gc = Arc::new(
            GroupCommit::start(move || {
                if s.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                f.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .expect("start"),
        );
        let writers: Vec<_> = (0..32)
            .map(|_| {
                let gc = gc.clone();
                let flushed = flushed.clone();
                std::thread::spawn(move || {
                    let w = gc.applied();
                    gc.sync(w).expect("synced");
                    // A flush covering this write ended before the answer.
                    assert!(flushed.load(Ordering::SeqCst) >= 1);
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        assert!(
            gc.flushes() < 32,
            "32 writers took {} flushes",
            gc.flushes()
        );
        // Nothing new: nothing to flush.
        let before = gc.flushes();
        gc.sync(gc.mark()).expect("synced");
        assert_eq!(gc.flushes(), before);
    }

    #[tokio::test]
    async fn an_async_waiter_hears_of_a_failed_flush_and_a_later_one_succeeds() {
        let fail = Arc::new(AtomicBool::new(true));
        let f = fail.clone();
        let gc = GroupCommit::start(move || {
            if f.load(Ordering::SeqCst) {
                Err(sled::Error::Unsupported("disk full".into()))
            } else {
                Ok(())
            }
        })
        .expect("start");
        let w = gc.applied();
        let err = gc.synced(w).await.expect_err("the flush failed");
        assert!(err.to_string().contains("disk full"), "{err}");
        fail.store(false, Ordering::SeqCst);
        let w = gc.applied();
        gc.synced(w).await.expect("flushed");
        gc.sync(w).expect("flushed");
    }
}
