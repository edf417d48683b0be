//! Brings the maps to a [`DesiredState`], touching only what differs (cilium's
//! `pkg/loadbalancer/reconciler/bpf_reconciler.go` is the model).
//!
//! **Invariant (no half-written service):** for every service the order is backends, then the lookup table, then
//! the service entry; deletions come last (service entry, then backends nobody uses). A table is written whole into
//! a free region of the slot array (`slot_array`, `lut`) before the one entry update that switches to it, so a
//! packet or `connect()` at any moment sees the old service or the new one, each with a whole table of valid
//! backend ids. A sync keeps this order across all services at once (phases, see [`Reconciler::sync`]).
//!
//! **Invariant (no table of another service):** a region an entry stopped pointing at is reused only after an RCU
//! grace period (`regions`, `rcu_fence`), so a reader that read the old offset never finds another table there;
//! identical tables are stored once (`tables`) and counted, so no region is freed while an entry points at it.
//!
//! **Invariant (stable ids):** service and backend ids are restored from the maps at start ([`Reconciler::restore`]),
//! and so are the tables, from the entries pointing at them, so a restarted agent rewrites nothing that is already
//! right and established flows keep their backend. A migrated `LB_SERVICES` gives its ids back to the same keys.
//!
//! **Invariant (partial syncs):** [`Reconciler::sync_changed`] visits only the frontends it is told changed (and
//! every failure of the previous sync) and makes exactly the writes [`Reconciler::sync`] would: both run the same
//! phases, they differ only in which frontends they visit and in which backend ids and node entries they check.
//! What a full sync finds by walking everything, the reconciler keeps counted in its [`ledger`]: how many
//! programmed frontends name each backend id and point at each table, which service id belongs to which key; what
//! failed last time is in [`retry`].
//!
//! Modules: `ledger` (what is programmed, and its counts), `plan` (phase 1 for one frontend), `tables` and
//! `regions` (the tables in the slot array), `node` (the node-level entries), `ids` (id allocation), `keys`
//! (frontends and their map keys), `retry`, `error`.

mod affinity;
mod error;
mod ids;
mod keys;
mod ledger;
mod node;
mod plan;
mod regions;
mod retry;
mod tables;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use lb_common::{BackendValue, ServiceKey};

use super::map_error::MapsError;
use super::maps::{Maps, StaleAffinity};
use super::slot_array;
use crate::maglev;
use crate::state::{DesiredState, Frontend};
pub use error::FrontendError;
pub use keys::service_key;
use keys::{alias, desired_entry_of_key};
use ledger::{Ledger, Programmed};
use node::{NodeScope, NodeState};
use plan::{Plan, TableSource, plan_frontend};
use retry::Retry;

/// Sizes and limits the reconciler works within.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    /// Frontends the maps hold (`LB_SERVICES`); service ids are 1..=max_services (`LB_SVC_STATS` has one element
    /// more: 0 means "no service" to the programs).
    pub max_services: u32,
    /// Backends the maps hold; ids 1..=max_backends.
    pub max_backends: u32,
    pub maglev_min_size: u32,
    pub maglev_max_size: u32,
    /// The slot array never grows beyond this many bytes.
    pub max_table_bytes: u64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            max_services: lb_common::DEFAULT_MAX_SERVICES,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            maglev_min_size: maglev::TABLE_SIZES[0],
            maglev_max_size: 16381,
            max_table_bytes: slot_array::MAX_BYTES,
        }
    }
}

/// What one sync did, for logs and metrics.
#[derive(Debug, Default, PartialEq)]
pub struct SyncReport {
    pub services_written: usize,
    pub services_deleted: usize,
    pub tables_written: usize,
    pub backends_written: usize,
    pub backends_deleted: usize,
    pub affinity_purged: usize,
    /// Frontends that could not be programmed (capacity, map errors), with the reason. The rest are programmed.
    pub failed: Vec<(Frontend, FrontendError)>,
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

pub struct Reconciler {
    cfg: ReconcileConfig,
    /// What is programmed, with the counts a partial sync relies on.
    ledger: Ledger,
    /// Failures of the last sync.
    retry: Retry,
    /// What the node-level maps hold.
    node: NodeState,
    /// The last full sync saw two frontends with one key (an IPv4 address and its IPv4-mapped IPv6 form, which the
    /// model never produces): a key then does not name one frontend, and only full syncs are exact.
    aliased: bool,
}

impl Reconciler {
    /// Adopts what the maps hold (after an agent restart, or empty on first start).
    pub fn restore(maps: &impl Maps, cfg: ReconcileConfig) -> Result<Self, ReconcileError> {
        let ledger = Ledger::restore(
            maps.services().map_err(ReconcileError::Restore)?,
            maps.backends().map_err(ReconcileError::Restore)?,
            cfg.max_services,
            cfg.max_backends,
            maps.slot_capacity(),
            maps.fences_started(),
            maps.migrated_service_ids(),
        );
        Ok(Self {
            cfg,
            ledger,
            retry: Retry::default(),
            node: NodeState::restore(maps),
            aliased: false,
        })
    }

