//! How the watches are doing, for the log, the metrics and `lb-agent status`: per resource whether it has been
//! listed, its last event, its failures in a row and the last error; and the changes waiting for a sync. Shared
//! between the watcher tasks (writers) and the ops thread (reader).
//!
//! Also the retry policy of a failing watch ([`Backoff`]): client-go's reflector backoff (800 ms, doubling, at most
//! 30 s, jittered). kube-runtime's `default_backoff()` has the same numbers but never grows here: its watcher
//! emits `Event::Init` before every list attempt, and that `Ok` resets the backoff, so an unreachable API server
//! was retried every 0.8-1.6 s for ever. Here only progress (an object, a completed list) resets it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::tracker::Kind;

/// First retry delay, as client-go's reflector.
const INITIAL: Duration = Duration::from_millis(800);
/// Longest retry delay (client-go's reflectors cap at 30 s).
const CAP: Duration = Duration::from_secs(30);
/// A watch failing for this long without a warning gets one, so a long outage stays visible in the log.
const HEARTBEAT: Duration = Duration::from_secs(300);

/// Exponential backoff with jitter: 0.8 s, 1.6 s, 3.2 s, ... up to 30 s, each stretched by up to half again (so
/// watchers failing together spread out), never above the cap.
#[derive(Debug)]
pub struct Backoff {
    failures: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(seed: u64) -> Self {
        Backoff {
            failures: 0,
            seed: seed | 1,
        }
    }

    /// The delay before the next attempt after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let base = INITIAL.saturating_mul(1u32 << self.failures.min(16));
        self.failures = self.failures.saturating_add(1);
        // xorshift64: jitter needs no quality, only to differ between watchers.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let stretch = (self.seed % 1000) as f64 / 2000.0;
        base.mul_f64(1.0 + stretch).min(CAP)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// One watch as `lb-agent status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchState {
    /// `Service`, `EndpointSlice`, `Node`, `ServiceCIDR`.
    pub resource: String,
    /// A list has completed at least once.
    pub listed: bool,
    /// Unix time (ms) of the last event (object or completed list); 0: none yet.
    pub last_event_unix_ms: u64,
    /// Failed attempts since the last progress; 0 while the watch works.
    pub failures_in_a_row: u32,
    /// Every failure since the agent started.
    pub errors_total: u64,
    /// The last failure's message (with its causes), and when it happened (Unix ms).
    pub last_error: Option<String>,
    pub last_error_unix_ms: u64,
    /// The delay before the retry in progress, while failing.
    pub retry_in_ms: u64,
    /// When the last failure was logged as a warning (Unix ms), for the heartbeat.
    #[serde(skip)]
    pub last_warned_unix_ms: u64,
}

/// The source's state as one value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// The API server's URL.
    pub server: String,
    pub watches: Vec<WatchState>,
    /// Objects changed since the last sync, not yet programmed.
    pub pending_services: usize,
    pub pending_endpoint_slices: usize,
}

/// What a failure means for the log: the first, every doubling of the count, a changed error, or the first after
/// [`HEARTBEAT`] without one get a warning; the repeats in between are debug lines (the status and the metrics
/// count every one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    Warn,
    Quiet,
}

