//! Operating the agent: health and readiness, the `healthCheckNodePort` servers, Prometheus metrics, the status
//! `lb-agent status` reads, the config file and its reload. The agent's run loop (`crate::agent`) calls [`Ops`] at
//! a few points (start, what it attached, each change seen, each sync, ready, reload); everything else lives here.
//! Ops reads the maps (for the metrics) and never writes them.
//!
//! The servers run on their own thread and runtime, so probes, scrapes and status requests are answered while a
//! long sync blocks the run loop (which is what `/healthz` must detect, not suffer from).

pub mod config;
pub mod health;
pub mod http;
pub mod kube_proxy_config;
pub mod metrics;
pub mod status;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crate::datapath::reconcile::SyncReport;
use crate::model::{ChangeCounts, Diagnostic, Translation};
use crate::source::kube::api_metrics::ApiMetrics;
use crate::source::kube::watch_health::WatchHealth;
use health::{HealthState, ServiceHealthServers};
use metrics::{Metrics, MetricsSources, PinnedCounters, ServiceMetrics};
use status::{AgentReport, DatapathSetup, StatusBoard};

/// Where the operational servers listen (`lb-agent run`'s `--health-addr`, `--metrics-addr` and
/// `--health-check-node-port-addresses`).
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// `/healthz` and `/readyz`.
    pub health_addr: SocketAddr,
    /// `/metrics`.
    pub metrics_addr: SocketAddr,
    /// Where the `healthCheckNodePort` servers listen.
    pub health_check_node_port_addresses: Vec<IpAddr>,
    /// Per-Service and per-backend detail of the datapath metrics.
    pub service_metrics: ServiceMetrics,
}

/// What the operational side reads besides the maps: the API client's counters and the watches (the kube source
/// only), and the fixed part of the status (build, node, source).
pub struct OpsInputs {
    pub api: Arc<ApiMetrics>,
    pub watches: Option<Arc<WatchHealth>>,
    pub report: AgentReport,
}

/// One finished sync, as the run loop saw it.
pub struct SyncDone<'a> {
    pub translation: &'a Translation,
    pub report: &'a SyncReport,
    /// Backends the maps hold after it.
    pub backends: usize,
    /// Services with a frontend in the desired state.
    pub services: usize,
    pub started: Instant,
    /// Every frontend was visited, not only the changed ones.
    pub full: bool,
    /// Frontends whose entry changed.
    pub changed: usize,
    /// The translator's running count of object changes.
    pub changes: ChangeCounts,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of the EndpointSlices this sync programmed.
    pub trigger_times: &'a [SystemTime],
}

/// The agent's operational side, owned by the run loop.
pub struct Ops {
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
    service_health: ServiceHealthServers,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    config: Option<config::ConfigFile>,
    status: Arc<StatusBoard>,
    /// The change counts at the previous sync.
    counted: ChangeCounts,
    _runtime: std::thread::JoinHandle<()>,
}

