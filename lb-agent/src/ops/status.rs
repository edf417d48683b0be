//! What a running agent tells `lb-agent status`: what it runs (cgroup, devices and attach modes, kernel features),
//! where its objects come from and how that source is doing, its last sync, and the problems it knows of. The
//! CLI adds what the pins hold (links, map fill), which it reads itself, so the status works without an agent too.
//!
//! Served as JSON on an abstract Unix socket named after the pin directory ([`socket_name`]): no file to create
//! (the agent's root filesystem is read-only in the DaemonSet), one agent per pin directory as there is one per
//! node, reachable from the agent's network namespace (the host's, or `kubectl exec` into its pod), and only by
//! root or the agent's own user (checked with `SO_PEERCRED`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::health::HealthState;
use super::metrics::BuildInfo;
use crate::source::kube::watch_health::{SourceState, WatchHealth};

/// The abstract socket address (without the leading NUL) of the agent pinning into `pins`.
pub fn socket_name(pins: &Path) -> String {
    let dir = pins.to_string_lossy();
    // sun_path holds 107 bytes after the NUL; long pin paths are hashed (FNV-1a) rather than cut.
    if dir.len() <= 90 {
        return format!("lb-agent:{dir}");
    }
    let hash = dir.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("lb-agent:{hash:016x}")
}

/// The path the status is served under.
pub const STATUS_PATH: &str = "/status";

/// One external device and how the programs sit on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSetup {
    pub name: String,
    /// `tcx` or `clsact`.
    pub tc: String,
    /// `native` or `generic`; `None` without `--xdp`.
    pub xdp: Option<String>,
}

/// What the agent attached, as it attached it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathSetup {
    pub pins: String,
    /// The running kernel's release.
    pub kernel: String,
    /// The cgroup v2 directory the socket-LB programs are attached to.
    pub cgroup: String,
    pub devices: Vec<DeviceSetup>,
    /// Kernel features the agent uses on this node (attach kinds, map batch operations, netns cookies, ...).
    pub features: Vec<String>,
}

/// Where the objects come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReport {
    /// `kubernetes` or `manifests`.
    pub kind: String,
    /// The API server's URL (and how it was found), or the manifest path.
    pub location: String,
    /// The watches and pending changes (the kube source only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub api: Option<SourceState>,
}

/// The syncs so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncSummary {
    pub syncs: u64,
    /// Unix time (ms) the last sync finished; 0: none yet.
    pub last_unix_ms: u64,
    pub last_duration_ms: f64,
    /// The last sync visited every frontend (not only the changed ones).
    pub last_full: bool,
    /// Frontends whose entry the last sync changed.
    pub last_changed_frontends: usize,
    /// Unix time (ms) of the last sync that programmed every frontend; 0: none yet.
    pub last_ok_unix_ms: u64,
    pub services: usize,
    pub frontends: usize,
    pub frontends_failed: usize,
    pub backends: usize,
    pub skipped_objects: usize,
}

/// A running agent's answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub build: BuildInfo,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub node: String,
    pub ready: bool,
    pub healthy: bool,
    pub service_metrics: String,
    pub datapath: DatapathSetup,
    pub source: SourceReport,
    pub sync: SyncSummary,
    /// What needs a human, one sentence each.
    pub problems: Vec<String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The live report, kept by the run loop (through `Ops`) and read by the status server.
#[derive(Debug)]
pub struct StatusBoard {
    report: Mutex<AgentReport>,
    watches: Option<Arc<WatchHealth>>,
    health: Arc<HealthState>,
}

impl StatusBoard {
    pub fn new(
        base: AgentReport,
        watches: Option<Arc<WatchHealth>>,
        health: Arc<HealthState>,
    ) -> Self {
        StatusBoard {
            report: Mutex::new(base),
            watches,
            health,
        }
    }