    /// Adds `flags` (`lb_common::CONFIG_FLAG_*`) to those written into `LB_CONFIG` (features are switched on
    /// independently: trace, XDP, `localhost:nodePort`).
    pub fn set_config_flags(&mut self, flags: u32) {
        self.node.add_config_flags(flags);
    }

    /// The host's network namespace cookie written into `LB_CONFIG` at every sync (`localhost:nodePort`).
    pub fn set_host_netns_cookie(&mut self, cookie: u64) {
        self.node.set_host_netns_cookie(cookie);
    }

    /// The conntrack lifetimes written into `LB_CONFIG` at every sync.
    pub fn set_ct_lifetimes(&mut self, lifetimes: lb_common::CtLifetimes) {
        self.node.set_ct_lifetimes(lifetimes);
    }

    /// The ids of every programmed service (for conntrack garbage collection).
    pub fn service_ids(&self) -> HashSet<u32> {
        self.ledger.service_ids().collect()
    }

    pub fn programmed_services(&self) -> usize {
        self.ledger.len()
    }

    pub fn programmed_backends(&self) -> usize {
        self.ledger.backend_count()
    }

    /// The service id a frontend is programmed under (`None` when it is not), for the names map and metrics.
    pub fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.ledger.service_id(key)
    }

    /// Backend id → backend, for listings.
    pub fn backends(&self) -> HashMap<u32, BackendValue> {
        self.ledger.backend_values().clone()
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
        self.ledger.forget_entries();
        self.ledger.distrust();
    }

    /// Whether the next [`Reconciler::sync_changed`] will be a full sync: after `restore` until every restored
    /// frontend has been rewritten, after `set_maglev_sizes`, after an inconsistency.
    pub fn needs_full_sync(&self) -> bool {
        self.ledger.needs_full() || self.aliased || self.ledger.unknown_inputs() > 0
    }

    /// Makes the maps match `desired`. Errors on single frontends are collected in the report and do not stop the
    /// others.
    ///
    /// The writes go in phases over the whole sync, so the per-service order (backends, table, service entry,
    /// deletes last) holds for every service at once: (1) new backends, and every new table built in memory
    /// ([`plan`]); (2) all new tables written into free regions of the slot array in one pass; (3) the service
    /// entries, each switching to its table with one update; (4) the deletions: stale service entries (their tables'
    /// regions go to quarantine), then unused backends, then affinity; then the node-level entries ([`node`]). No
    /// step waits for an RCU grace period unless the slot array is out of room (`rcu_fence` pays for quarantine in
    /// the background).
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
    /// - a backend is used when a programmed frontend's inputs name it ([`Ledger::references`]) or a failed entry
    ///   write pinned it this sync (the new table is live under the old entry): the ids a walk over every frontend
    ///   would mark (each one's programmed inputs, kept or new, plus those pins). The full sync checks every
    ///   backend id against that rule, the partial one only the ids that can have become unused: every backend was
    ///   used after the previous sync, or its delete failed (`retry.backends`), or it was pinned then
    ///   (`retry.pinned`), so one unused now lost its last reference or was allocated this sync
    ///   ([`Ledger::candidates`]), or is one of those retries;
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
        // (service id, backend id) pairs that ended: the backend left the frontend, or the frontend went.
        let mut departed: HashSet<(u32, u32)> = HashSet::new();
        let retry = std::mem::take(&mut self.retry);
        let mut failed = Retry::default();
        self.ledger.begin_sync();
        if changed.is_none() {
            self.ledger.begin_full_sync();
        }
        self.release_regions(maps);

