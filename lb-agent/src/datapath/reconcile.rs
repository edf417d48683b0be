//! Brings the maps to a [`DesiredState`], touching only what differs (cilium's
//! `pkg/loadbalancer/reconciler/bpf_reconciler.go` is the model).
//!
//! **Invariant (no half-written service):** for every service the order is backends, then the lookup table (a
//! whole new inner map swapped in atomically), then the service entry; deletions come last (service entry, then
//! its table, then backends nobody uses). A packet or `connect()` at any moment sees either the old service or the
//! new one, each with valid backend ids. A sync keeps this order across all services at once (phases, see
//! [`Reconciler::sync`]) so that the tables of every changed service go to the kernel in one batch: each update of
//! the map-of-maps `LB_MAGLEV` waits for an RCU grace period, a batch only once (Linux >= 6.7).
//!
//! **Invariant (stable ids):** service and backend ids are restored from the maps at start ([`Reconciler::restore`]),
//! so a restarted agent rewrites nothing that is already right and established flows keep their backend.
//!
//! **Invariant (partial syncs):** [`Reconciler::sync_changed`] visits only the frontends it is told changed (and
//! every failure of the previous sync) and makes exactly the writes [`Reconciler::sync`] would: both run the same
//! phases, they differ only in which frontends they visit and in which backend ids and node entries they check.
//! What a full sync finds by walking everything, the reconciler keeps counted: how many programmed frontends name
//! each backend id, which service id belongs to which key, what failed last time.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::ops::RangeInclusive;

use lb_common::{
    BACKEND_FLAG_LOCAL, BackendValue, ConfigValue, LOCAL_NET_NODE, LOCAL_NET_POD,
    SVC_FLAG_DROP_NO_BACKEND, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue,
    VIP_FLAG_CLUSTER_IP, addr_bytes,
};

use super::map_error::MapsError;
use super::maps::{Maps, StaleAffinity};
use super::packet_maps::{NodeEntry, lpm_prefix};
use crate::maglev;
use crate::state::{Algorithm, DesiredState, Frontend, Protocol, Scope, ServiceEntry, VipKind};

/// Sizes and limits the reconciler works within.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    /// Service ids are 1..max_services (the capacity of `LB_SERVICES` and `LB_SVC_STATS`).
    pub max_services: u32,
    /// Backend ids are 1..max_backends.
    pub max_backends: u32,
    pub maglev_min_size: u32,
    pub maglev_max_size: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            maglev_min_size: maglev::TABLE_SIZES[0],
            maglev_max_size: 16381,
        }
    }
}

/// What one sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub services_written: usize,
    pub services_deleted: usize,
    pub tables_written: usize,
    pub backends_written: usize,
    pub backends_deleted: usize,
    pub affinity_purged: usize,
    /// Frontends that could not be programmed (capacity, map errors), with the reason. The rest are programmed.
    pub failed: Vec<(Frontend, String)>,
    /// (service id, backend) pairs that ended this sync: the backend left the service, or the service went. Sockets
    /// the socket LB pointed there are candidates for destruction (`sock_destroy`).
    pub departed: Vec<(u32, BackendValue)>,
}

