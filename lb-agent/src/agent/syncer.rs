//! One sync: the source's objects into the translator, the translation into the maps (reconciler, then the names
//! map), then what follows (metrics and health through `ops`, stale sockets ended). Both sources end in
//! [`Syncer::program`]: one path to the maps.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::model::EndpointSlice;

use crate::datapath::maps::{MapsRead, PinnedMaps};
use crate::datapath::names::{NameWriter, PinnedNames};
use crate::datapath::netns_addrs::NetnsAddrsWriter;
use crate::datapath::reconcile::{Reconciler, SyncReport, service_key};
use crate::datapath::sock_destroy;
use crate::model::{self, Diagnostic, ModelConfig};
use crate::ops::{self, Ops, SyncDone};
use crate::source::kube::{Contents, Snapshot};
use crate::source::manifest;
use crate::state::{DesiredState, Frontend};

/// Everything one sync needs besides the maps.
pub(super) struct Syncer {
    pub(super) node_name: String,
    pub(super) model: ModelConfig,
    /// The translation kept across syncs: a change costs the work of the Services it touches.
    pub(super) translator: model::Translator,
    pub(super) reconciler: Reconciler,
    /// `LB_SVC_NAMES`, opened (or created) at the first sync.
    pub(super) names: Names,
    /// Health, metrics, config reload.
    pub(super) ops: Ops,
    /// The socket LB's view of each namespace's address, for source ranges (`None`: the map could not be opened,
    /// logged; the socket LB then refuses connections to LoadBalancer IPs with ranges).
    pub(super) netns: Option<NetnsAddrsWriter>,
    /// This namespace's cookie (the host's entry in `netns`).
    pub(super) host_cookie: Option<u64>,
    /// Some Internal frontend has source ranges (as of the last sync): `netns` must be kept up to date.
    pub(super) netns_needed: bool,
    /// When the agent started: EndpointSlice trigger times before it are not this agent's latency (kube-proxy's
    /// `trackerStartTime`).
    pub(super) agent_started: SystemTime,
    /// A sync has programmed the maps (the first one's changes are summed up, not listed).
    pub(super) synced_once: bool,
}

/// At most this many Service changes are logged one per line at info level per sync; the rest go to debug.
const CHANGE_LINES: usize = 100;

/// The annotation the EndpointSlice controller stamps with the time of the change behind a slice update
/// (`endpoints.kubernetes.io/last-change-trigger-time`, RFC 3339).
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// A slice's trigger time, if it has one newer than `since` (kube-proxy's `getLastChangeTriggerTime` and its
/// `t.After(trackerStartTime)`).
fn trigger_time(slice: &EndpointSlice, since: SystemTime) -> Option<SystemTime> {
    let value = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?;
    let ts: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    let t = SystemTime::from(ts);
    (t > since).then_some(t)
}

/// The names map and its writer; opened lazily so an agent whose names map cannot be opened still programs
/// services (the CLI and the metrics then show ids only).
pub(super) struct Names {
    pub(super) pins: PathBuf,
    pub(super) capacity: u32,
    pub(super) open: Option<(PinnedNames, NameWriter)>,
}