        // Phase 1: backends written, tables found or built, nothing else touched yet. Frontends are visited in the
        // order of `desired.services` either way, so the writes come in the same order.
        let mut plan = Plan::default();
        let (stale, node_scope): (Vec<ServiceKey>, Option<(NodeScope, Vec<ServiceKey>)>) =
            match changed {
                None => {
                    let mut wanted_keys = HashSet::with_capacity(desired.services.len());
                    let mut aliased = false;
                    for (frontend, entry) in &desired.services {
                        let key = service_key(frontend);
                        aliased |= !wanted_keys.insert(key);
                        plan_frontend(
                            &mut self.ledger,
                            &self.cfg,
                            maps,
                            frontend,
                            key,
                            entry,
                            &mut plan,
                            &mut report,
                            &mut failed,
                        );
                    }
                    self.aliased = aliased;
                    let stale = self
                        .ledger
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
                            Some(entry) => plan_frontend(
                                &mut self.ledger,
                                &self.cfg,
                                maps,
                                frontend,
                                key,
                                entry,
                                &mut plan,
                                &mut report,
                                &mut failed,
                            ),
                            None => {
                                stale.insert(key);
                            }
                        }
                    }
                    stale.retain(|k| {
                        self.ledger.contains(k) && desired_entry_of_key(desired, k).is_none()
                    });
                    // Their ids go in phase 4; the ids of visited keys are read after it.
                    scope
                        .service_ids
                        .extend(stale.iter().filter_map(|k| self.ledger.service_id(k)));
                    (stale.into_iter().collect(), Some((scope, visited_keys)))
                }
            };
        count_what_capacity_errors_need(desired, &mut report);

        // Phase 2: every new table into a free region of the slot array, in one pass of writes. No reader can see
        // them yet: no entry points there.
        report.tables_written = self.write_tables(maps, &mut plan);
        let mut holds: Vec<u64> = Vec::new();
        for p in &plan.pending {
            match p.table {
                TableSource::Held(offset) => holds.push(offset),
                TableSource::New(i) => {
                    if let Some(Ok(offset)) = plan.new_tables[i].outcome {
                        // Until phase 3 is done, as the held ones.
                        self.ledger.hold_table(offset);
                        holds.push(offset);
                    }
                }
                TableSource::None => {}
            }
        }

        // Phase 3: service entries, each switching to its table with one update.
        for p in plan.pending {
            let is_new = p.previous.is_none();
            let mut value = p.value;
            let table = match p.table {
                TableSource::None => Ok(()),
                TableSource::Held(_) => Ok(()),
                TableSource::New(i) => match &plan.new_tables[i].outcome {
                    Some(Ok(offset)) => {
                        value.table_offset = *offset as u32;
                        Ok(())
                    }
                    Some(Err(e)) => Err(e.again()),
                    None => Err(FrontendError::TableCapacity {
                        needed_mib: 0,
                        limit_mib: 0,
                    }),
                },
            };
            let reason = match table {
                Err(e) => Some(e),
                Ok(()) => maps
                    .put_service(&p.key, &value)
                    .err()
                    .map(FrontendError::from),
            };
            if let Some(reason) = reason {
                if is_new {
                    self.ledger.free_service_id(value.service_id);
                }
                // The frontend keeps whatever it had, its old entry pointing at its old table: a failed update
                // must not take down a working service.
                failed.frontends.insert(p.frontend);
                report.failed.push((p.frontend, reason));
                continue;
            }
            report.services_written += 1;
            let gone: Vec<u32> = p
                .previous_ids
                .iter()
                .flatten()
                .filter(|b| !p.inputs.ids.contains(b))
                .copied()
                .collect();
            departed.extend(gone.iter().map(|b| (value.service_id, *b)));
            let previous_affinity = p.previous.map_or(0, |v| v.affinity_id);
            // What the frontend no longer offers under its previous affinity id: the backends that left it, or all
            // it had when the id changed (affinity switched off, the key taken over by another Service port).
            let left_affinity = if previous_affinity == value.affinity_id {
                gone
            } else {
                p.previous_ids.unwrap_or_else(|| p.inputs.ids.clone())
            };
            self.ledger.put(
                p.key,
                Programmed {
                    value,
                    inputs: Some(p.inputs),
                    entry: Some(p.entry),
                },
            );
            affinity::left(
                &self.ledger,
                &mut stale_affinity,
                previous_affinity,
                &left_affinity,
            );
        }
        for offset in holds {
            self.ledger.unhold_table(offset);
        }

        // Phase 4: deletions. Entries first (their tables go to quarantine with their last entry), then backends
        // nobody uses.
        for key in stale {
            let Some(id) = self.ledger.service_id(&key) else {
                continue;
            };
            match maps.delete_service(&key) {
                Ok(()) => {
                    let backends_of_deleted = self.ledger.backend_ids_of(&key);
                    let affinity_id = self.ledger.get(&key).map_or(0, |p| p.value.affinity_id);
                    self.ledger.remove(&key);
                    self.ledger.free_service_id(id);
                    affinity::left(
                        &self.ledger,
                        &mut stale_affinity,
                        affinity_id,
                        &backends_of_deleted,
                    );
                    departed.extend(backends_of_deleted.into_iter().map(|b| (id, b)));
                    report.services_deleted += 1;
                }
                Err(e) => {
                    // Kept as programmed (its inputs keep its backends), deleted again by the next sync.
                    tracing::warn!(service_id = id, error = %e, "could not delete a stale service; will retry");
                    failed.stale.insert(key);
                }
            }
        }
        // Every entry that moved away from a table has been written: its region waits for a grace period from now.
        if self
            .ledger
            .tables_mut()
            .quarantine_released(maps.fences_started())
        {
            self.request_fence(maps);
        }

        // Resolved before stale backends are forgotten below.
        report.departed = departed
            .iter()
            .filter_map(|(svc, b)| self.ledger.backend_value(*b).map(|v| (*svc, *v)))
            .collect();
        report.departed.sort();
        let mut stale_backends: Vec<(BackendValue, u32)> = match changed {
            None => self.ledger.backends().collect(),
            Some(_) => {
                let ids: BTreeSet<u32> = self
                    .ledger
                    .candidates()
                    .iter()
                    .chain(&retry.backends)
                    .copied()
                    .collect();
                let mut values: Vec<(BackendValue, u32)> = ids
                    .into_iter()
                    .filter_map(|id| self.ledger.backend_value(id).map(|v| (*v, id)))
                    .collect();
                // The order of the full sync's walk, which it deletes in.
                values.sort_unstable();
                values
            }
        };
        // A frontend of unknown inputs may have a table naming any backend.
        let keep_all = self.ledger.unknown_inputs() > 0;
        stale_backends.retain(|(_, id)| !keep_all && self.ledger.references(*id) == 0);
        for (value, id) in stale_backends {
            match maps.delete_backend(id) {
                Ok(()) => {
                    self.ledger.forget_backend(&value, id);
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
                    .filter_map(|k| self.ledger.service_id(k)),
            );
            scope
        });
        self.node.sync(
            maps,
            desired,
            &self.ledger,
            node_scope.as_ref(),
            &mut failed,
        );
        match maps.purge_affinity(&stale_affinity) {
            Ok(n) => report.affinity_purged = n,
            Err(e) => {
                tracing::warn!(error = %e, "could not purge affinity entries of deleted services/backends")
            }
        }
        if changed.is_none() {
            self.ledger.release_reservations();
        }
        self.retry = failed;
        report
    }

    /// Frees the quarantined regions whose grace period is over, and asks for the fence the rest wait for.
    fn release_regions(&mut self, maps: &mut impl Maps) {
        let regions = self.ledger.tables_mut().regions_mut();
        regions.release(maps.fences_completed());
        if regions.has_quarantine() {
            self.request_fence(maps);
        }
    }

    /// Asks for the fence the quarantine waits for, unless one that serves has started.
    fn request_fence(&mut self, maps: &mut impl Maps) {
        let Some(needed) = self.ledger.tables().regions().fence_needed() else {
            return;
        };
        if maps.fences_started() < needed
            && let Err(e) = maps.request_fence()
        {
            tracing::warn!(error = %e, "could not start an RCU fence; freed table regions wait");
        }
    }

    /// Phase 2: allocates a region for every new table (waiting for the quarantine's fence, then growing the slot
    /// array, when the free regions do not suffice) and writes them all. Records each table's outcome; returns how
    /// many were written.
    fn write_tables(&mut self, maps: &mut impl Maps, plan: &mut Plan) -> usize {
        if plan.new_tables.is_empty() {
            return 0;
        }
        // Only the tables some planned entry will point at (a frontend can fail after its table was planned).
        let mut wanted = vec![false; plan.new_tables.len()];
        for p in &plan.pending {
            if let TableSource::New(i) = p.table {
                wanted[i] = true;
            }
        }
        let lens: Vec<u64> = plan
            .new_tables
            .iter()
            .map(|t| t.encoded.layout.region_len())
            .collect();
        let mut offsets: Vec<Option<u64>> = vec![None; lens.len()];
        let allocate = |regions: &mut regions::Regions, offsets: &mut Vec<Option<u64>>| {
            for ((o, len), wanted) in offsets.iter_mut().zip(&lens).zip(&wanted) {
                if o.is_none() && *wanted {
                    *o = regions.allocate(*len);
                }
            }
            offsets
                .iter()
                .zip(&lens)
                .zip(&wanted)
                .filter(|((o, _), wanted)| o.is_none() && **wanted)
                .map(|((_, l), _)| *l)
                .sum::<u64>()
        };
        let mut missing = allocate(self.ledger.tables_mut().regions_mut(), &mut offsets);
        if missing > 0
            && let Some(needed) = self.ledger.tables().regions().fence_needed()
            && self.ledger.tables().regions().quarantined() >= missing
        {
            // Enough waits in quarantine: one grace period frees it.
            if let Err(e) = maps.wait_fence(needed) {
                tracing::warn!(error = %e, "waiting for an RCU fence failed");
            }
            let completed = maps.fences_completed();
            self.ledger.tables_mut().regions_mut().release(completed);
            missing = allocate(self.ledger.tables_mut().regions_mut(), &mut offsets);
        }
        let mut failure: Option<FrontendError> = None;
        if missing > 0 {
            let regions = self.ledger.tables().regions();
            // New space at the end fits every missing table whatever the fragmentation; a quarter more leaves room
            // for the next changes (each needs room for its new table while the old one waits for a fence).
            let wanted = (regions.capacity() + missing).max((regions.live() + missing) * 5 / 4);
            let mut wanted = wanted.max(MIN_SLOT_BYTES);
            let limit = self.cfg.max_table_bytes.min(slot_array::MAX_BYTES);
            if wanted > limit && regions.capacity() + missing <= limit {
                // A quarter more does not fit, the bare need does.
                wanted = limit;
            }
            if wanted > limit {
                failure = Some(FrontendError::TableCapacity {
                    needed_mib: (regions.capacity() + missing).div_ceil(1 << 20),
                    limit_mib: limit >> 20,
                });
            } else {
                let keep = regions.high_water();
                match maps.grow_slots(wanted, keep) {
                    Ok(capacity) => {
                        tracing::info!(
                            bytes = capacity,
                            live = self.ledger.tables().regions().live(),
                            "grew the Maglev slot array"
                        );
                        let regions = self.ledger.tables_mut().regions_mut();
                        regions.grow(capacity);
                        // The growth's grace period was a fence too.
                        regions.release(maps.fences_completed());
                        allocate(regions, &mut offsets);
                    }
                    Err(e) => failure = Some(e.into()),
                }
            }
        }
        let writes: Vec<(u64, &[u8])> = offsets
            .iter()
            .zip(&plan.new_tables)
            .filter_map(|(o, t)| o.map(|o| (o, t.encoded.bytes.as_slice())))
            .collect();
        let written = if writes.is_empty() {
            Ok(())
        } else {
            maps.write_slots(&writes)
        };
        drop(writes);
        let mut count = 0;
        let write_error = written.err().map(FrontendError::from);
        for (i, t) in plan.new_tables.iter_mut().enumerate() {
            t.outcome = Some(match (offsets[i], &write_error) {
                (Some(offset), None) => {
                    self.ledger.tables_mut().add(
                        offset,
                        t.encoded.layout,
                        t.hash,
                        Arc::clone(&t.inputs),
                    );
                    count += 1;
                    Ok(offset)
                }
                (Some(offset), Some(e)) => {
                    // Never pointed at: free at once.
                    self.ledger
                        .tables_mut()
                        .regions_mut()
                        .free_now(offset, lens[i]);
                    Err(e.again())
                }
                (None, _) => Err(match &failure {
                    Some(e) => e.again(),
                    None => FrontendError::TableCapacity {
                        needed_mib: 0,
                        limit_mib: self.cfg.max_table_bytes >> 20,
                    },
                }),
            });
        }
        count
    }
}

/// The smallest slot array: a few small tables' worth, so that a node with a handful of Services does not grow it
/// table by table.
const MIN_SLOT_BYTES: u64 = 64 << 10;

/// Completes the capacity errors of a sync with what the desired state needs (counted only when one occurred).
fn count_what_capacity_errors_need(desired: &DesiredState, report: &mut SyncReport) {
    let backends = report
        .failed
        .iter()
        .any(|(_, e)| matches!(e, FrontendError::BackendCapacity { .. }));
    let services = report
        .failed
        .iter()
        .any(|(_, e)| matches!(e, FrontendError::ServiceCapacity { .. }));
    if !backends && !services {
        return;
    }
    let frontends = desired.services.len();
    let distinct_backends = if backends {
        desired
            .services
            .iter()
            .flat_map(|(f, e)| {
                e.backends
                    .iter()
                    .map(|b| (b.addr, b.port, f.proto, b.local))
            })
            .collect::<HashSet<_>>()
            .len()
    } else {
        0
    };
    for (_, e) in &mut report.failed {
        match e {
            FrontendError::BackendCapacity { needed, .. } => *needed = Some(distinct_backends),
            FrontendError::ServiceCapacity { needed, .. } => *needed = Some(frontends),
            _ => {}
        }
    }
}