impl SyncReport {
    pub fn changed(&self) -> bool {
        self.services_written
            + self.services_deleted
            + self.backends_written
            + self.backends_deleted
            > 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("restoring state from the maps: {0}")]
    Restore(#[source] MapsError),
}

/// Hands out ids in `1..limit`, lowest free after a moving cursor, so a just-freed id is not reused at once (a
/// lingering affinity or conntrack entry then cannot point at a newcomer).
#[derive(Debug, PartialEq)]
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator {
    fn new(limit: u32) -> Self {
        Self {
            used: BTreeSet::new(),
            next: 1,
            limit,
        }
    }

    fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn allocate(&mut self) -> Option<u32> {
        if self.limit <= 1 || self.used.len() as u64 >= u64::from(self.limit - 1) {
            return None;
        }
        let mut id = self.next;
        loop {
            if id == 0 || id >= self.limit {
                id = 1;
            }
            if self.used.insert(id) {
                self.next = id + 1;
                return Some(id);
            }
            id += 1;
        }
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// What is programmed for one frontend, mirrored in memory so unchanged services cost nothing.
#[derive(Clone, Debug, PartialEq)]
struct Programmed {
    value: ServiceValue,
    /// Backend ids and algorithm the table was built from; `None` after a restart until rebuilt once.
    inputs: Option<(Algorithm, Vec<u32>, u32)>,
    /// The desired entry `value` and `inputs` were computed from, `None` until then, after the table size bounds
    /// change, and once the service entry is deleted. An equal desired entry plans to exactly the same writes
    /// (none), so the sync skips it without looking up its backends: the backend ids it names stay allocated
    /// because its inputs hold a reference to each.
    entry: Option<ServiceEntry>,
    /// The frontend went and its service entry is deleted, but its table could not be: it stays here (id and
    /// backends held) so the table delete is retried. Should the frontend come back meanwhile, its entry is
    /// written again even though `value` says it is there.
    entry_deleted: bool,
}

/// Phase 1's verdict on one frontend.
enum Planned {
    /// Nothing to write.
    Unchanged,
    Write(Box<Pending>),
}

/// A frontend whose backends are written and whose table is built, waiting for phases 2 and 3 of a sync.
struct Pending {
    frontend: Frontend,
    key: ServiceKey,
    value: ServiceValue,
    inputs: (Algorithm, Vec<u32>, u32),
    ids: Vec<u32>,
    /// The new table, when it changed and the service has backends (taken by phase 2).
    table: Option<Vec<u32>>,
    /// The backends of the table being replaced, for affinity purges and departures.
    previous_ids: Option<Vec<u32>>,
    /// The programmed entry, `None` for a new frontend (whose id goes back to the pool on failure).
    previous: Option<ServiceValue>,
    /// The desired entry this was planned from, remembered once written.
    entry: ServiceEntry,
}

/// What went wrong in one sync, for the next one to retry whatever it is told (a sync of changed frontends visits
/// these as well as the changed ones, so after any sync nothing else can differ from the desired state).
#[derive(Debug, Default, PartialEq)]
struct Retry {
    /// Frontends whose plan, table or entry write failed.
    frontends: BTreeSet<Frontend>,
    /// Programmed keys gone from the desired state whose entry or table delete failed.
    stale: BTreeSet<ServiceKey>,
    /// Unused backends whose delete failed.
    backends: BTreeSet<u32>,
    /// Backends kept alive only because a failed `put_service` left a new table naming them live under the old
    /// entry: kept for that sync alone, checked again by the next.
    pinned: BTreeSet<u32>,
    /// Addresses whose `LB_VIPS` entry could not be written or deleted.
    vips: BTreeSet<[u8; 16]>,
    /// Service ids whose `LB_SRC_RANGES` entries could not be written or deleted.
    src_range_ids: BTreeSet<u32>,
}

impl Retry {
    fn node_entry_failed(&mut self, e: &NodeEntry) {
        match e {
            NodeEntry::Vip { addr, .. } => {
                self.vips.insert(*addr);
            }
            NodeEntry::SrcRange { service_id, .. } => {
                self.src_range_ids.insert(*service_id);
            }
            // Every sync looks at all of these.
            NodeEntry::LocalNet { .. } | NodeEntry::ServiceCidr { .. } => {}
        }
    }
}

/// The per-service node entries a sync of changed frontends looks at (besides the few node-wide ones, which every
/// sync recomputes): the VIP entries of these addresses, the source-range entries of these service ids.
#[derive(Default)]
struct NodeScope {
    vips: BTreeSet<[u8; 16]>,
    service_ids: BTreeSet<u32>,
}

pub struct Reconciler {
    cfg: ReconcileConfig,
    services: BTreeMap<ServiceKey, Programmed>,
    backend_ids: BTreeMap<BackendValue, u32>,
    /// The reverse of `backend_ids`.
    backend_values: HashMap<u32, BackendValue>,
    /// Backend id → how many times the inputs of programmed frontends name it. A backend is used when this is
    /// non-zero or a failed entry write pinned it this sync ([`Retry::pinned`]): exactly the ids a full walk of
    /// every frontend would mark (see [`Reconciler::run`]).
    backend_refs: Vec<u32>,
    /// Service id → the key programmed under it.
    keys_by_id: HashMap<u32, ServiceKey>,
    /// Programmed frontends whose inputs are unknown (restored, not yet rewritten). Such a frontend's table may
    /// name any backend, so while one remains no backend is deleted and every sync is a full one.
    unknown_inputs: usize,
    /// Backend ids whose last reference went, or that were allocated, during the current sync: with the retries,
    /// the only ids a sync of changed frontends can find unused.
    backend_candidates: Vec<u32>,
    /// Failures of the last sync.
    retry: Retry,
    /// The in-memory state cannot be trusted to skip anything (after `restore`, `set_maglev_sizes`, or an
    /// inconsistency): the next `sync_changed` does a full sync.
    needs_full: bool,
    /// The last full sync saw two frontends with one key (an IPv4 address and its IPv4-mapped IPv6 form, which the
    /// model never produces): a key then does not name one frontend, and only full syncs are exact.
    aliased: bool,
    service_ids: IdAllocator,
    backend_id_alloc: IdAllocator,
    /// What `LB_LOCAL_NETS`, `LB_SRC_RANGES`, `LB_VIPS` and `LB_SVC_CIDRS` hold.
    node_entries: BTreeSet<NodeEntry>,
    /// What `LB_CONFIG` holds; `config_flags` are or-ed into it (`lb-agent trace` sets `CONFIG_FLAG_TRACE`).
    config: ConfigValue,
    config_flags: u32,
    host_netns_cookie: u64,
}

impl Reconciler {
    /// Adopts what the maps hold (after an agent restart, or empty on first start).
    pub fn restore(maps: &impl Maps, cfg: ReconcileConfig) -> Result<Self, ReconcileError> {
        let mut service_ids = IdAllocator::new(cfg.max_services);
        let mut backend_id_alloc = IdAllocator::new(cfg.max_backends);
        let mut services = BTreeMap::new();
        let mut keys_by_id = HashMap::new();
        for (key, value) in maps.services().map_err(ReconcileError::Restore)? {
            service_ids.mark(value.service_id);
            keys_by_id.insert(value.service_id, key);
            services.insert(
                key,
                Programmed {
                    value,
                    inputs: None,
                    entry: None,
                    entry_deleted: false,
                },
            );
        }
        let mut backend_ids = BTreeMap::new();
        let mut backend_values = HashMap::new();
        for (id, value) in maps.backends().map_err(ReconcileError::Restore)? {
            backend_id_alloc.mark(id);
            backend_ids.insert(value, id);
            backend_values.insert(id, value);
        }
        // The per-packet maps are small and rewritten whole when they differ; unreadable means "unknown", so the
        // first sync writes everything.
        let node_entries = maps
            .node_entries()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let config = maps.config().unwrap_or_default();
        Ok(Self {
            cfg,
            unknown_inputs: services.len(),
            services,
            backend_ids,
            backend_values,
            backend_refs: Vec::new(),
            keys_by_id,
            backend_candidates: Vec::new(),
            retry: Retry::default(),
            needs_full: true,
            aliased: false,
            service_ids,
            backend_id_alloc,
            node_entries,
            config,
            config_flags: 0,
            host_netns_cookie: 0,
        })
    }

    /// Adds `flags` (`lb_common::CONFIG_FLAG_*`) to those written into `LB_CONFIG` (features are switched on independently: trace, XDP,
    /// `localhost:nodePort`).
    pub fn set_config_flags(&mut self, flags: u32) {
        self.config_flags |= flags;
    }

    /// The host's network namespace cookie written into `LB_CONFIG` at every sync (`localhost:nodePort`).
    pub fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.host_netns_cookie = cookie;
    }

    /// The ids of every programmed service (for conntrack garbage collection).
    pub fn service_ids(&self) -> HashSet<u32> {
        self.services.values().map(|p| p.value.service_id).collect()
    }

    pub fn programmed_services(&self) -> usize {
        self.services.len()
    }

    pub fn programmed_backends(&self) -> usize {
        self.backend_ids.len()
    }

    /// The service id a frontend is programmed under (`None` when it is not), for the names map and metrics.
    pub fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.services.get(key).map(|p| p.value.service_id)
    }

    /// Changes the Maglev table size bounds (live configuration reload); tables are rebuilt at the next sync where
    /// their size changes.
    pub fn set_maglev_sizes(&mut self, min: Option<u32>, max: Option<u32>) {
        if let Some(min) = min {
            self.cfg.maglev_min_size = min;
        }
        if let Some(max) = max {
            self.cfg.maglev_max_size = max;
        }
        // Table sizes derive from these bounds: every frontend is planned again at the next sync, which therefore
        // must visit them all.
        for p in self.services.values_mut() {
            p.entry = None;
        }
        self.needs_full = true;
    }

    /// Whether the next [`Reconciler::sync_changed`] will be a full sync: after `restore` until every restored
    /// frontend has been rewritten, after `set_maglev_sizes`, after an inconsistency.
    pub fn needs_full_sync(&self) -> bool {
        self.needs_full || self.aliased || self.unknown_inputs > 0
    }

    /// Makes the maps match `desired`. Errors on single frontends are collected in the report and do not stop the
    /// others.
    ///
    /// The writes go in phases over the whole sync, so the per-service order (backends, table, service entry,
    /// deletes last) holds for every service at once: (1) new backends, and every changed table built in memory;
    /// (2) all changed tables installed with one batched update of `LB_MAGLEV`; (3) the service entries; (4) the
    /// deletions: stale service entries, then their tables in one batched delete, then unused backends, then
    /// affinity. The batching is the point: every userspace update of a map-of-maps waits for an RCU grace period
    /// (`maybe_wait_bpf_programs()`, ~13 ms here), a batch only once (Linux >= 6.7), so N changed frontends cost one
    /// wait instead of N.
    pub fn sync(&mut self, maps: &mut impl Maps, desired: &DesiredState) -> SyncReport {
        self.run(maps, desired, None)
    }

    /// [`Reconciler::sync`] for a caller that knows what changed: costs O(changed), not O(all frontends).
    ///
    /// **The caller's promise:** `desired.services` differs from the state passed to the previous `sync` or
    /// `sync_changed` only at frontends in `changed` (added, modified or removed; naming an unchanged one is
    /// harmless). `desired.node`, `desired.service_cidrs` and `desired.endpoint_addresses` may differ arbitrarily.
    ///
    /// **The guarantee:** exactly the writes, resulting state and report that `sync(maps, desired)` would produce.
    /// Whatever failed in the previous sync is retried although `changed` does not name it. When the in-memory
    /// state cannot be trusted to skip anything ([`Reconciler::needs_full_sync`]) this is a full sync.
    pub fn sync_changed(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        changed: &BTreeSet<Frontend>,
    ) -> SyncReport {
        let aliased = || {
            changed
                .iter()
                .chain(&self.retry.frontends)
                .filter_map(alias)
                .any(|a| desired.services.contains_key(&a))
        };
        if self.needs_full_sync() || aliased() {
            return self.run(maps, desired, None);
        }
        self.run(maps, desired, Some(changed))
    }

    /// Both syncs. `changed: None` visits every desired frontend and checks every programmed key, backend and node
    /// entry; `Some` visits the changed and the retried frontends and checks only what they and the retries touch.
    ///
    /// Why the partial walk finds what the full one would, given the caller's promise and that the previous sync
    /// (either kind) left everything equal to its desired state except its failures (`self.retry`):
    /// - a desired frontend not visited has the entry it had, which the previous sync programmed (it is no
    ///   failure): its programmed entry equals the desired one, so the full walk would skip it;
    /// - a programmed key absent from the desired state either was present last time (its frontend was removed,
    ///   so it is in `changed`) or was already stale and its delete failed (`retry.stale`);
    /// - a backend is used when a programmed frontend's inputs name it ([`Reconciler::backend_refs`]) or a failed
    ///   entry write pinned it this sync (the new table is live under the old entry): the ids a walk over every
    ///   frontend would mark (each one's programmed inputs, kept or new, plus those pins). The full sync checks
    ///   every backend id against that rule, the partial one only the ids that can have become unused: every
    ///   backend was used after the previous sync, or its delete failed (`retry.backends`), or it was pinned then
    ///   (`retry.pinned`), so one unused now lost its last reference or was allocated this sync
    ///   (`backend_candidates`), or is one of those retries;
    /// - a node entry can change only for an address or service id a visited frontend or stale key had before or
    ///   has after, or one that failed last time ([`NodeScope`]).
    fn run(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        changed: Option<&BTreeSet<Frontend>>,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut stale_affinity = StaleAffinity::default();
        let retry = std::mem::take(&mut self.retry);
        let mut failed = Retry::default();
        self.backend_candidates.clear();
        if changed.is_none() {
            if self.needs_full {
                self.recount();
            }
            self.needs_full = false;
        }

        // Phase 1: backends written, tables built, nothing else touched yet. Frontends are visited in the order of
        // `desired.services` either way, so the writes come in the same order.
        let mut pending: Vec<Pending> = Vec::new();
        let (stale, node_scope): (Vec<ServiceKey>, Option<(NodeScope, Vec<ServiceKey>)>) =
            match changed {
                None => {
                    let mut wanted_keys = HashSet::with_capacity(desired.services.len());
                    let mut aliased = false;
                    for (frontend, entry) in &desired.services {
                        let key = service_key(frontend);
                        aliased |= !wanted_keys.insert(key);
                        self.plan_frontend(
                            maps,
                            frontend,
                            key,
                            entry,
                            &mut pending,
                            &mut report,
                            &mut failed,
                        );
                    }
                    self.aliased = aliased;
                    let stale = self
                        .services
                        .keys()
                        .filter(|k| !wanted_keys.contains(k))
                        .copied()
                        .collect();
                    (stale, None)
                }
                Some(changed) => {
                    let visit: BTreeSet<Frontend> =
                        changed.iter().chain(&retry.frontends).copied().collect();
                    let mut scope = NodeScope {
                        vips: retry.vips.clone(),
                        service_ids: retry.src_range_ids.clone(),
                    };
                    let mut visited_keys = Vec::with_capacity(visit.len());
                    let mut stale = retry.stale.clone();
                    for frontend in &visit {
                        let key = service_key(frontend);
                        scope.vips.insert(key.addr);
                        visited_keys.push(key);
                        match desired.services.get(frontend) {
                            Some(entry) => self.plan_frontend(
                                maps,
                                frontend,
                                key,
                                entry,
                                &mut pending,
                                &mut report,
                                &mut failed,
                            ),
                            None => {
                                stale.insert(key);
                            }
                        }
                    }
                    stale.retain(|k| {
                        self.services.contains_key(k) && desired_entry_of_key(desired, k).is_none()
                    });
                    // Their ids go in phase 4; the ids of visited keys are read after it.
                    scope.service_ids.extend(
                        stale
                            .iter()
                            .filter_map(|k| self.services.get(k))
                            .map(|p| p.value.service_id),
                    );
                    (stale.into_iter().collect(), Some((scope, visited_keys)))
                }
            };

        // Phase 2: every changed table in one batch. Service ids are unique among `pending`, so a failure names
        // exactly one frontend.
        let tables: Vec<(u32, Vec<u32>)> = pending
            .iter_mut()
            .filter_map(|p| p.table.take().map(|t| (p.value.service_id, t)))
            .collect();
        let installed: HashSet<u32> = tables.iter().map(|(id, _)| *id).collect();
        let mut table_failures: HashMap<u32, MapsError> = if tables.is_empty() {
            HashMap::new()
        } else {
            maps.put_tables(&tables).into_iter().collect()
        };
        drop(tables);
        report.tables_written += installed.len().saturating_sub(table_failures.len());

        // Phase 3: service entries, only of frontends whose table is in place.
        let mut unused_tables: Vec<u32> = Vec::new();
        for p in pending {
            let service_id = p.value.service_id;
            let is_new = p.previous.is_none();
            let reason = match table_failures.remove(&service_id) {
                Some(e) => Some(e.to_string()),
                None => maps.put_service(&p.key, &p.value).err().map(|e| {
                    // The new table is live under the old entry, and it may name the new backends: keep them.
                    failed.pinned.extend(p.ids.iter().copied());
                    if is_new && installed.contains(&service_id) {
                        // Nothing will read a table under an id that goes back to the pool.
                        unused_tables.push(service_id);
                    }
                    e.to_string()
                }),
            };
            if let Some(reason) = reason {
                if is_new {
                    self.service_ids.free(service_id);
                }
                // The frontend keeps whatever it had (its programmed inputs still hold its backends): a failed
                // update must not take down a working service.
                failed.frontends.insert(p.frontend);
                report.failed.push((p.frontend, reason));
                continue;
            }
            if p.ids.is_empty() && p.previous.as_ref().is_some_and(|v| v.backend_count > 0) {
                // The entry now says "no backend", so nothing reads the table any more.
                unused_tables.push(service_id);
            }
            report.services_written += 1;
            for gone in p
                .previous_ids
                .into_iter()
                .flatten()
                .filter(|b| !p.ids.contains(b))
            {
                stale_affinity.pairs.insert((service_id, gone));
            }
            self.put_programmed(
                p.key,
                Programmed {
                    value: p.value,
                    inputs: Some(p.inputs),
                    entry: Some(p.entry),
                    entry_deleted: false,
                },
            );
        }

        // Phase 4: deletions. Entries first (a reader then no longer reaches the table), then every table that
        // went out of use in one batch, then backends nobody uses.
        let mut unreferenced: Vec<(ServiceKey, u32)> = Vec::new();
        for key in stale {
            let Some(p) = self.services.get(&key) else {
                continue;
            };
            let id = p.value.service_id;
            match maps.delete_service(&key) {
                Ok(()) => unreferenced.push((key, id)),
                Err(e) => {
                    // Kept as programmed (its inputs keep its backends), deleted again by the next sync.
                    tracing::warn!(service_id = id, error = %e, "could not delete a stale service; will retry");
                    failed.stale.insert(key);
                }
            }
        }
        let doomed: Vec<u32> = unreferenced
            .iter()
            .map(|(_, id)| *id)
            .chain(unused_tables.iter().copied())
            .collect();
        let delete_failures: HashMap<u32, MapsError> = if doomed.is_empty() {
            HashMap::new()
        } else {
            maps.delete_tables(&doomed).into_iter().collect()
        };
        for (key, id) in unreferenced {
            if let Some(e) = delete_failures.get(&id) {
                // Kept as programmed, so the next sync deletes it again (entry deletion is idempotent); marked so
                // that a comeback of the frontend writes its entry again.
                tracing::warn!(service_id = id, error = %e, "could not delete a stale service's table; will retry");
                failed.stale.insert(key);
                if let Some(p) = self.services.get_mut(&key) {
                    p.entry = None;
                    p.entry_deleted = true;
                }
                continue;
            }
            let backends_of_deleted = self.backend_ids_of_key(&key);
            self.remove_programmed(&key);
            self.service_ids.free(id);
            stale_affinity.services.insert(id);
            stale_affinity
                .pairs
                .extend(backends_of_deleted.into_iter().map(|b| (id, b)));
            report.services_deleted += 1;
        }
        for id in unused_tables {
            if let Some(e) = delete_failures.get(&id) {
                tracing::debug!(service_id = id, error = %e, "could not delete an unused lookup table");
            }
        }

        // Resolved before stale backends are forgotten below.
        report.departed = stale_affinity
            .pairs
            .iter()
            .filter_map(|(svc, b)| self.backend_values.get(b).map(|v| (*svc, *v)))
            .collect();
        report.departed.sort();
        let mut stale_backends: Vec<(BackendValue, u32)> = match changed {
            None => self.backend_ids.iter().map(|(v, id)| (*v, *id)).collect(),
            Some(_) => {
                let ids: BTreeSet<u32> = self
                    .backend_candidates
                    .iter()
                    .chain(&retry.backends)
                    .chain(&retry.pinned)
                    .copied()
                    .collect();
                let mut values: Vec<(BackendValue, u32)> = ids
                    .into_iter()
                    .filter_map(|id| self.backend_values.get(&id).map(|v| (*v, id)))
                    .collect();
                // The order of `backend_ids`, which the full sync deletes in.
                values.sort_unstable();
                values
            }
        };
        // A frontend of unknown inputs may have a table naming any backend.
        let keep_all = self.unknown_inputs > 0;
        stale_backends.retain(|(_, id)| {
            !keep_all && self.references(*id) == 0 && !failed.pinned.contains(id)
        });
        for (value, id) in stale_backends {
            match maps.delete_backend(id) {
                Ok(()) => {
                    self.backend_ids.remove(&value);
                    self.backend_values.remove(&id);
                    self.backend_id_alloc.free(id);
                    report.backends_deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(backend_id = id, error = %e, "could not delete a stale backend; will retry");
                    failed.backends.insert(id);
                }
            }
        }

        let node_scope = node_scope.map(|(mut scope, visited_keys)| {
            scope.service_ids.extend(
                visited_keys
                    .iter()
                    .filter_map(|k| self.services.get(k))
                    .map(|p| p.value.service_id),
            );
            scope
        });
        self.sync_node(maps, desired, node_scope.as_ref(), &mut failed);
        match maps.purge_affinity(&stale_affinity) {
            Ok(n) => report.affinity_purged = n,
            Err(e) => {
                tracing::warn!(error = %e, "could not purge affinity entries of deleted services/backends")
            }
        }
        self.retry = failed;
        report
    }

    /// Phase 1 for one desired frontend: skipped when its entry is the one programmed, else planned.
    #[allow(clippy::too_many_arguments)]
    fn plan_frontend(
        &mut self,
        maps: &mut impl Maps,
        frontend: &Frontend,
        key: ServiceKey,
        entry: &ServiceEntry,
        pending: &mut Vec<Pending>,
        report: &mut SyncReport,
        failed: &mut Retry,
    ) {
        if let Some(Programmed {
            inputs: Some(_),
            entry: Some(programmed),
            ..
        }) = self.services.get(&key)
            && programmed == entry
        {
            return;
        }
        match self.plan_service(maps, frontend, &key, entry, report) {
            Ok(Planned::Unchanged) => {}
            Ok(Planned::Write(p)) => pending.push(*p),
            Err(reason) => {
                // Keeps whatever it had, as in phase 3.
                failed.frontends.insert(*frontend);
                report.failed.push((*frontend, reason));
            }
        }
    }

    /// Records `p` as programmed under `key`. Every change of `services` goes through here or
    /// [`Reconciler::remove_programmed`], which keep the backend reference counts and the id index.
    fn put_programmed(&mut self, key: ServiceKey, p: Programmed) {
        match &p.inputs {
            Some((_, ids, _)) => {
                for &id in ids {
                    let i = id as usize;
                    if i >= self.backend_refs.len() {
                        self.backend_refs.resize(i + 1, 0);
                    }
                    self.backend_refs[i] += 1;
                }
            }
            None => self.unknown_inputs += 1,
        }
        let id = p.value.service_id;
        if let Some(other) = self.keys_by_id.insert(id, key)
            && other != key
        {
            self.inconsistent("one service id under two keys");
        }
        if let Some(old) = self.services.insert(key, p) {
            if old.value.service_id != id {
                self.inconsistent("a programmed key changed its service id");
            }
            self.release(&old);
        }
    }

    fn remove_programmed(&mut self, key: &ServiceKey) -> Option<Programmed> {
        let old = self.services.remove(key)?;
        if self.keys_by_id.get(&old.value.service_id) == Some(key) {
            self.keys_by_id.remove(&old.value.service_id);
        } else {
            self.inconsistent("a programmed key missing from the id index");
        }
        self.release(&old);
        Some(old)
    }

    /// Drops the references a programmed frontend held.
    fn release(&mut self, old: &Programmed) {
        let Some((_, ids, _)) = &old.inputs else {
            self.unknown_inputs = self.unknown_inputs.saturating_sub(1);
            return;
        };
        for &id in ids {
            match self.backend_refs.get_mut(id as usize) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    if *n == 0 {
                        self.backend_candidates.push(id);
                    }
                }
                _ => self.inconsistent("a backend reference count below zero"),
            }
        }
    }

    fn references(&self, backend_id: u32) -> u32 {
        self.backend_refs
            .get(backend_id as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Rebuilds what the reconciler counts from what it records (programmed frontends, backend ids), so that a
    /// full sync after an inconsistency trusts nothing counted.
    fn recount(&mut self) {
        let mut refs: Vec<u32> = Vec::new();
        let mut unknown = 0;
        let mut keys_by_id = HashMap::with_capacity(self.services.len());
        for (key, p) in &self.services {
            keys_by_id.insert(p.value.service_id, *key);
            let Some((_, ids, _)) = &p.inputs else {
                unknown += 1;
                continue;
            };
            for &id in ids {
                let i = id as usize;
                if i >= refs.len() {
                    refs.resize(i + 1, 0);
                }
                refs[i] += 1;
            }
        }
        self.backend_refs = refs;
        self.unknown_inputs = unknown;
        self.keys_by_id = keys_by_id;
        self.backend_values = self.backend_ids.iter().map(|(v, id)| (*id, *v)).collect();
    }

    /// The counted state disagrees with itself: the next sync is a full one, which recounts.
    fn inconsistent(&mut self, what: &str) {
        tracing::warn!(
            what,
            "reconciler state inconsistent; the next sync visits every frontend"
        );
        self.needs_full = true;
    }

    /// Programs the per-packet datapath's node-level maps: SNAT addresses, this node's networks, the service CIDRs,
    /// the ClusterIP set and the source ranges of programmed services. Adds come before deletes, so a changed entry is never missing.
    /// A new service's ranges are written after its entry: for that instant its LoadBalancer IP drops everything,
    /// the safe side of rule 9.
    ///
    /// With a `scope` only the node-wide entries and the per-service entries of its addresses and service ids are
    /// compared (the rest are unchanged, see [`Reconciler::run`]); in the order the full comparison uses.
    fn sync_node(
        &mut self,
        maps: &mut impl Maps,
        desired: &DesiredState,
        scope: Option<&NodeScope>,
        failed: &mut Retry,
    ) {
        let node = &desired.node;
        let config = ConfigValue {
            snat_v4: node.snat_address(true).map(addr_bytes).unwrap_or([0; 16]),
            snat_v6: node.snat_address(false).map(addr_bytes).unwrap_or([0; 16]),
            flags: self.config_flags,
            _pad: 0,
            host_netns_cookie: self.host_netns_cookie,
        };
        if config != self.config {
            match maps.put_config(&config) {
                Ok(()) => self.config = config,
                Err(e) => tracing::warn!(error = %e, "could not write the datapath configuration"),
            }
        }
        let mut want = BTreeSet::new();
        for &a in &node.addresses {
            let (prefix, addr) = lpm_prefix(a, 128);
            want.insert(NodeEntry::LocalNet {
                prefix,
                addr,
                kind: LOCAL_NET_NODE,
            });
        }
        for &(net, len) in &node.pod_cidrs {
            let (prefix, addr) = lpm_prefix(net, len);
            want.insert(NodeEntry::LocalNet {
                prefix,
                addr,
                kind: LOCAL_NET_POD,
            });
        }
        for &(net, len) in &desired.service_cidrs {
            let (prefix, addr) = lpm_prefix(net, len);
            want.insert(NodeEntry::ServiceCidr { prefix, addr });
        }
        let (added, stale): (Vec<NodeEntry>, Vec<NodeEntry>) = match scope {
            None => {
                for (frontend, entry) in &desired.services {
                    if entry.kind == VipKind::ClusterIp {
                        want.insert(NodeEntry::Vip {
                            addr: addr_bytes(frontend.addr),
                            flags: VIP_FLAG_CLUSTER_IP,
                        });
                    }
                    if entry.source_ranges.is_empty() {
                        continue;
                    }
                    let Some(p) = self.services.get(&service_key(frontend)) else {
                        continue;
                    };
                    insert_src_ranges(&mut want, p.value.service_id, entry);
                }
                (
                    want.difference(&self.node_entries).copied().collect(),
                    self.node_entries.difference(&want).copied().collect(),
                )
            }
            Some(scope) => {
                let mut have: BTreeSet<NodeEntry> = BTreeSet::new();
                have.extend(self.node_entries.range(local_nets()).copied());
                have.extend(self.node_entries.range(service_cidrs()).copied());
                for &addr in &scope.vips {
                    if vip_wanted(desired, addr) {
                        want.insert(NodeEntry::Vip {
                            addr,
                            flags: VIP_FLAG_CLUSTER_IP,
                        });
                    }
                    have.extend(self.node_entries.range(vips_of(addr)).copied());
                }
                for &id in &scope.service_ids {
                    // The frontend programmed under this id, if it is still desired.
                    if let Some(entry) = self
                        .keys_by_id
                        .get(&id)
                        .and_then(|key| desired_entry_of_key(desired, key))
                    {
                        insert_src_ranges(&mut want, id, entry);
                    }
                    have.extend(self.node_entries.range(src_ranges_of(id)).copied());
                }
                (
                    want.difference(&have).copied().collect(),
                    have.difference(&want).copied().collect(),
                )
            }
        };
        for e in &added {
            match maps.put_node_entry(e) {
                Ok(()) => {
                    self.node_entries.insert(*e);
                }
                Err(err) => {
                    failed.node_entry_failed(e);
                    tracing::warn!(entry = ?e, error = %err, "could not write a node entry")
                }
            }
        }
        for e in stale {
            // A changed value under the same key was just written: deleting the old one would delete the new.
            let rewritten = want.range(same_slot(&e)).any(|w| w.same_key(&e));
            if rewritten || maps.delete_node_entry(&e).is_ok() {
                self.node_entries.remove(&e);
            } else {
                failed.node_entry_failed(&e);
            }
        }
    }

    /// Phase 1 for one frontend: writes its new backends, allocates its id, builds its table if that changed.
    /// Writes neither the table nor the service entry (phases 2 and 3 of [`Reconciler::sync`]).
    fn plan_service(
        &mut self,
        maps: &mut impl Maps,
        frontend: &Frontend,
        key: &ServiceKey,
        entry: &ServiceEntry,
        report: &mut SyncReport,
    ) -> Result<Planned, String> {
        let proto = frontend.proto.number();
        let mut ids = Vec::with_capacity(entry.backends.len());
        for b in &entry.backends {
            let value = BackendValue {
                flags: if b.local { BACKEND_FLAG_LOCAL } else { 0 },
                ..BackendValue::new(b.addr, b.port, proto)
            };
            let id = match self.backend_ids.get(&value) {
                Some(id) => *id,
                None => {
                    let id = self.backend_id_alloc.allocate().ok_or_else(|| {
                        format!(
                            "backend capacity ({}) reached: cannot add {b}",
                            self.cfg.max_backends - 1
                        )
                    })?;
                    let written = maps
                        .reset_backend_stats(id)
                        .and_then(|()| maps.put_backend(id, &value));
                    if let Err(e) = written {
                        self.backend_id_alloc.free(id);
                        return Err(e.to_string());
                    }
                    self.backend_ids.insert(value, id);
                    self.backend_values.insert(id, value);
                    // Unused if this frontend fails later on.
                    self.backend_candidates.push(id);
                    report.backends_written += 1;
                    id
                }
            };
            ids.push(id);
        }

        // The remembered entry is not needed here (and cloning it is not free).
        let previous = self
            .services
            .get(key)
            .map(|p| (p.value, p.inputs.clone(), p.entry_deleted));
        let inputs = (
            entry.algorithm,
            ids.clone(),
            self.table_size(entry.algorithm, ids.len()),
        );
        let (slots, table_hash) = match &previous {
            Some((value, previous_inputs, _)) if previous_inputs.as_ref() == Some(&inputs) => {
                (None, value.table_hash)
            }
            _ => {
                let slots = self.build_slots(entry, &ids, inputs.2)?;
                let hash = table_hash(entry.algorithm, &slots);
                (Some(slots), hash)
            }
        };

        let service_id = match &previous {
            Some((value, _, _)) => value.service_id,
            None => {
                let id = self.service_ids.allocate().ok_or_else(|| {
                    format!("service capacity ({}) reached", self.cfg.max_services - 1)
                })?;
                if let Err(e) = maps.reset_service_stats(id) {
                    self.service_ids.free(id);
                    return Err(e.to_string());
                }
                id
            }
        };
        let value = ServiceValue {
            service_id,
            backend_count: ids.len() as u32,
            affinity_timeout: entry.affinity_timeout.unwrap_or(0),
            algorithm: entry.algorithm.number(),
            flags: if entry.drop_if_empty {
                SVC_FLAG_DROP_NO_BACKEND
            } else {
                0
            } | if entry.source_ranges.is_empty() {
                0
            } else {
                SVC_FLAG_SOURCE_RANGES
            },
            _pad: [0; 2],
            table_hash,
        };
        if let Some((previous_value, _, false)) = &previous
            && *previous_value == value
        {
            self.put_programmed(
                *key,
                Programmed {
                    value,
                    inputs: Some(inputs),
                    entry: Some(entry.clone()),
                    entry_deleted: false,
                },
            );
            return Ok(Planned::Unchanged);
        }

        let table_changed = previous
            .as_ref()
            .is_none_or(|(v, _, _)| v.table_hash != table_hash);
        // Backends that leave a service must not keep its clients through affinity, nor through sockets connected
        // to them. Read before the table is replaced: after a restart the previous set is known only from the table.
        let previous_ids: Option<Vec<u32>> = match &previous {
            Some((_, previous_inputs, _)) if table_changed => Some(match previous_inputs {
                Some((_, before, _)) => before.clone(),
                None => maps.table(service_id).ok().flatten().unwrap_or_default(),
            }),
            _ => None,
        };
        let table = if table_changed && !ids.is_empty() {
            match slots {
                Some(s) => Some(s),
                None => match self.build_slots(entry, &ids, inputs.2) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        if previous.is_none() {
                            self.service_ids.free(service_id);
                        }
                        return Err(e);
                    }
                },
            }
        } else {
            None
        };
        Ok(Planned::Write(Box::new(Pending {
            frontend: *frontend,
            key: *key,
            value,
            inputs,
            ids,
            table,
            previous_ids,
            previous: previous.map(|(v, _, _)| v),
            entry: entry.clone(),
        })))
    }

    fn table_size(&self, algorithm: Algorithm, backends: usize) -> u32 {
        match algorithm {
            Algorithm::Maglev => maglev::stable_table_size(
                backends,
                self.cfg.maglev_min_size,
                self.cfg.maglev_max_size,
            ),
            Algorithm::Random => backends as u32,
        }
    }

    /// The lookup table: Maglev slots, or the plain backend list for random selection.
    fn build_slots(
        &self,
        entry: &ServiceEntry,
        ids: &[u32],
        size: u32,
    ) -> Result<Vec<u32>, String> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        match entry.algorithm {
            Algorithm::Random => Ok(ids.to_vec()),
            Algorithm::Maglev => {
                let keys: Vec<String> = entry.backends.iter().map(|b| b.to_string()).collect();
                let input: Vec<maglev::MaglevBackend<'_>> = keys
                    .iter()
                    .zip(&entry.backends)
                    .map(|(k, b)| maglev::MaglevBackend {
                        key: k.as_bytes(),
                        weight: b.weight,
                    })
                    .collect();
                let table = maglev::build_table(&input, size).map_err(|e| e.to_string())?;
                Ok(table.into_iter().map(|i| ids[i as usize]).collect())
            }
        }
    }

    /// The backends a deleted service leaves, for affinity purges and departures.
    fn backend_ids_of_key(&self, key: &ServiceKey) -> Vec<u32> {
        let Some(p) = self.services.get(key) else {
            return Vec::new();
        };
        p.inputs
            .as_ref()
            .map(|(_, ids, _)| ids.clone())
            .unwrap_or_else(|| {
                // After a restart the inputs are unknown until the first successful write: any backend may be named.
                self.backend_values.keys().copied().collect()
            })
    }

    /// Forgets the remembered desired entries, so the next sync plans every frontend in full (the reference the
    /// skip of unchanged entries is tested against).
    #[cfg(test)]
    fn forget_entries(&mut self) {
        for p in self.services.values_mut() {
            p.entry = None;
        }
    }

    /// Backend id → backend, for listings.
    pub fn backends(&self) -> HashMap<u32, BackendValue> {
        self.backend_values.clone()
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey::new(f.addr, f.port, f.proto.number(), f.scope.number())
}