impl Ops {
    /// Binds the health and metrics listeners (a taken port fails the start, as it does kube-proxy's) and the
    /// status socket, and serves them on a thread of their own.
    pub fn start(args: &OpsConfig, pins: &Path, inputs: OpsInputs) -> anyhow::Result<Ops> {
        let health = Arc::new(HealthState::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the ops runtime")?;
        let handle = rt.handle().clone();
        let mut runtimes = vec![handle.clone()];
        runtimes.extend(tokio::runtime::Handle::try_current().ok());
        let build = inputs.report.build.clone();
        let metrics = Arc::new(Metrics::new(MetricsSources {
            counters: PinnedCounters {
                dir: pins.to_path_buf(),
            },
            service_metrics: args.service_metrics,
            api: inputs.api,
            watches: inputs.watches.clone(),
            runtimes,
            build,
        }));
        let status = Arc::new(StatusBoard::new(
            inputs.report,
            inputs.watches,
            health.clone(),
        ));
        let bind = |addr: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the {what} address {addr}"))?;
            l.set_nonblocking(true)?;
            tracing::info!(addr = %l.local_addr()?, "{what} server listening");
            Ok(l)
        };
        let health_listener = bind(args.health_addr, "health")?;
        let metrics_listener = bind(args.metrics_addr, "metrics")?;
        let status_listener = bind_status(pins);
        let (h, m, st) = (health.clone(), metrics.clone(), status.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("lb-ops".into())
            .spawn(move || {
                rt.block_on(async move {
                    let probes = m.clone();
                    let health_handler: http::Handler = Arc::new(move |p| {
                        let response = h.handle(p);
                        probes.agent.count_probe(p, response.status);
                        response
                    });
                    let metrics_handler: http::Handler = Arc::new(move |p| match p {
                        "/metrics" => http::Response {
                            status: 200,
                            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            headers: Vec::new(),
                            body: m.render(),
                        },
                        _ => http::Response::text(404, "not found; try /metrics\n"),
                    });
                    let serve = |l: std::net::TcpListener, handler| {
                        let stop = stop_rx.clone();
                        async move {
                            match tokio::net::TcpListener::from_std(l) {
                                Ok(l) => http::serve(l, handler, stop).await,
                                Err(e) => tracing::error!(error = %e, "ops listener failed"),
                            }
                        }
                    };
                    let status_handler: http::Handler = Arc::new(move |p| match p {
                        status::STATUS_PATH => http::Response {
                            status: 200,
                            content_type: "application/json",
                            headers: Vec::new(),
                            body: serde_json::to_string(&st.report()).unwrap_or_default(),
                        },
                        _ => http::Response::text(404, "not found; try /status\n"),
                    });
                    let status_server = async {
                        let Some(l) = status_listener else { return };
                        match tokio::net::UnixListener::from_std(l) {
                            Ok(l) => http::serve_unix(l, status_handler, stop_rx.clone()).await,
                            Err(e) => tracing::error!(error = %e, "status listener failed"),
                        }
                    };
                    tokio::join!(
                        serve(health_listener, health_handler),
                        serve(metrics_listener, metrics_handler),
                        status_server
                    );
                });
            })
            .context("starting the ops thread")?;
        // The servers live as long as the process; the sender is leaked on purpose so `stop` never fires.
        #[expect(clippy::mem_forget, reason = "the servers live as long as the process")]
        std::mem::forget(stop_tx);
        let startup = config::startup();
        Ok(Ops {
            service_health: ServiceHealthServers::new(
                health.clone(),
                args.health_check_node_port_addresses.clone(),
                handle,
            ),
            health,
            metrics,
            pending_since: None,
            config: startup.file,
            status,
            counted: ChangeCounts::default(),
            _runtime: thread,
        })
    }

    /// What the agent attached, for the status.
    pub fn set_datapath(&self, setup: DatapathSetup) {
        self.status.update(|r| r.datapath = setup);
    }

    /// A change arrived that the next sync will program (for the programming latency).
    pub fn change_seen(&mut self) {
        self.change_seen_at(Instant::now());
    }

    /// As [`Ops::change_seen`], for a change first seen at `at` (the kube source batches events before handing
    /// them over, and that wait is part of the latency).
    pub fn change_seen_at(&mut self, at: Instant) {
        self.pending_since.get_or_insert(at);
        self.metrics
            .agent
            .last_queued
            .set(metrics_time(SystemTime::now()));
    }

    pub fn sync_started(&self) {
        self.health.sync_started();
    }

    /// Everything that follows a sync: health check servers, metrics, the status, the health timestamps.
    pub fn sync_finished(&mut self, done: SyncDone<'_>) {
        let translation = done.translation;
        self.service_health.sync(&translation.health);
        let agent = &self.metrics.agent;
        let took = done.started.elapsed();
        if let Some(seen) = self.pending_since.take() {
            agent
                .change_programming
                .observe(seen.elapsed().as_secs_f64());
        }
        // kube-proxy's network programming latency: from the trigger time the EndpointSlice controller stamped
        // to now, once per programmed slice (its clock against ours: a skew between them shows up here, as it
        // does in kube-proxy's).
        let now = SystemTime::now();
        for t in done.trigger_times {
            let latency = now.duration_since(*t).unwrap_or(Duration::ZERO);
            agent.network_programming.observe(latency.as_secs_f64());
        }
        let diagnostics: Vec<&Diagnostic> = translation.diagnostics.iter().collect();
        let frontends = translation.state.services.len();
        agent.record_sync(
            done.report,
            &diagnostics,
            frontends,
            done.backends,
            took,
            done.full,
        );
        agent.record_changes(self.counted, done.changes);
        self.counted = done.changes;
        agent.record_no_local_endpoints(&translation.state);
        agent
            .health_check_servers
            .set(self.service_health.ports().len() as i64);
        let finished = status::now_ms();
        let ok = done.report.failed.is_empty();
        let services = done.services;
        self.status.update(|r| {
            let s = &mut r.sync;
            s.syncs += 1;
            s.last_unix_ms = finished;
            s.last_duration_ms = took.as_secs_f64() * 1e3;
            s.last_full = done.full;
            s.last_changed_frontends = done.changed;
            if ok {
                s.last_ok_unix_ms = finished;
            }
            s.services = services;
            s.frontends = frontends;
            s.frontends_failed = done.report.failed.len();
            s.backends = done.backends;
            s.skipped_objects = translation.diagnostics.len();
        });
        self.health.sync_finished();
    }

    /// Counts diagnostics the source reported before the translation (unreadable documents, bad objects).
    pub fn note_source_diagnostics(&self, diagnostics: &[Diagnostic]) {
        for d in diagnostics {
            self.metrics
                .agent
                .skipped_objects
                .get_or_create(&metrics::skipped_labels(d))
                .inc();
        }
    }

    /// The first full sync is done: `/readyz` answers 200 from now on.
    pub fn set_ready(&self) {
        self.health.set_ready();
    }

    /// The config file to watch, if one was given.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config.as_ref().map(|c| c.path.clone())
    }