impl Syncer {
    /// Reads the manifests and programs the maps (`full`: every frontend, not only those that changed). An
    /// unreadable source changes nothing: the datapath keeps serving what it had rather than flushing everything
    /// on a transient error.
    pub(super) fn sync(&mut self, maps: &mut PinnedMaps, manifests: &Path, full: bool) -> bool {
        let started = Instant::now();
        let (objects, diagnostics) = match manifest::load_path(manifests) {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the manifests; keeping the datapath as it is");
                return false;
            }
        };
        self.translator.replace_all(objects);
        self.program(maps, &diagnostics, started, None, full, &[]);
        true
    }

    /// Programs what a kube source snapshot says: everything, or only what changed.
    pub(super) fn apply_snapshot(&mut self, maps: &mut PinnedMaps, snapshot: Snapshot, full: bool) {
        let started = Instant::now();
        // kube-proxy observes one latency per changed (not deleted) slice; with the batch, only a slice's latest
        // version is here, so a slice changed twice within one batch counts its later change.
        let mut triggers = Vec::new();
        match snapshot.contents {
            Contents::Full(objects) => self.translator.replace_all(objects),
            Contents::Changes(delta) => {
                for (key, svc) in delta.services {
                    let key = (key.namespace, key.name);
                    match svc {
                        Some(svc) => self.translator.upsert_service(key, svc),
                        None => self.translator.remove_service(&key),
                    }
                }
                for (key, slice) in delta.endpoint_slices {
                    let key = (key.namespace, key.name);
                    match slice {
                        Some(slice) => {
                            triggers.extend(trigger_time(&slice, self.agent_started));
                            self.translator.upsert_slice(key, slice)
                        }
                        None => self.translator.remove_slice(&key),
                    }
                }
                if let Some(nodes) = delta.nodes {
                    self.translator.set_nodes(&nodes);
                }
                if let Some(cidrs) = delta.service_cidrs {
                    self.translator.set_service_cidrs(&cidrs);
                }
            }
        }
        let queued = snapshot
            .first_event
            .map(|at| started.saturating_duration_since(at));
        self.program(
            maps,
            &snapshot.diagnostics,
            started,
            queued,
            full,
            &triggers,
        );
    }

    /// Re-reads the config file and applies its live settings; true when the maps need a resync.
    pub(super) fn reload_config(&mut self) -> bool {
        let live = self.ops.reload_config();
        apply_live(&live, &mut self.model, &mut self.reconciler)
    }

    /// Translates what changed in the translator's inputs and programs the maps: the one path from any source to
    /// the datapath. Only the frontends whose entries changed are visited, unless `full` (a resync asked for by
    /// the operator or a config reload) revisits everything.
    fn program(
        &mut self,
        maps: &mut PinnedMaps,
        diagnostics: &[Diagnostic],
        started: Instant,
        queued: Option<std::time::Duration>,
        full: bool,
        trigger_times: &[SystemTime],
    ) {
        self.ops.sync_started();
        for d in diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let node = model::node_context(&self.node_name, self.translator.nodes(), &self.model);
        self.translator.set_config(&self.model);
        self.translator.set_node(&node);
        let translating = Instant::now();
        let changed = self.translator.translate();
        let translate_ms = translating.elapsed().as_secs_f64() * 1e3;
        let translation = self.translator.translation();
        for d in &translation.diagnostics {
            tracing::warn!(event = "Warning", reason = "InvalidObject", object = %d.object, field = d.field.as_deref().unwrap_or(""), "skipped: {}", d.message);
        }
        let writing = Instant::now();
        let report = if full {
            self.reconciler.sync(maps, &translation.state)
        } else {
            self.reconciler
                .sync_changed(maps, &translation.state, &changed)
        };
        let write_ms = writing.elapsed().as_secs_f64() * 1e3;
        self.names.write(
            &translation.state,
            (!full).then_some(&changed),
            &self.reconciler,
        );
        self.ops.sync_finished(SyncDone {
            translation,
            report: &report,
            backends: self.reconciler.programmed_backends(),
            services: self.translator.services_served(),
            started,
            full,
            changed: changed.len(),
            changes: self.translator.change_counts(),
            trigger_times,
        });
        self.ops.note_source_diagnostics(diagnostics);
        // A full map fails every frontend beyond it: the first few say why, the rest are counted.
        const SHOWN: usize = 10;
        for (frontend, reason) in report.failed.iter().take(SHOWN) {
            tracing::error!(%frontend, %reason, "frontend not programmed; the others are");
        }
        if report.failed.len() > SHOWN {
            tracing::error!(
                more = report.failed.len() - SHOWN,
                "more frontends not programmed (lb_unprogrammed_frontends)"
            );
        }
        self.netns_needed =
            translation.state.services.iter().any(|(f, e)| {
                f.scope == crate::state::Scope::Internal && !e.source_ranges.is_empty()
            });
        let node_addresses = node.addresses.clone();
        self.refresh_netns(Some(&node_addresses));
        log_service_changes(self.translator.service_changes(), !self.synced_once);
        self.synced_once = true;
        let translation = self.translator.translation();
        tracing::info!(
            frontends = translation.state.services.len(),
            changed = changed.len(),
            written = report.services_written,
            deleted = report.services_deleted,
            tables = report.tables_written,
            backends_added = report.backends_written,
            backends_removed = report.backends_deleted,
            failed = report.failed.len(),
            // The sync's time split: translation, the reconciler's writes, and everything since the sync started
            // (for the file source that includes reading and parsing the manifests).
            translate_ms,
            write_ms,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            // From the batch's first watch event to the sync's start (the kube source's batching).
            queued_ms = queued.map(|q| q.as_secs_f64() * 1e3),
            "synced"
        );
        end_stale_sockets(maps, &report, &translation.state);
    }

    /// Brings `LB_NETNS_ADDRS` up to date while some LoadBalancer IP with source ranges is served to this node's
    /// pods (the socket LB reads it for those only): after every sync, and on the run loop's timer for pods started
    /// since. `node_addresses`: the node's addresses as of this sync (the host's entry), `None` to keep them.
    pub(super) fn refresh_netns(&mut self, node_addresses: Option<&[std::net::IpAddr]>) {
        let Some(netns) = self.netns.as_mut() else {
            return;
        };
        if let (Some(cookie), Some(addresses)) = (self.host_cookie, node_addresses) {
            netns.set_host(cookie, addresses);
        }
        if !self.netns_needed {
            return;
        }
        let r = netns.refresh();
        if r != Default::default() {
            tracing::debug!(
                learned = r.learned,
                written = r.written,
                deleted = r.deleted,
                "namespace addresses refreshed"
            );
        }
    }
}