/// The other spelling of a frontend's address in lb's 16-byte form (IPv4 and IPv4-mapped IPv6), if any.
fn alias(f: &Frontend) -> Option<Frontend> {
    let addr = match f.addr {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        IpAddr::V6(a) => IpAddr::V4(a.to_ipv4_mapped()?),
    };
    Some(Frontend { addr, ..*f })
}

/// The addresses whose 16-byte form is `bytes`: the IPv6 one, and the IPv4 one when it is IPv4-mapped.
fn addrs_of(bytes: [u8; 16]) -> impl Iterator<Item = IpAddr> {
    let v6 = Ipv6Addr::from(bytes);
    [Some(IpAddr::V6(v6)), v6.to_ipv4_mapped().map(IpAddr::V4)]
        .into_iter()
        .flatten()
}

/// Every protocol: the match makes a new variant a compile error here rather than a frontend the lookups below
/// cannot find.
fn protocols() -> [Protocol; 3] {
    let all = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
    for p in all {
        match p {
            Protocol::Tcp | Protocol::Udp | Protocol::Sctp => {}
        }
    }
    all
}

/// Every scope (see [`protocols`]).
fn scopes() -> [Scope; 2] {
    let all = [Scope::External, Scope::Internal];
    for s in all {
        match s {
            Scope::External | Scope::Internal => {}
        }
    }
    all
}