    /// Re-reads the config file and returns the live changes to apply (key, value); logs the rest. A file that
    /// no longer parses is reported and the running settings stay.
    pub fn reload_config(&mut self) -> Vec<(String, String)> {
        let Some(old) = self.config.clone() else {
            return Vec::new();
        };
        let reloads = &self.metrics.agent.config_reloads;
        let new = match config::load(&old.path) {
            Ok(n) => n,
            Err(e) => {
                reloads
                    .get_or_create(&metrics::ResultLabels {
                        result: "error".into(),
                    })
                    .inc();
                tracing::error!(error = %e, "config file not reloaded; the running settings stay");
                return Vec::new();
            }
        };
        let mut live = Vec::new();
        for change in config::diff(&old, &new, &config::startup()) {
            match change {
                config::Change::Live(key, value) => {
                    tracing::info!(setting = %key, %value, "config: applying the new value");
                    live.push((key, value));
                }
                config::Change::Restart(key) => tracing::warn!(
                    setting = %key,
                    "config: changed in the file, but needs a restart of the agent to take effect"
                ),
                config::Change::Overridden(key) => tracing::info!(
                    setting = %key,
                    "config: changed in the file, but a flag or environment variable sets it; ignored"
                ),
            }
        }
        reloads
            .get_or_create(&metrics::ResultLabels {
                result: "ok".into(),
            })
            .inc();
        self.config = Some(new);
        live
    }
}

/// What this binary is, for `lb_build_info` and the status.
pub fn build_info() -> metrics::BuildInfo {
    metrics::BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        commit: crate::build_info::commit().to_owned(),
        ebpf_object: crate::build_info::ebpf_object().to_owned(),
    }
}

fn metrics_time(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Binds the status socket (abstract, named after the pin directory). A taken name means another agent runs on
/// these pins: this one still runs, `lb-agent status` reaches the other.
fn bind_status(pins: &Path) -> Option<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let name = status::socket_name(pins);
    let bound = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|addr| std::os::unix::net::UnixListener::bind_addr(&addr))
        .and_then(|l| l.set_nonblocking(true).map(|()| l));
    match bound {
        Ok(l) => {
            tracing::info!(socket = %format!("@{name}"), "status socket listening (lb-agent status)");
            Some(l)
        }
        Err(e) => {
            tracing::warn!(socket = %format!("@{name}"), error = %e, "cannot serve the status socket (another agent on these pins?); lb-agent status will show the pins only");
            None
        }
    }
}