/// The change log: one line per Service whose datapath entries changed, naming it and the backends (and
/// frontends) it gained and lost. The first sync programs everything at once: its lines go to debug and one info
/// line sums them up; later syncs log up to [`CHANGE_LINES`] at info.
fn log_service_changes(changes: &[model::ServiceChange], first: bool) {
    use model::change_list as list;
    let mut quiet = 0usize;
    for (i, c) in changes.iter().enumerate() {
        let service = format!("{}/{}", c.namespace, c.name);
        if first || i >= CHANGE_LINES {
            quiet += 1;
            tracing::debug!(%service, change = %c.kind, backends_added = %list(&c.backends_added), backends_removed = %list(&c.backends_removed), frontends_added = %list(&c.frontends_added), frontends_removed = %list(&c.frontends_removed), backends = c.backends, "Service {}", c.kind);
        } else {
            tracing::info!(%service, change = %c.kind, backends_added = %list(&c.backends_added), backends_removed = %list(&c.backends_removed), frontends_added = %list(&c.frontends_added), frontends_removed = %list(&c.frontends_removed), backends = c.backends, "Service {}", c.kind);
        }
    }
    if quiet > 0 {
        let added = changes
            .iter()
            .filter(|c| c.kind == model::ChangeKind::Added)
            .count();
        tracing::info!(
            services = changes.len(),
            added,
            listed = changes.len() - quiet,
            "Service changes (the rest are listed at debug level)"
        );
    }
}

impl Names {
    pub(super) fn new(pins: &Path, capacity: u32) -> Self {
        Names {
            pins: pins.to_path_buf(),
            capacity,
            open: None,
        }
    }

