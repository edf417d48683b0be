//! Operating the agent: health and readiness, the `healthCheckNodePort` servers, Prometheus metrics, the config
//! file and its reload. The agent's run loop (`crate::agent`) calls [`Ops`] at a few points (start, each sync,
//! ready, reload); everything else lives here. Ops reads the maps (for the metrics) and never writes them.
//!
//! The HTTP servers run on their own thread and runtime, so probes and scrapes are answered while a long sync
//! blocks the run loop (which is what `/healthz` must detect, not suffer from).

pub mod config;
pub mod health;
pub mod http;
pub mod kube_proxy_config;
pub mod metrics;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

use crate::datapath::reconcile::SyncReport;
use crate::model::{Diagnostic, Translation};
use health::{HealthState, ServiceHealthServers};
use metrics::{Metrics, PinnedCounters};

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
}

/// The agent's operational side, owned by the run loop.
pub struct Ops {
    health: Arc<HealthState>,
    metrics: Arc<Metrics>,
    service_health: ServiceHealthServers,
    /// When the oldest change not yet programmed was seen.
    pending_since: Option<Instant>,
    config: Option<config::ConfigFile>,
    _runtime: std::thread::JoinHandle<()>,
}

impl Ops {
    /// Binds the health and metrics listeners (a taken port fails the start, as it does kube-proxy's) and serves
    /// them on a thread of their own.
    pub fn start(args: &OpsConfig, pins: &Path) -> anyhow::Result<Ops> {
        let health = Arc::new(HealthState::default());
        let metrics = Arc::new(Metrics::new(PinnedCounters {
            dir: pins.to_path_buf(),
        }));
        let bind = |addr: SocketAddr, what: &str| -> anyhow::Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the {what} address {addr}"))?;
            l.set_nonblocking(true)?;
            tracing::info!(addr = %l.local_addr()?, "{what} server listening");
            Ok(l)
        };
        let health_listener = bind(args.health_addr, "health")?;
        let metrics_listener = bind(args.metrics_addr, "metrics")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the ops runtime")?;
        let handle = rt.handle().clone();
        let (h, m) = (health.clone(), metrics.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("lb-ops".into())
            .spawn(move || {
                rt.block_on(async move {
                    let health_handler: http::Handler = Arc::new(move |p| h.handle(p));
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
                    tokio::join!(
                        serve(health_listener, health_handler),
                        serve(metrics_listener, metrics_handler)
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
            _runtime: thread,
        })
    }

    /// A change arrived that the next sync will program (for the programming latency).
    pub fn change_seen(&mut self) {
        self.change_seen_at(Instant::now());
    }

    /// As [`Ops::change_seen`], for a change first seen at `at` (the kube source batches events before handing
    /// them over, and that wait is part of the latency).
    pub fn change_seen_at(&mut self, at: Instant) {
        self.pending_since.get_or_insert(at);
    }

    pub fn sync_started(&self) {
        self.health.sync_started();
    }

    /// Everything that follows a sync: health check servers, metrics, the health timestamps. `backends` is how
    /// many backends the maps hold after it.
    pub fn sync_finished(
        &mut self,
        translation: &Translation,
        report: &SyncReport,
        backends: usize,
        started: Instant,
    ) {
        self.service_health.sync(&translation.health);
        let agent = &self.metrics.agent;
        agent.sync_duration.observe(started.elapsed().as_secs_f64());
        if let Some(seen) = self.pending_since.take() {
            agent
                .programming_latency
                .observe(seen.elapsed().as_secs_f64());
        }
        let diagnostics: Vec<&Diagnostic> = translation.diagnostics.iter().collect();
        agent.record_sync(
            report,
            &diagnostics,
            translation.state.services.len(),
            backends,
        );
        agent
            .health_check_servers
            .set(self.service_health.ports().len() as i64);
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