    pub fn update(&self, f: impl FnOnce(&mut AgentReport)) {
        let mut r = self.report.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut r);
    }

    /// The report as of now, with the problems the agent knows of.
    pub fn report(&self) -> AgentReport {
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        r.ready = self.health.is_ready();
        r.healthy = self.health.is_healthy();
        r.source.api = self.watches.as_ref().map(|w| w.state());
        r.problems = problems(&r);
        r
    }
}

/// The agent's own view of what is wrong (the CLI adds what the pins show).
pub fn problems(r: &AgentReport) -> Vec<String> {
    let mut out = Vec::new();
    if !r.healthy {
        out.push(
            "a sync has been running for over two minutes: the agent's loop is stuck (/healthz fails, kubelet \
             restarts it)"
                .to_owned(),
        );
    }
    if let Some(api) = &r.source.api {
        for w in &api.watches {
            if w.failures_in_a_row > 0 {
                out.push(format!(
                    "watching {}s at {} fails ({} attempts in a row, next in {:.1}s): {}",
                    w.resource,
                    api.server,
                    w.failures_in_a_row,
                    w.retry_in_ms as f64 / 1000.0,
                    w.last_error.as_deref().unwrap_or("unknown error")
                ));
            }
        }
        let unlisted: Vec<&str> = api
            .watches
            .iter()
            .filter(|w| !w.listed && w.resource != "ServiceCIDR")
            .map(|w| w.resource.as_str())
            .collect();
        if !r.ready && !unlisted.is_empty() {
            out.push(format!(
                "not ready: nothing is programmed before the first list of {}",
                unlisted.join(", ")
            ));
        }
    } else if !r.ready {
        out.push("not ready: the first sync has not finished".to_owned());
    }
    if r.sync.frontends_failed > 0 {
        out.push(format!(
            "{} frontends are not programmed (map capacity or map errors; the log names them, raise \
             --max-services / --max-backends if full)",
            r.sync.frontends_failed
        ));
    }
    if r.sync.skipped_objects > 0 {
        out.push(format!(
            "{} objects or parts of objects are skipped as invalid or conflicting (the log's InvalidObject \
             warnings name them)",
            r.sync.skipped_objects
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kube::watch_health::WatchState;

    #[test]
    fn socket_names_follow_the_pin_directory_and_fit() {
        assert_eq!(
            socket_name(Path::new("/sys/fs/bpf/lb")),
            "lb-agent:/sys/fs/bpf/lb"
        );
        let long = format!("/sys/fs/bpf/{}", "x".repeat(200));
        let name = socket_name(Path::new(&long));
        assert!(name.len() < 107, "{name}");
        assert_ne!(name, socket_name(Path::new(&format!("{long}y"))));
    }

    #[test]
    fn problems_name_the_failing_watch_and_its_server() {
        let mut r = AgentReport {
            healthy: true,
            source: SourceReport {
                kind: "kubernetes".into(),
                location: "https://10.0.0.1:6443/".into(),
                api: Some(SourceState {
                    server: "https://10.0.0.1:6443/".into(),
                    watches: vec![WatchState {
                        resource: "Service".into(),
                        failures_in_a_row: 3,
                        last_error: Some("connection refused".into()),
                        retry_in_ms: 3200,
                        ..WatchState::default()
                    }],
                    ..SourceState::default()
                }),
            },
            ..AgentReport::default()
        };
        r.sync.frontends_failed = 2;
        let p = problems(&r);
        assert!(
            p.iter().any(|l| l
                .contains("watching Services at https://10.0.0.1:6443/ fails (3 attempts")
                && l.contains("connection refused")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("before the first list of Service")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("2 frontends are not programmed")),
            "{p:?}"
        );
        r.ready = true;
        r.sync.frontends_failed = 0;
        if let Some(api) = &mut r.source.api {
            api.watches[0].failures_in_a_row = 0;
        }
        assert_eq!(problems(&r), Vec::<String>::new());
    }
}