    /// Writes the programmed frontends' names. `changed` names the frontends whose desired entry changed when the
    /// sync visited only those (`None`: all).
    fn write(
        &mut self,
        desired: &DesiredState,
        changed: Option<&BTreeSet<Frontend>>,
        reconciler: &Reconciler,
    ) {
        if self.open.is_none() {
            match PinnedNames::open_or_create(&self.pins, self.capacity)
                .and_then(|store| NameWriter::restore(&store).map(|w| (store, w)))
            {
                Ok(n) => self.open = Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the service names map; the CLI and metrics will show ids only");
                    return;
                }
            }
        }
        let id_of = |f: &Frontend| reconciler.service_id(&service_key(f));
        if let Some((store, writer)) = self.open.as_mut()
            && let Err(e) = match changed {
                Some(changed) => writer.sync_changed(store, desired, changed, id_of),
                None => writer.sync(store, desired, id_of),
            }
        {
            tracing::warn!(error = %e, "cannot update the service names map");
        }
    }
}

/// Applies live settings from a config reload to the model and the reconciler (and the log filter). Returns
/// whether the maps need a resync. A value that does not parse is logged and the running one stays.
fn apply_live(
    live: &[(String, String)],
    model: &mut ModelConfig,
    reconciler: &mut Reconciler,
) -> bool {
    let mut resync = false;
    for (key, value) in live {
        let bad = |e: &dyn std::fmt::Display| tracing::error!(setting = %key, %value, error = %e, "config: invalid value; keeping the running one");
        match key.as_str() {
            "algorithm" => match value.parse() {
                Ok(a) => {
                    model.default_algorithm = a;
                    resync = true;
                }
                Err(e) => bad(&e),
            },
            "maglev-min-size" | "maglev-max-size" => match value.parse::<u32>() {
                Ok(n) if key == "maglev-min-size" => {
                    reconciler.set_maglev_sizes(Some(n), None);
                    resync = true;
                }
                Ok(n) => {
                    reconciler.set_maglev_sizes(None, Some(n));
                    resync = true;
                }
                Err(e) => bad(&e),
            },
            "log-level" => {
                if let Err(e) = ops::config::reload_log_level(value) {
                    bad(&e);
                }
            }
            _ => {}
        }
    }
    resync
}

/// Ends the sockets the socket LB connected to backends that just departed (connected UDP always; TCP when the
/// backend is deleted rather than terminating), so their applications reconnect instead of talking into the void.
fn end_stale_sockets(maps: &PinnedMaps, report: &SyncReport, desired: &DesiredState) {
    let targets = sock_destroy::targets(&report.departed, &desired.endpoint_addresses);
    if targets.is_empty() {
        return;
    }
    let revnat = match maps.sock_revnat_entries() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read socket records; stale sockets stay open");
            return;
        }
    };
    let cookies = sock_destroy::cookies(&revnat, &targets);
    if cookies.is_empty() {
        return;
    }
    let result = sock_destroy::destroy(&cookies);
    let mut denied: std::collections::BTreeMap<&str, (usize, String)> = Default::default();
    for e in &result.errors {
        match e.missing_capability() {
            Some(cap) => {
                let entry = denied.entry(cap).or_insert_with(|| (0, e.to_string()));
                entry.0 += 1;
            }
            // Processes and namespaces come and go while they are searched.
            None => {
                tracing::debug!(error = %e, "a namespace could not be searched for stale sockets")
            }
        }
    }
    // The deployment left out a capability: say which (once per sync, not per namespace), since those sockets
    // stay stale until it is granted.
    for (cap, (namespaces, example)) in denied {
        tracing::warn!(
            capability = cap,
            namespaces,
            error = %example,
            "cannot end stale sockets: the agent lacks {cap} (see deploy/README.md)"
        );
    }
    tracing::info!(
        backends = targets.len(),
        candidates = cookies.len(),
        destroyed = result.destroyed,
        namespaces = result.namespaces,
        "ended sockets connected to departed backends"
    );
}