/// The desired entry of the frontend with this key, if one is desired.
fn desired_entry_of_key<'a>(
    desired: &'a DesiredState,
    key: &ServiceKey,
) -> Option<&'a ServiceEntry> {
    let proto = protocols().into_iter().find(|p| p.number() == key.proto)?;
    let scope = scopes().into_iter().find(|s| s.number() == key.scope)?;
    addrs_of(key.addr).find_map(|addr| {
        desired.services.get(&Frontend {
            addr,
            port: key.port,
            proto,
            scope,
        })
    })
}

/// Whether some desired ClusterIP frontend has this address: `desired.services` is ordered by frontend, whose
/// first field is the address, so its frontends are one range.
fn vip_wanted(desired: &DesiredState, bytes: [u8; 16]) -> bool {
    let min_proto = protocols().into_iter().min().unwrap_or(Protocol::Tcp);
    let min_scope = scopes().into_iter().min().unwrap_or(Scope::External);
    addrs_of(bytes).any(|addr| {
        let first = Frontend {
            addr,
            port: 0,
            proto: min_proto,
            scope: min_scope,
        };
        desired
            .services
            .range(first..)
            .take_while(|(f, _)| f.addr == addr)
            .any(|(_, e)| e.kind == VipKind::ClusterIp)
    })
}

