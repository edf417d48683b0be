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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lb_common::{
    BACKEND_FLAG_LOCAL, BackendValue, ConfigValue, LOCAL_NET_NODE, LOCAL_NET_POD,
    SVC_FLAG_DROP_NO_BACKEND, SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue,
    VIP_FLAG_CLUSTER_IP, addr_bytes,
};

use super::maps::{Maps, MapsError, StaleAffinity};
use super::packet_maps::{NodeEntry, lpm_prefix};
use crate::maglev;
use crate::state::{Algorithm, DesiredState, Frontend, ServiceEntry};

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
#[derive(Debug)]
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
#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    /// Backend ids and algorithm the table was built from; `None` after a restart until rebuilt once.
    inputs: Option<(Algorithm, Vec<u32>, u32)>,
    /// The desired entry `value` and `inputs` were computed from, `None` until then and after the table size
    /// bounds change. An equal desired entry plans to exactly the same writes (none), so the sync skips it without
    /// looking up its backends: the backend ids it names stay allocated because every sync marks them used.
    entry: Option<ServiceEntry>,
}

/// Phase 1's verdict on one frontend.
enum Planned {
    /// Nothing to write; the backend ids it uses.
    Unchanged(Vec<u32>),
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

/// A set of backend ids as a bitmap: a sync marks every used id (all backends of all frontends), which a hash set
/// made a large part of a sync's cost.
#[derive(Default)]
struct IdSet(Vec<u64>);

impl IdSet {
    fn insert(&mut self, id: u32) {
        let (word, bit) = (id as usize / 64, id % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << bit;
    }

    fn contains(&self, id: u32) -> bool {
        self.0
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }
}

impl Extend<u32> for IdSet {
    fn extend<I: IntoIterator<Item = u32>>(&mut self, ids: I) {
        for id in ids {
            self.insert(id);
        }
    }
}

pub struct Reconciler {
    cfg: ReconcileConfig,
    services: BTreeMap<ServiceKey, Programmed>,
    backend_ids: BTreeMap<BackendValue, u32>,
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
        for (key, value) in maps.services().map_err(ReconcileError::Restore)? {
            service_ids.mark(value.service_id);
            services.insert(
                key,
                Programmed {
                    value,
                    inputs: None,
                    entry: None,
                },
            );
        }
        let mut backend_ids = BTreeMap::new();
        for (id, value) in maps.backends().map_err(ReconcileError::Restore)? {
            backend_id_alloc.mark(id);
            backend_ids.insert(value, id);
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
            services,
            backend_ids,
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
        // Table sizes derive from these bounds: every frontend is planned again at the next sync.
        for p in self.services.values_mut() {
            p.entry = None;
        }
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
        let mut report = SyncReport::default();
        let mut stale_affinity = StaleAffinity::default();
        let mut wanted_keys = HashSet::with_capacity(desired.services.len());
        let mut used_backends = IdSet::default();

        // Phase 1: backends written, tables built, nothing else touched yet.
        let mut pending: Vec<Pending> = Vec::new();
        for (frontend, entry) in &desired.services {
            let key = service_key(frontend);
            wanted_keys.insert(key);
            if let Some(Programmed {
                inputs: Some((_, ids, _)),
                entry: Some(programmed),
                ..
            }) = self.services.get(&key)
                && programmed == entry
            {
                used_backends.extend(ids.iter().copied());
                continue;
            }
            match self.plan_service(maps, frontend, &key, entry, &mut report) {
                Ok(Planned::Unchanged(ids)) => used_backends.extend(ids),
                Ok(Planned::Write(p)) => pending.push(*p),
                Err(reason) => {
                    self.keep_previous(&key, &mut used_backends);
                    report.failed.push((*frontend, reason));
                }
            }
        }

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
                    used_backends.extend(p.ids.iter().copied());
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
                self.keep_previous(&p.key, &mut used_backends);
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
            used_backends.extend(p.ids.iter().copied());
            self.services.insert(
                p.key,
                Programmed {
                    value: p.value,
                    inputs: Some(p.inputs),
                    entry: Some(p.entry),
                },
            );
        }

