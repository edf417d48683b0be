//! RCU grace periods on demand, off the change path.
//!
//! A region of the slot array that a service entry stopped pointing at may still be read by a program that looked
//! the entry up just before the switch; it may be reused only once every program running at the switch has
//! finished, i.e. after an RCU grace period (lb's programs all run under `rcu_read_lock`). Userspace cannot call
//! `synchronize_rcu()`, but every successful update of a map-of-maps calls it before returning
//! (`maybe_wait_bpf_programs()`; the same fact the kernel's selftests use, `test_btf_map_in_map.c`). So a fence is
//! one update of a private one-element array-of-maps, made by a thread of its own: the reconciler quarantines freed
//! regions under the number of fences started so far and takes them back once a later fence has completed, without
//! ever waiting itself unless it runs out of room.
//!
//! Counting: `started` is how many fences have begun, `completed` the highest fence number known finished. A
//! region freed when `started == s` may be reused once `completed > s`: fence `s + 1` began after the region was
//! freed, so its grace period covers every reader of the old entry.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::map_batch;

pub struct Fence {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// The private array-of-maps and its one inner map, written back into it by every fence.
    outer: OwnedFd,
    inner: OwnedFd,
}

#[derive(Default)]
struct State {
    started: u64,
    completed: u64,
    /// Fences are wanted until `started` reaches this.
    wanted: u64,
    /// The last fence failed (the kernel refused the update): waiters get this instead of a grace period.
    failure: Option<String>,
    shutdown: bool,
}

impl Fence {
    /// Creates the private map-in-map the fences update. The thread starts with the first request.
    pub fn new() -> io::Result<Self> {
        let inner =
            map_batch::create_u32_map(map_batch::MAP_TYPE_ARRAY, 1, None, "lb_fence_inner")?;
        let outer = map_batch::create_u32_map(
            map_batch::MAP_TYPE_ARRAY_OF_MAPS,
            1,
            Some(inner.as_fd()),
            "lb_rcu_fence",
        )?;
        Ok(Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                outer,
                inner,
            }),
            thread: None,
        })
    }

    /// Fences started so far.
    pub fn started(&self) -> u64 {
        self.shared.lock().started
    }

    /// The highest fence known to have completed.
    pub fn completed(&self) -> u64 {
        self.shared.lock().completed
    }

    /// Asks for a fence that starts after now; returns at once.
    pub fn request(&mut self) -> io::Result<()> {
        self.ensure_thread()?;
        let mut state = self.shared.lock();
        state.wanted = state.wanted.max(state.started + 1);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Blocks until fence number `target` has completed, asking for it if needed.
    pub fn wait(&mut self, target: u64) -> io::Result<()> {
        self.ensure_thread()?;
        let mut state = self.shared.lock();
        state.wanted = state.wanted.max(target);
        self.shared.changed.notify_all();
        while state.completed < target {
            if let Some(failure) = state.failure.take() {
                return Err(io::Error::other(failure));
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        Ok(())
    }

    /// A grace period the caller makes itself (an update of another map-of-maps) counts as a fence: call before it
    /// and pass the number to [`Fence::external_done`] after it.
    pub fn external_begin(&self) -> u64 {
        let mut state = self.shared.lock();
        state.started += 1;
        state.started
    }

    pub fn external_done(&self, seq: u64) {
        let mut state = self.shared.lock();
        state.completed = state.completed.max(seq);
        self.shared.changed.notify_all();
    }

    fn ensure_thread(&mut self) -> io::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        self.thread = Some(
            std::thread::Builder::new()
                .name("lb-rcu-fence".into())
                .spawn(move || shared.run())?,
        );
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only counters behind, which stay meaningful.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        loop {
            let seq = {
                let mut state = self.lock();
                while !state.shutdown && state.wanted <= state.started {
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                if state.shutdown {
                    return;
                }
                state.started += 1;
                state.started
            };
            let inner = std::os::fd::AsRawFd::as_raw_fd(&self.inner) as u32;
            // Writes the same inner map back: no reader sees a change, and the call returns after
            // `synchronize_rcu()`.
            let result = map_batch::update_u32_elem(self.outer.as_fd(), 0, inner);
            let mut state = self.lock();
            match result {
                Ok(()) => state.completed = state.completed.max(seq),
                Err(e) => {
                    tracing::error!(error = %e, "an RCU fence (map-in-map update) failed");
                    state.failure = Some(format!("RCU fence (map-in-map update): {e}"));
                    // Not retried until asked again.
                    state.wanted = state.started;
                }
            }
            self.changed.notify_all();
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