fn insert_src_ranges(want: &mut BTreeSet<NodeEntry>, service_id: u32, entry: &ServiceEntry) {
    for &(net, len) in &entry.source_ranges {
        let (prefix, addr) = lpm_prefix(net, len);
        want.insert(NodeEntry::SrcRange {
            service_id,
            prefix,
            addr,
        });
    }
}

// Ranges of `NodeEntry` (ordered by variant, then by its fields in declaration order).

fn local_nets() -> RangeInclusive<NodeEntry> {
    NodeEntry::LocalNet {
        prefix: 0,
        addr: [0; 16],
        kind: 0,
    }..=NodeEntry::LocalNet {
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
        kind: u8::MAX,
    }
}

fn service_cidrs() -> RangeInclusive<NodeEntry> {
    NodeEntry::ServiceCidr {
        prefix: 0,
        addr: [0; 16],
    }..=NodeEntry::ServiceCidr {
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
    }
}

fn vips_of(addr: [u8; 16]) -> RangeInclusive<NodeEntry> {
    NodeEntry::Vip { addr, flags: 0 }..=NodeEntry::Vip {
        addr,
        flags: u8::MAX,
    }
}

fn src_ranges_of(service_id: u32) -> RangeInclusive<NodeEntry> {
    NodeEntry::SrcRange {
        service_id,
        prefix: 0,
        addr: [0; 16],
    }..=NodeEntry::SrcRange {
        service_id,
        prefix: u32::MAX,
        addr: [u8::MAX; 16],
    }
}

/// The entries that are one map slot with `e` ([`NodeEntry::same_key`]).
fn same_slot(e: &NodeEntry) -> RangeInclusive<NodeEntry> {
    match *e {
        NodeEntry::LocalNet { prefix, addr, .. } => {
            NodeEntry::LocalNet {
                prefix,
                addr,
                kind: 0,
            }..=NodeEntry::LocalNet {
                prefix,
                addr,
                kind: u8::MAX,
            }
        }
        NodeEntry::Vip { addr, .. } => vips_of(addr),
        other => other..=other,
    }
}