/// The watches' shared state.
#[derive(Debug)]
pub struct WatchHealth {
    server: String,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    watches: BTreeMap<Kind, WatchState>,
    pending_services: usize,
    pending_endpoint_slices: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl WatchHealth {
    pub fn new(server: impl Into<String>) -> Self {
        WatchHealth {
            server: server.into(),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn with<T>(&self, kind: Kind, f: impl FnOnce(&mut WatchState) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = inner.watches.entry(kind).or_insert_with(|| WatchState {
            resource: kind.to_string(),
            ..WatchState::default()
        });
        f(state)
    }

    /// Registers a watch before its first event, so the status lists it from the start.
    pub fn register(&self, kind: Kind) {
        self.with(kind, |_| ());
    }

    /// The watch made progress (an object, or a completed list). Returns how many failures in a row it ended.
    pub fn progress(&self, kind: Kind, list_done: bool) -> u32 {
        self.with(kind, |w| {
            w.last_event_unix_ms = now_ms();
            w.listed |= list_done;
            w.retry_in_ms = 0;
            std::mem::take(&mut w.failures_in_a_row)
        })
    }

    /// The watch failed and will retry after `retry_in`: the failure count, and whether to warn about it.
    pub fn failed(&self, kind: Kind, error: &str, retry_in: Duration) -> (u32, Report) {
        self.with(kind, |w| {
            w.failures_in_a_row = w.failures_in_a_row.saturating_add(1);
            w.errors_total += 1;
            let changed = w.last_error.as_deref() != Some(error);
            let now = now_ms();
            w.last_error = Some(error.to_owned());
            w.last_error_unix_ms = now;
            w.retry_in_ms = retry_in.as_millis() as u64;
            let n = w.failures_in_a_row;
            let silent_for = now.saturating_sub(w.last_warned_unix_ms);
            let report =
                if changed || n.is_power_of_two() || silent_for >= HEARTBEAT.as_millis() as u64 {
                    w.last_warned_unix_ms = now;
                    Report::Warn
                } else {
                    Report::Quiet
                };
            (n, report)
        })
    }

    pub fn set_pending(&self, services: usize, endpoint_slices: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pending_services = services;
        inner.pending_endpoint_slices = endpoint_slices;
    }

    pub fn state(&self) -> SourceState {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        SourceState {
            server: self.server.clone(),
            watches: inner.watches.values().cloned().collect(),
            pending_services: inner.pending_services,
            pending_endpoint_slices: inner.pending_endpoint_slices,
        }
    }
}

/// An error with its causes, `outer: inner: root`: kube-rs's own message for an unreachable server is only
/// "ServiceError: client error (Connect)", the reason ("Connection refused") is two sources down.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_to_thirty_seconds_and_resets() {
        let mut b = Backoff::new(7);
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let base = INITIAL.saturating_mul(1 << i).min(CAP);
            assert!(
                *d >= base.min(CAP) && *d <= CAP && *d <= base.mul_f64(1.5),
                "attempt {i}: {d:?} (base {base:?})"
            );
        }
        assert_eq!(delays[9], CAP, "capped: {delays:?}");
        // In the first minute of an outage: a handful of attempts, not one every second.
        let mut elapsed = Duration::ZERO;
        let mut b = Backoff::new(1);
        let mut attempts = 0;
        while elapsed < Duration::from_secs(60) {
            elapsed += b.next_delay();
            attempts += 1;
        }
        assert!(
            (5..=7).contains(&attempts),
            "{attempts} attempts in a minute"
        );
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(1300));
    }

    #[test]
    fn failures_warn_at_first_on_doubling_and_on_a_new_error_and_progress_ends_them() {
        let h = WatchHealth::new("https://10.0.0.1:6443");
        h.register(Kind::Service);
        let reports: Vec<Report> = (0..5)
            .map(|_| h.failed(Kind::Service, "refused", Duration::from_secs(1)).1)
            .collect();
        use Report::*;
        assert_eq!(reports, [Warn, Warn, Quiet, Warn, Quiet]);
        assert_eq!(h.failed(Kind::Service, "timed out", CAP), (6, Warn));
        let state = h.state();
        assert_eq!(state.watches.len(), 1);
        assert_eq!(state.watches[0].failures_in_a_row, 6);
        assert_eq!(state.watches[0].last_error.as_deref(), Some("timed out"));
        assert_eq!(h.progress(Kind::Service, true), 6);
        let w = &h.state().watches[0];
        assert!(
            w.listed && w.failures_in_a_row == 0 && w.errors_total == 6,
            "{w:?}"
        );
    }

    #[test]
    fn the_error_chain_names_the_root_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            error_chain(&e),
            "client error (Connect): connection refused"
        );
    }
}