        // Phase 4: deletions. Entries first (a reader then no longer reaches the table), then every table that
        // went out of use in one batch, then backends nobody uses.
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect();
        let mut unreferenced: Vec<(ServiceKey, u32)> = Vec::new();
        for key in stale {
            let Some(p) = self.services.get(&key) else {
                continue;
            };
            let id = p.value.service_id;
            match maps.delete_service(&key) {
                Ok(()) => unreferenced.push((key, id)),
                Err(e) => {
                    tracing::warn!(service_id = id, error = %e, "could not delete a stale service; will retry");
                    used_backends.extend(self.backend_ids_of_key(&key));
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
                // Kept as programmed, so the next sync deletes it again (entry deletion is idempotent).
                tracing::warn!(service_id = id, error = %e, "could not delete a stale service's table; will retry");
                used_backends.extend(self.backend_ids_of_key(&key));
                continue;
            }
            let backends_of_deleted = self.backend_ids_of_key(&key);
            self.services.remove(&key);
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

        // Resolved before stale backends are forgotten below; only the departed ids are looked up.
        let departed_ids: HashSet<u32> = stale_affinity.pairs.iter().map(|(_, b)| *b).collect();
        let values: HashMap<u32, BackendValue> = if departed_ids.is_empty() {
            HashMap::new()
        } else {
            self.backend_ids
                .iter()
                .filter(|(_, id)| departed_ids.contains(id))
                .map(|(v, id)| (*id, *v))
                .collect()
        };
        report.departed = stale_affinity
            .pairs
            .iter()
            .filter_map(|(svc, b)| values.get(b).map(|v| (*svc, *v)))
            .collect();
        report.departed.sort();
        let stale_backends: Vec<(BackendValue, u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| !used_backends.contains(**id))
            .map(|(v, id)| (*v, *id))
            .collect();
        for (value, id) in stale_backends {
            match maps.delete_backend(id) {
                Ok(()) => {
                    self.backend_ids.remove(&value);
                    self.backend_id_alloc.free(id);
                    report.backends_deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(backend_id = id, error = %e, "could not delete a stale backend; will retry")
                }
            }
        }

        self.sync_node(maps, desired);
        match maps.purge_affinity(&stale_affinity) {
            Ok(n) => report.affinity_purged = n,
            Err(e) => {
                tracing::warn!(error = %e, "could not purge affinity entries of deleted services/backends")
            }
        }
        report
    }

    /// A frontend that could not be (re)programmed keeps whatever it had before, its backends included: a failed
    /// update must not take down a working service.
    fn keep_previous(&self, key: &ServiceKey, used_backends: &mut IdSet) {
        if let Some(p) = self.services.get(key) {
            used_backends.extend(self.backend_ids_of(p));
        }
    }

    /// Programs the per-packet datapath's node-level maps: SNAT addresses, this node's networks, the service CIDRs,
    /// the ClusterIP set and the source ranges of programmed services. Adds come before deletes, so a changed entry is never missing.
    /// A new service's ranges are written after its entry: for that instant its LoadBalancer IP drops everything,
    /// the safe side of rule 9.
    fn sync_node(&mut self, maps: &mut impl Maps, desired: &DesiredState) {
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
        for (frontend, entry) in &desired.services {
            if entry.kind == crate::state::VipKind::ClusterIp {
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
            for &(net, len) in &entry.source_ranges {
                let (prefix, addr) = lpm_prefix(net, len);
                want.insert(NodeEntry::SrcRange {
                    service_id: p.value.service_id,
                    prefix,
                    addr,
                });
            }
        }
        let added: Vec<NodeEntry> = want.difference(&self.node_entries).copied().collect();
        for e in &added {
            match maps.put_node_entry(e) {
                Ok(()) => {
                    self.node_entries.insert(*e);
                }
                Err(err) => {
                    tracing::warn!(entry = ?e, error = %err, "could not write a node entry")
                }
            }
        }
        let stale: Vec<NodeEntry> = self
            .node_entries
            .iter()
            .filter(|e| !want.contains(e))
            .copied()
            .collect();
        for e in stale {
            // A changed value under the same key was just written: deleting the old one would delete the new.
            let rewritten = want.iter().any(|w| w.same_key(&e));
            if rewritten || maps.delete_node_entry(&e).is_ok() {
                self.node_entries.remove(&e);
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
                    report.backends_written += 1;
                    id
                }
            };
            ids.push(id);
        }

        // The remembered entry is not needed here (and cloning it is not free).
        let previous = self.services.get(key).map(|p| Programmed {
            value: p.value,
            inputs: p.inputs.clone(),
            entry: None,
        });
        let inputs = (
            entry.algorithm,
            ids.clone(),
            self.table_size(entry.algorithm, ids.len()),
        );
        let (slots, table_hash) = match &previous {
            Some(p) if p.inputs.as_ref() == Some(&inputs) => (None, p.value.table_hash),
            _ => {
                let slots = self.build_slots(entry, &ids, inputs.2)?;
                let hash = table_hash(entry.algorithm, &slots);
                (Some(slots), hash)
            }
        };

        let service_id = match &previous {
            Some(p) => p.value.service_id,
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
        if previous.as_ref().is_some_and(|p| p.value == value) {
            if let Some(p) = self.services.get_mut(key) {
                p.inputs = Some(inputs);
                p.entry = Some(entry.clone());
            }
            return Ok(Planned::Unchanged(ids));
        }

        let table_changed = previous
            .as_ref()
            .is_none_or(|p| p.value.table_hash != table_hash);
        // Backends that leave a service must not keep its clients through affinity, nor through sockets connected
        // to them. Read before the table is replaced: after a restart the previous set is known only from the table.
        let previous_ids: Option<Vec<u32>> = match &previous {
            Some(p) if table_changed => Some(match &p.inputs {
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
            previous: previous.map(|p| p.value),
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

    fn backend_ids_of(&self, p: &Programmed) -> Vec<u32> {
        p.inputs
            .as_ref()
            .map(|(_, ids, _)| ids.clone())
            .unwrap_or_else(|| {
                // After a restart the inputs are unknown until the first successful write; keep every backend alive
                // rather than delete one a live table may still name.
                self.backend_ids.values().copied().collect()
            })
    }

    fn backend_ids_of_key(&self, key: &ServiceKey) -> Vec<u32> {
        self.services
            .get(key)
            .map(|p| self.backend_ids_of(p))
            .unwrap_or_default()
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
        self.backend_ids.iter().map(|(v, id)| (*id, *v)).collect()
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey::new(f.addr, f.port, f.proto.number(), f.scope.number())
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
}