/// FNV-1a over the algorithm and slots: a fingerprint, not a security boundary.
fn table_hash(algorithm: Algorithm, slots: &[u32]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut eat = |b: u8| {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    };
    eat(algorithm.number());
    for s in slots {
        s.to_le_bytes().into_iter().for_each(&mut eat);
    }
    h
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::datapath::maps::FakeMaps;
    use crate::state::{Backend, Protocol, Scope, ServicePortName, VipKind};

    fn frontend(ip: &str, port: u16) -> Frontend {
        Frontend {
            addr: ip.parse().expect("ip"),
            port,
            proto: Protocol::Tcp,
            scope: Scope::Internal,
        }
    }

    fn entry(backends: &[&str], algorithm: Algorithm) -> ServiceEntry {
        ServiceEntry {
            service: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: String::new(),
            },
            kind: VipKind::ClusterIp,
            algorithm,
            affinity_timeout: None,
            backends: backends
                .iter()
                .map(|b| Backend {
                    addr: b.parse::<IpAddr>().expect("ip"),
                    port: 8080,
                    weight: 1,
                    local: true,
                })
                .collect(),
            drop_if_empty: false,
            source_ranges: vec![],
        }
    }

    fn state(entries: Vec<(Frontend, ServiceEntry)>) -> DesiredState {
        DesiredState {
            services: entries.into_iter().collect(),
            ..DesiredState::default()
        }
    }

    fn small_cfg() -> ReconcileConfig {
        ReconcileConfig {
            max_services: 16,
            max_backends: 16,
            maglev_min_size: 251,
            maglev_max_size: 251,
        }
    }

    #[test]
    fn first_sync_writes_backends_then_table_then_service() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let desired = state(vec![(
            frontend("10.96.0.1", 80),
            entry(&["10.0.0.1", "10.0.0.2"], Algorithm::Maglev),
        )]);
        let report = r.sync(&mut maps, &desired);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(
            maps.log,
            vec![
                "put_backend 1",
                "put_backend 2",
                "put_tables 1",
                "put_service 1"
            ]
        );
        let table = &maps.tables[&1];
        assert_eq!(table.len(), 251);
        assert!(
            table.contains(&1) && table.contains(&2),
            "both backends own slots"
        );
        let v = maps.services.values().next().expect("service");
        assert_eq!((v.backend_count, v.algorithm), (2, lb_common::ALG_MAGLEV));
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let desired = state(vec![(
            frontend("10.96.0.1", 80),
            entry(&["10.0.0.1"], Algorithm::Maglev),
        )]);
        r.sync(&mut maps, &desired);
        maps.log.clear();
        let report = r.sync(&mut maps, &desired);
        assert!(!report.changed());
        assert!(maps.log.is_empty(), "{:?}", maps.log);
    }

    #[test]
    fn restart_adopts_ids_and_rewrites_no_identical_table() {
        let mut maps = FakeMaps::default();
        let desired = state(vec![
            (
                frontend("10.96.0.1", 80),
                entry(&["10.0.0.1", "10.0.0.2"], Algorithm::Maglev),
            ),
            (
                frontend("10.96.0.2", 53),
                entry(&["10.0.0.3"], Algorithm::Random),
            ),
        ]);
        Reconciler::restore(&maps, small_cfg())
            .expect("restore")
            .sync(&mut maps, &desired);
        let before = maps.services.clone();
        maps.log.clear();
        let mut restarted = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let report = restarted.sync(&mut maps, &desired);
        assert!(!report.changed(), "{report:?}");
        assert!(maps.log.is_empty(), "a restart rewrote {:?}", maps.log);
        assert_eq!(maps.services, before);
    }

    #[test]
    fn removed_service_is_deleted_after_writes_and_its_backends_freed() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        r.sync(
            &mut maps,
            &state(vec![
                (
                    frontend("10.96.0.1", 80),
                    entry(&["10.0.0.1"], Algorithm::Random),
                ),
                (
                    frontend("10.96.0.2", 80),
                    entry(&["10.0.0.2"], Algorithm::Random),
                ),
            ]),
        );
        maps.log.clear();
        let report = r.sync(
            &mut maps,
            &state(vec![(
                frontend("10.96.0.1", 80),
                entry(&["10.0.0.1", "10.0.0.3"], Algorithm::Random),
            )]),
        );
        assert_eq!((report.services_deleted, report.backends_deleted), (1, 1));
        assert_eq!(
            maps.log,
            vec![
                "put_backend 3",
                "put_tables 1",
                "put_service 1",
                "delete_service 2",
                "delete_tables 2",
                "delete_backend 2"
            ]
        );
        assert_eq!(maps.tables[&1], vec![1, 3]);
    }

    #[test]
    fn backend_shared_by_two_services_survives_one_deletion() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        r.sync(
            &mut maps,
            &state(vec![
                (
                    frontend("10.96.0.1", 80),
                    entry(&["10.0.0.1"], Algorithm::Random),
                ),
                (
                    frontend("10.96.0.2", 80),
                    entry(&["10.0.0.1"], Algorithm::Random),
                ),
            ]),
        );
        assert_eq!(
            maps.backends.len(),
            1,
            "one backend id for one (addr, port, proto)"
        );
        r.sync(
            &mut maps,
            &state(vec![(
                frontend("10.96.0.1", 80),
                entry(&["10.0.0.1"], Algorithm::Random),
            )]),
        );
        assert_eq!(maps.backends.len(), 1);
    }

    #[test]
    fn service_without_backends_has_no_table_and_count_zero() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let fe = frontend("10.96.0.1", 80);
        r.sync(
            &mut maps,
            &state(vec![(fe, entry(&["10.0.0.1"], Algorithm::Maglev))]),
        );
        r.sync(&mut maps, &state(vec![(fe, entry(&[], Algorithm::Maglev))]));
        let v = maps.services.values().next().expect("service");
        assert_eq!(v.backend_count, 0);
        assert!(
            maps.tables.is_empty(),
            "table of an empty service is removed"
        );
        assert!(maps.backends.is_empty());
    }

    #[test]
    fn capacity_failure_names_the_frontend_and_keeps_the_rest() {
        let mut maps = FakeMaps::default();
        let cfg = ReconcileConfig {
            max_services: 3,
            ..small_cfg()
        };
        let mut r = Reconciler::restore(&maps, cfg).expect("restore");
        let desired = state(
            (1..=4)
                .map(|i| {
                    (
                        frontend(&format!("10.96.0.{i}"), 80),
                        entry(&["10.0.0.1"], Algorithm::Random),
                    )
                })
                .collect(),
        );
        let report = r.sync(&mut maps, &desired);
        assert_eq!(maps.services.len(), 2, "ids 1 and 2 fit under a limit of 3");
        assert_eq!(report.failed.len(), 2);
        assert!(
            report.failed[0].1.contains("capacity"),
            "{:?}",
            report.failed
        );
    }

    fn with_affinity(mut e: ServiceEntry) -> ServiceEntry {
        e.affinity_timeout = Some(10);
        e
    }

    fn affinity(
        service_id: u32,
        cookie: u64,
        backend_id: u32,
    ) -> (lb_common::AffinityKey, lb_common::AffinityValue) {
        (
            lb_common::AffinityKey {
                netns_cookie: cookie,
                client_addr: [0; 16],
                service_id,
                _pad: 0,
            },
            lb_common::AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns: 1,
            },
        )
    }

    #[test]
    fn backend_leaving_a_service_loses_its_affinity_there_but_not_elsewhere() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let (a, b) = (frontend("10.96.0.1", 80), frontend("10.96.0.2", 80));
        r.sync(
            &mut maps,
            &state(vec![
                (
                    a,
                    with_affinity(entry(&["10.0.0.1", "10.0.0.2"], Algorithm::Random)),
                ),
                (b, with_affinity(entry(&["10.0.0.2"], Algorithm::Random))),
            ]),
        );
        // Backend 2 (10.0.0.2) serves both services; clients of both stick to it.
        maps.affinity = vec![affinity(1, 1, 1), affinity(1, 2, 2), affinity(2, 3, 2)];
        let report = r.sync(
            &mut maps,
            &state(vec![
                (a, with_affinity(entry(&["10.0.0.1"], Algorithm::Random))),
                (b, with_affinity(entry(&["10.0.0.2"], Algorithm::Random))),
            ]),
        );
        assert_eq!(report.affinity_purged, 1);
        assert_eq!(maps.affinity, vec![affinity(1, 1, 1), affinity(2, 3, 2)]);
    }

    #[test]
    fn deleted_service_affinity_is_purged_after_restart_too() {
        let mut maps = FakeMaps::default();
        let (a, b) = (frontend("10.96.0.1", 80), frontend("10.96.0.2", 80));
        Reconciler::restore(&maps, small_cfg())
            .expect("restore")
            .sync(
                &mut maps,
                &state(vec![
                    (
                        a,
                        with_affinity(entry(&["10.0.0.1", "10.0.0.2"], Algorithm::Random)),
                    ),
                    (b, with_affinity(entry(&["10.0.0.3"], Algorithm::Random))),
                ]),
            );
        maps.affinity = vec![affinity(1, 1, 1), affinity(1, 2, 2), affinity(2, 3, 3)];
        let mut restarted = Reconciler::restore(&maps, small_cfg()).expect("restore");
        restarted.sync(
            &mut maps,
            &state(vec![(
                a,
                with_affinity(entry(&["10.0.0.1"], Algorithm::Random)),
            )]),
        );
        assert_eq!(
            maps.affinity,
            vec![affinity(1, 1, 1)],
            "backend 2 left service 1; service 2 is gone"
        );
    }

    fn many(n: u8, backends: &[&str]) -> DesiredState {
        state(
            (1..=n)
                .map(|i| {
                    (
                        frontend(&format!("10.96.0.{i}"), 80),
                        entry(backends, Algorithm::Maglev),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn many_changed_services_install_their_tables_in_one_batch() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let report = r.sync(&mut maps, &many(5, &["10.0.0.1", "10.0.0.2"]));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(report.tables_written, 5);
        assert_eq!(
            maps.log,
            vec![
                "put_backend 1",
                "put_backend 2",
                "put_tables 1,2,3,4,5",
                "put_service 1",
                "put_service 2",
                "put_service 3",
                "put_service 4",
                "put_service 5",
            ]
        );
        // An endpoint change in every service: one batch again, backends before it, deletes after everything.
        maps.log.clear();
        let report = r.sync(&mut maps, &many(5, &["10.0.0.1", "10.0.0.3"]));
        assert_eq!(
            maps.log
                .iter()
                .filter(|l| l.starts_with("put_tables"))
                .count(),
            1,
            "{:?}",
            maps.log
        );
        assert_eq!(maps.log.first().map(String::as_str), Some("put_backend 3"));
        assert_eq!(
            maps.log.last().map(String::as_str),
            Some("delete_backend 2")
        );
        assert_eq!(
            report.departed.len(),
            5,
            "backend 2 left each of the 5 services"
        );
        // Removing them all: entries first, then their tables in one batch, then the backends.
        maps.log.clear();
        r.sync(&mut maps, &state(vec![]));
        assert_eq!(
            maps.log,
            vec![
                "delete_service 1",
                "delete_service 2",
                "delete_service 3",
                "delete_service 4",
                "delete_service 5",
                "delete_tables 1,2,3,4,5",
                "delete_backend 1",
                "delete_backend 3",
            ]
        );
        assert!(maps.tables.is_empty() && maps.services.is_empty());
    }

    #[test]
    fn a_failed_table_fails_only_its_frontend_and_writes_no_entry_for_it() {
        let mut maps = FakeMaps::default();
        maps.fail_tables.insert(2);
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let report = r.sync(&mut maps, &many(3, &["10.0.0.1"]));
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert_eq!(report.failed[0].0, frontend("10.96.0.2", 80));
        assert_eq!((report.services_written, report.tables_written), (2, 2));
        assert_eq!(
            maps.log,
            vec![
                "put_backend 1",
                "put_tables 1,2,3",
                "put_service 1",
                "put_service 3"
            ]
        );
        // The failed frontend's id went back to the pool; once the kernel accepts, the next sync programs it.
        maps.fail_tables.clear();
        maps.log.clear();
        let report = r.sync(&mut maps, &many(3, &["10.0.0.1"]));
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(maps.log, vec!["put_tables 4", "put_service 4"]);
        assert_eq!(maps.services.len(), 3);
    }

    #[test]
    fn a_failed_table_update_keeps_the_old_table_and_backends() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let fe = frontend("10.96.0.1", 80);
        r.sync(
            &mut maps,
            &state(vec![(fe, entry(&["10.0.0.1"], Algorithm::Random))]),
        );
        maps.fail_tables.insert(1);
        let report = r.sync(
            &mut maps,
            &state(vec![(fe, entry(&["10.0.0.2"], Algorithm::Random))]),
        );
        assert_eq!(report.failed.len(), 1);
        assert!(report.departed.is_empty(), "{report:?}");
        assert_eq!(maps.tables[&1], vec![1], "the old table still serves");
        assert!(
            maps.backends.contains_key(&1),
            "the old table's backend is kept"
        );
        assert_eq!(
            maps.services.values().next().map(|v| v.backend_count),
            Some(1)
        );
    }

    #[test]
    fn id_allocator_does_not_reuse_a_freed_id_at_once() {
        let mut a = IdAllocator::new(5);
        assert_eq!((a.allocate(), a.allocate()), (Some(1), Some(2)));
        a.free(1);
        assert_eq!(a.allocate(), Some(3));
        assert_eq!(a.allocate(), Some(4));
        assert_eq!(a.allocate(), Some(1), "wraps around to the freed id");
        assert_eq!(a.allocate(), None);
    }

    /// The skip of unchanged entries must be invisible: over random changes (backends in and out, algorithm,
    /// affinity, drop flag, frontends added and deleted, table bounds changed, capacities exceeded so that some
    /// writes fail), a reconciler that remembers its entries writes exactly what one planning everything in full
    /// writes, in the same order, and reports the same.
    #[test]
    fn skipping_unchanged_entries_writes_what_a_full_plan_writes() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let cfg = ReconcileConfig {
            max_services: 8,
            max_backends: 12,
            maglev_min_size: 251,
            maglev_max_size: 1021,
        };
        let mut fast_maps = FakeMaps::default();
        let mut full_maps = FakeMaps::default();
        let mut fast = Reconciler::restore(&fast_maps, cfg.clone()).expect("restore");
        let mut full = Reconciler::restore(&full_maps, cfg).expect("restore");
        let mut desired: BTreeMap<Frontend, ServiceEntry> = BTreeMap::new();
        let mut skipped_some = false;
        for step in 0..2000 {
            let f = frontend(&format!("10.96.0.{}", 1 + next(9)), 80);
            match next(8) {
                0 => {
                    desired.remove(&f);
                }
                1 => {
                    if let Some(e) = desired.get_mut(&f) {
                        e.algorithm = match e.algorithm {
                            Algorithm::Maglev => Algorithm::Random,
                            Algorithm::Random => Algorithm::Maglev,
                        };
                    }
                }
                2 => {
                    if let Some(e) = desired.get_mut(&f) {
                        e.affinity_timeout = [None, Some(10800), Some(60)][next(3) as usize];
                        e.drop_if_empty = next(2) == 0;
                    }
                }
                3 => {
                    let (min, max) = [(251, 1021), (509, 509), (251, 251)][next(3) as usize];
                    fast.set_maglev_sizes(Some(min), Some(max));
                    full.set_maglev_sizes(Some(min), Some(max));
                }
                _ => {
                    let e = desired
                        .entry(f)
                        .or_insert_with(|| entry(&[], Algorithm::Maglev));
                    let b = Backend {
                        addr: format!("10.1.0.{}", 1 + next(16)).parse().expect("ip"),
                        port: 8080,
                        weight: 1,
                        local: next(2) == 0,
                    };
                    match e.backends.binary_search(&b) {
                        Ok(i) => {
                            e.backends.remove(i);
                        }
                        Err(i) => e.backends.insert(i, b),
                    }
                }
            }
            let state = DesiredState {
                services: desired.clone(),
                ..DesiredState::default()
            };
            let skippable = fast.services.values().filter(|p| p.entry.is_some()).count();
            skipped_some |= skippable > 0 && !fast_maps.log.is_empty();
            full.forget_entries();
            let fast_report = fast.sync(&mut fast_maps, &state);
            let full_report = full.sync(&mut full_maps, &state);
            assert_eq!(fast_report, full_report, "step {step}");
            assert_eq!(fast_maps.log, full_maps.log, "step {step}");
            assert_eq!(fast_maps.services, full_maps.services, "step {step}");
            assert_eq!(fast_maps.backends, full_maps.backends, "step {step}");
            assert_eq!(fast_maps.tables, full_maps.tables, "step {step}");
            assert_eq!(fast.service_ids(), full.service_ids(), "step {step}");
        }
        assert!(skipped_some, "the skip was never exercised");
    }

    impl Reconciler {
        /// Everything the reconciler remembers (but the per-sync scratch), to compare two of them.
        fn snapshot(&self) -> String {
            let mut refs = self.backend_refs.clone();
            while refs.last() == Some(&0) {
                refs.pop();
            }
            format!(
                "{:?}",
                (
                    &self.services,
                    &self.backend_ids,
                    self.backend_values.iter().collect::<BTreeMap<_, _>>(),
                    refs,
                    self.keys_by_id.iter().collect::<BTreeMap<_, _>>(),
                    self.unknown_inputs,
                    &self.retry,
                    (self.needs_full, self.aliased),
                    (&self.service_ids, &self.backend_id_alloc),
                    &self.node_entries,
                    self.config,
                )
            )
        }

        /// The counted state agrees with what it counts.
        fn check_counts(&self) {
            let mut refs: Vec<u32> = Vec::new();
            for p in self.services.values() {
                for &id in p.inputs.iter().flat_map(|(_, ids, _)| ids) {
                    if refs.len() <= id as usize {
                        refs.resize(id as usize + 1, 0);
                    }
                    refs[id as usize] += 1;
                    assert!(
                        self.backend_values.contains_key(&id),
                        "backend {id} in use but forgotten"
                    );
                }
            }
            let mut counted = self.backend_refs.clone();
            counted.resize(counted.len().max(refs.len()), 0);
            refs.resize(counted.len(), 0);
            assert_eq!(counted, refs, "backend reference counts");
            let keys: HashMap<u32, ServiceKey> = self
                .services
                .iter()
                .map(|(k, p)| (p.value.service_id, *k))
                .collect();
            assert_eq!(self.keys_by_id, keys, "service id index");
            let unknown = self
                .services
                .values()
                .filter(|p| p.inputs.is_none())
                .count();
            assert_eq!(self.unknown_inputs, unknown);
            let values: HashMap<u32, BackendValue> =
                self.backend_ids.iter().map(|(v, id)| (*id, *v)).collect();
            assert_eq!(self.backend_values, values);
            // And what the counts decide: no backend outlives its last user unless its delete failed, or a failed
            // entry write pinned it, or a frontend of unknown inputs may name it.
            if self.unknown_inputs == 0 {
                for id in self.backend_ids.values() {
                    assert!(
                        refs.get(*id as usize).is_some_and(|n| *n > 0)
                            || self.retry.pinned.contains(id)
                            || self.retry.backends.contains(id),
                        "backend {id} unused but kept"
                    );
                }
            }
        }
    }

    fn assert_same_maps(a: &FakeMaps, b: &FakeMaps, step: usize) {
        assert_eq!(a.log, b.log, "step {step}: writes");
        assert_eq!(a.node_log, b.node_log, "step {step}: node writes");
        assert_eq!(a.stats_resets, b.stats_resets, "step {step}: stats resets");
        assert_eq!(a.services, b.services, "step {step}");
        assert_eq!(a.backends, b.backends, "step {step}");
        assert_eq!(a.tables, b.tables, "step {step}");
        assert_eq!(a.affinity, b.affinity, "step {step}");
        assert_eq!(a.node, b.node, "step {step}");
        assert_eq!(a.config, b.config, "step {step}");
    }

    /// `sync_changed` told exactly what changed must be indistinguishable from `sync`: over random additions,
    /// changes and removals of frontends and backends, node and service CIDR changes, restarts, table size changes
    /// and injected failures (table installs, entry/table/backend/node-entry deletes and writes, both capacities),
    /// the two write the same things in the same order, report the same and remember the same.
    #[test]
    fn sync_changed_writes_what_a_full_sync_writes() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let cfg = ReconcileConfig {
            max_services: 16,
            max_backends: 20,
            maglev_min_size: 251,
            maglev_max_size: 1021,
        };
        let range_sets: [Vec<(IpAddr, u8)>; 3] = [
            vec![],
            vec![("192.0.2.0".parse().expect("ip"), 24)],
            vec![
                ("198.51.100.0".parse().expect("ip"), 24),
                ("2001:db8::".parse().expect("ip"), 32),
            ],
        ];
        let addr = |i: u64| -> IpAddr { format!("10.96.0.{}", 1 + i).parse().expect("ip") };
        let mut full_maps = FakeMaps::default();
        let mut inc_maps = FakeMaps::default();
        let mut full = Reconciler::restore(&full_maps, cfg.clone()).expect("restore");
        let mut inc = Reconciler::restore(&inc_maps, cfg.clone()).expect("restore");
        let mut desired = DesiredState::default();
        let (mut partial, mut partial_failed, mut partial_deleted, mut partial_node, mut retried) =
            (0, 0, 0, 0, 0);
        let mut partial_clean = 0;
        for step in 0..4000 {
            let before = desired.services.clone();
            for _ in 0..1 + next(3) {
                let f = Frontend {
                    addr: addr(next(6)),
                    port: 80 + next(2) as u16,
                    proto: Protocol::Tcp,
                    scope: if next(2) == 0 {
                        Scope::Internal
                    } else {
                        Scope::External
                    },
                };
                match next(12) {
                    0..=3 => {
                        desired.services.remove(&f);
                    }
                    4 => {
                        if let Some(e) = desired.services.get_mut(&f) {
                            e.algorithm = match e.algorithm {
                                Algorithm::Maglev => Algorithm::Random,
                                Algorithm::Random => Algorithm::Maglev,
                            };
                        }
                    }
                    5 => {
                        if let Some(e) = desired.services.get_mut(&f) {
                            e.affinity_timeout = [None, Some(10800), Some(60)][next(3) as usize];
                            e.drop_if_empty = next(2) == 0;
                        }
                    }
                    6 => {
                        if let Some(e) = desired.services.get_mut(&f) {
                            e.kind = [VipKind::ClusterIp, VipKind::LoadBalancer][next(2) as usize];
                            e.source_ranges = range_sets[next(3) as usize].clone();
                        }
                    }
                    _ => {
                        let e = desired
                            .services
                            .entry(f)
                            .or_insert_with(|| entry(&[], Algorithm::Maglev));
                        let octet = 1 + next(11);
                        // Now and then the same address both local and not: a plan failure after its backends
                        // are written (their Maglev keys collide).
                        let b = Backend {
                            addr: format!("10.1.0.{octet}").parse().expect("ip"),
                            port: 8080,
                            weight: 1,
                            local: if next(10) == 0 {
                                octet % 2 == 1
                            } else {
                                octet % 2 == 0
                            },
                        };
                        match e.backends.binary_search(&b) {
                            Ok(i) => {
                                e.backends.remove(i);
                            }
                            Err(i) => e.backends.insert(i, b),
                        }
                    }
                }
            }
            if next(10) == 0 {
                let pick = |n: u64| n == 0;
                desired.node.addresses = [("192.168.0.10", next(2)), ("fd00::10", next(2))]
                    .into_iter()
                    .filter(|(_, n)| pick(*n))
                    .map(|(a, _)| a.parse().expect("ip"))
                    .collect();
                desired.node.pod_cidrs = if next(2) == 0 {
                    vec![("10.244.1.0".parse().expect("ip"), 24)]
                } else {
                    vec![]
                };
                desired.service_cidrs = [
                    vec![],
                    vec![("10.96.0.0".parse().expect("ip"), 16)],
                    vec![("10.96.0.0".parse().expect("ip"), 12)],
                ][next(3) as usize]
                    .clone();
            }
            match next(200) {
                0 => {
                    full = Reconciler::restore(&full_maps, cfg.clone()).expect("restore");
                    inc = Reconciler::restore(&inc_maps, cfg.clone()).expect("restore");
                }
                1..=3 => {
                    let (min, max) = [(251, 1021), (509, 509), (251, 251)][next(3) as usize];
                    full.set_maglev_sizes(Some(min), Some(max));
                    inc.set_maglev_sizes(Some(min), Some(max));
                }
                4..=30 => {
                    // New failures, or (as often) none, so that the retries get through.
                    let none = next(2) == 0;
                    let mut ids = |n: u64| -> HashSet<u32> {
                        if none {
                            return HashSet::new();
                        }
                        (1..n as u32).filter(|_| next(8) == 0).collect()
                    };
                    let (tables, services, table_deletes, backends) =
                        (ids(16), ids(16), ids(16), ids(20));
                    let mut node: HashSet<NodeEntry> = HashSet::new();
                    if !none {
                        for i in 0..6 {
                            if next(4) == 0 {
                                node.insert(NodeEntry::Vip {
                                    addr: addr_bytes(addr(i)),
                                    flags: VIP_FLAG_CLUSTER_IP,
                                });
                            }
                        }
                        for id in 1..16 {
                            for ranges in &range_sets {
                                if next(8) == 0 {
                                    insert_src_ranges_of(&mut node, id, ranges);
                                }
                            }
                        }
                    }
                    let max_services = [None, None, None, Some(6), Some(10)][next(5) as usize];
                    for m in [&mut full_maps, &mut inc_maps] {
                        m.fail_tables = tables.clone();
                        m.fail_service_deletes = services.clone();
                        m.fail_table_deletes = table_deletes.clone();
                        m.fail_backend_deletes = backends.clone();
                        m.fail_node_entries = node.clone();
                        m.max_services = max_services;
                    }
                }
                _ => {}
            }
            let affinity: Vec<_> = (0..next(4))
                .map(|_| affinity(1 + next(15) as u32, next(3), 1 + next(19) as u32))
                .collect();
            full_maps.affinity = affinity.clone();
            inc_maps.affinity = affinity;

            let mut changed: BTreeSet<Frontend> = before
                .keys()
                .chain(desired.services.keys())
                .filter(|f| before.get(f) != desired.services.get(f))
                .copied()
                .collect();
            if next(8) == 0
                && let Some(f) = desired.services.keys().nth(next(4) as usize)
            {
                // Naming an unchanged frontend is allowed.
                changed.insert(*f);
            }
            let is_partial = !inc.needs_full_sync();
            let retrying = inc.retry != Retry::default();
            let full_report = full.sync(&mut full_maps, &desired);
            let inc_report = inc.sync_changed(&mut inc_maps, &desired, &changed);
            assert_eq!(inc_report, full_report, "step {step}");
            assert_same_maps(&inc_maps, &full_maps, step);
            assert_eq!(inc.snapshot(), full.snapshot(), "step {step}");
            inc.check_counts();
            full.check_counts();
            if is_partial {
                partial += 1;
                partial_failed += usize::from(!inc_report.failed.is_empty());
                partial_clean += usize::from(inc.retry == Retry::default());
                partial_deleted += usize::from(inc_report.backends_deleted > 0);
                partial_node += usize::from(!inc_maps.node_log.is_empty());
                retried += usize::from(retrying);
            }
            for m in [&mut full_maps, &mut inc_maps] {
                m.log.clear();
                m.node_log.clear();
                m.stats_resets.clear();
            }
        }
        // The comparison is only worth something if the partial path did the interesting things.
        assert!(partial > 2000, "only {partial} partial syncs");
        for (what, n) in [
            ("failed", partial_failed),
            ("deleted backends", partial_deleted),
            ("wrote node entries", partial_node),
            ("retried", retried),
            ("left nothing to retry", partial_clean),
        ] {
            assert!(n > 50, "partial syncs that {what}: {n}");
        }
    }

    fn insert_src_ranges_of(
        set: &mut HashSet<NodeEntry>,
        service_id: u32,
        ranges: &[(IpAddr, u8)],
    ) {
        for &(net, len) in ranges {
            let (prefix, addr) = lpm_prefix(net, len);
            set.insert(NodeEntry::SrcRange {
                service_id,
                prefix,
                addr,
            });
        }
    }

    #[test]
    fn a_failed_table_install_is_retried_by_a_sync_naming_nothing() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        r.sync(&mut maps, &many(2, &["10.0.0.1"]));
        assert!(!r.needs_full_sync());
        maps.fail_tables.insert(3);
        let f3 = frontend("10.96.0.3", 80);
        let report = r.sync_changed(&mut maps, &many(3, &["10.0.0.1"]), &BTreeSet::from([f3]));
        assert_eq!(report.failed.len(), 1, "{report:?}");
        assert_eq!(report.failed[0].0, f3);
        assert_eq!(maps.services.len(), 2);
        assert!(!r.needs_full_sync(), "a failure alone needs no full sync");
        maps.fail_tables.clear();
        maps.log.clear();
        let report = r.sync_changed(&mut maps, &many(3, &["10.0.0.1"]), &BTreeSet::new());
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(maps.log, vec!["put_tables 4", "put_service 4"]);
        assert_eq!(maps.services.len(), 3);
        maps.log.clear();
        r.sync_changed(&mut maps, &many(3, &["10.0.0.1"]), &BTreeSet::new());
        assert!(maps.log.is_empty(), "retried again: {:?}", maps.log);
    }

    /// A frontend removed while its table could not be deleted keeps its id until the delete succeeds; when it
    /// comes back unchanged meanwhile, its entry (deleted) must be written again.
    #[test]
    fn a_frontend_back_before_its_table_was_deleted_gets_its_entry_again() {
        for partial in [false, true] {
            let mut maps = FakeMaps::default();
            let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
            let both = many(2, &["10.0.0.1"]);
            let f2 = frontend("10.96.0.2", 80);
            let changed = BTreeSet::from([f2]);
            let sync = |r: &mut Reconciler, maps: &mut FakeMaps, d: &DesiredState| {
                if partial {
                    r.sync_changed(maps, d, &changed)
                } else {
                    r.sync(maps, d)
                }
            };
            sync(&mut r, &mut maps, &both);
            maps.fail_table_deletes.insert(2);
            let report = sync(&mut r, &mut maps, &many(1, &["10.0.0.1"]));
            assert_eq!(report.services_deleted, 0, "{report:?}");
            assert_eq!(maps.services.len(), 1, "the entry is deleted");
            assert!(maps.tables.contains_key(&2), "the table is not");
            maps.log.clear();
            sync(&mut r, &mut maps, &both);
            assert_eq!(maps.log, vec!["put_service 2"], "partial: {partial}");
            assert_eq!(maps.services.len(), 2);
        }
    }

    #[test]
    fn an_inconsistency_makes_the_next_sync_a_full_one_that_recounts() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        r.sync(&mut maps, &many(2, &["10.0.0.1", "10.0.0.2"]));
        assert!(!r.needs_full_sync());
        // Counts lost (as a bug would lose them): the removal below finds a reference count already at zero.
        r.backend_refs.clear();
        let f2 = frontend("10.96.0.2", 80);
        r.sync_changed(
            &mut maps,
            &many(1, &["10.0.0.1", "10.0.0.2"]),
            &BTreeSet::from([f2]),
        );
        assert!(r.needs_full_sync());
        r.sync_changed(
            &mut maps,
            &many(1, &["10.0.0.1", "10.0.0.2"]),
            &BTreeSet::new(),
        );
        assert!(!r.needs_full_sync());
        r.check_counts();
        assert_eq!(maps.backends.len(), 2, "service 1 still uses both backends");
    }

    #[test]
    fn frontends_sharing_a_key_keep_every_sync_full() {
        let mut maps = FakeMaps::default();
        let mut r = Reconciler::restore(&maps, small_cfg()).expect("restore");
        let v4 = frontend("10.96.0.1", 80);
        let mapped = frontend("::ffff:10.96.0.1", 80);
        let e = entry(&["10.0.0.1"], Algorithm::Random);
        r.sync(&mut maps, &state(vec![(v4, e.clone())]));
        assert!(!r.needs_full_sync());
        let both = state(vec![(v4, e.clone()), (mapped, e)]);
        r.sync_changed(&mut maps, &both, &BTreeSet::from([mapped]));
        assert!(r.needs_full_sync(), "one key, two frontends");
        r.sync_changed(
            &mut maps,
            &state(vec![(v4, entry(&["10.0.0.1"], Algorithm::Random))]),
            &BTreeSet::from([mapped]),
        );
        assert!(!r.needs_full_sync());
    }

    /// Not a test: the CPU time of one endpoint change at 10k Services x 2 frontends x 10 endpoints, partial and
    /// full. Run optimised: `cargo test -p lb-agent --lib --config 'profile.dev.package.lb-agent.opt-level=3'
    /// -- --ignored --nocapture sync_cost`.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn sync_cost_of_one_endpoint_change_at_10k_services() {
        fn cpu_ms() -> f64 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid timespec for the call to fill.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            assert_eq!(rc, 0, "clock_gettime");
            ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
        }
        let backend = |n: u32| Backend {
            addr: IpAddr::V4((u32::from_be_bytes([10, 128, 0, 0]) + n).into()),
            port: 8080,
            weight: 1,
            local: n.is_multiple_of(3),
        };
        let mut desired = DesiredState::default();
        for i in 0..10_000u32 {
            let addr = IpAddr::V4((u32::from_be_bytes([10, 96, 0, 0]) + i).into());
            let mut e = entry(&[], Algorithm::Maglev);
            e.backends = (0..10).map(|j| backend(i * 10 + j)).collect();
            for scope in [Scope::Internal, Scope::External] {
                let f = Frontend {
                    addr,
                    port: 80,
                    proto: Protocol::Tcp,
                    scope,
                };
                desired.services.insert(f, e.clone());
            }
        }
        let mut maps = FakeMaps::default();
        let cfg = ReconcileConfig {
            max_backends: 1 << 18,
            ..ReconcileConfig::default()
        };
        let mut r = Reconciler::restore(&maps, cfg).expect("restore");
        let t = cpu_ms();
        let report = r.sync(&mut maps, &desired);
        assert!(report.failed.is_empty(), "{:?}", report.failed.first());
        println!(
            "first sync: {} frontends, {} backends, {:.0} ms",
            desired.services.len(),
            r.programmed_backends(),
            cpu_ms() - t
        );
        let (mut partial, mut full) = (Vec::new(), Vec::new());
        for k in 0..60u32 {
            let f = *desired
                .services
                .keys()
                .nth((k as usize * 7919) % desired.services.len())
                .expect("frontend");
            if let Some(e) = desired.services.get_mut(&f) {
                e.backends[(k % 10) as usize] = backend(1_000_000 + k);
                e.backends.sort();
            }
            let t = cpu_ms();
            let report = if k % 2 == 0 {
                r.sync_changed(&mut maps, &desired, &BTreeSet::from([f]))
            } else {
                r.sync(&mut maps, &desired)
            };
            let ms = cpu_ms() - t;
            // The old backend stays: the service's other frontend still uses it.
            assert_eq!(
                (report.tables_written, report.backends_written),
                (1, 1),
                "{report:?}"
            );
            if k % 2 == 0 { &mut partial } else { &mut full }.push(ms);
        }
        for (name, v) in [("sync_changed", &mut partial), ("sync", &mut full)] {
            v.sort_by(f64::total_cmp);
            println!(
                "{name}: one endpoint change, CPU ms: median {:.3}, min {:.3}, max {:.3} ({} runs)",
                v[v.len() / 2],
                v[0],
                v[v.len() - 1],
                v.len()
            );
        }
    }
}
