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
//! What a full sync finds by walking everything, the reconciler keeps counted in its [`ledger`]: how many
//! programmed frontends name each backend id, which service id belongs to which key; what failed last time is in
//! [`retry`].
//!
//! Modules: `ledger` (what is programmed, and its counts), `plan` (phase 1 for one frontend), `node` (the
//! node-level entries), `ids` (id allocation), `keys` (frontends and their map keys), `retry`, `error`.

mod error;
mod ids;
mod keys;
mod ledger;
mod node;
mod plan;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};

use lb_common::{BackendValue, ServiceKey};

use super::map_error::MapsError;
use super::maps::{Maps, StaleAffinity};
use crate::maglev;
use crate::state::{DesiredState, Frontend};
pub use error::FrontendError;
pub use keys::service_key;
use keys::{alias, desired_entry_of_key};
use ledger::{Ledger, Programmed};
use node::{NodeScope, NodeState};
use plan::{Pending, plan_frontend};
use retry::Retry;

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
    /// deletes last) holds for every service at once: (1) new backends, and every changed table built in memory
    /// ([`plan`]); (2) all changed tables installed with one batched update of `LB_MAGLEV`; (3) the service entries;
    /// (4) the deletions: stale service entries, then their tables in one batched delete, then unused backends,
    /// then affinity; then the node-level entries ([`node`]). The batching is the point: every userspace update of
    /// a map-of-maps waits for an RCU grace period (`maybe_wait_bpf_programs()`, ~13 ms here), a batch only once
    /// (Linux >= 6.7), so N changed frontends cost one wait instead of N.
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
        let retry = std::mem::take(&mut self.retry);
        let mut failed = Retry::default();
        self.ledger.begin_sync();
        if changed.is_none() {
            self.ledger.begin_full_sync();
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
                        plan_frontend(
                            &mut self.ledger,
                            &self.cfg,
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
                        self.ledger.contains(k) && desired_entry_of_key(desired, k).is_none()
                    });
                    // Their ids go in phase 4; the ids of visited keys are read after it.
                    scope
                        .service_ids
                        .extend(stale.iter().filter_map(|k| self.ledger.service_id(k)));
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
                Some(e) => Some(FrontendError::from(e)),
                None => maps.put_service(&p.key, &p.value).err().map(|e| {
                    // The new table is live under the old entry, and it may name the new backends: keep them.
                    failed.pinned.extend(p.ids.iter().copied());
                    if is_new && installed.contains(&service_id) {
                        // Nothing will read a table under an id that goes back to the pool.
                        unused_tables.push(service_id);
                    }
                    FrontendError::from(e)
                }),
            };
            if let Some(reason) = reason {
                if is_new {
                    self.ledger.free_service_id(service_id);
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
            self.ledger.put(
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
            let Some(id) = self.ledger.service_id(&key) else {
                continue;
            };
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
                self.ledger.mark_entry_deleted(&key);
                continue;
            }
            let backends_of_deleted = self.ledger.backend_ids_of(&key);
            self.ledger.remove(&key);
            self.ledger.free_service_id(id);
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
                    .chain(&retry.pinned)
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
        stale_backends.retain(|(_, id)| {
            !keep_all && self.ledger.references(*id) == 0 && !failed.pinned.contains(id)
        });
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
        self.retry = failed;
        report
    }
}
