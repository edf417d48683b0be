//! What is programmed, and the counts a partial sync relies on.
//!
//! **Invariant (counts):** `refs[id]` is how many programmed frontends' inputs name backend `id`, `keys_by_id` maps
//! every programmed service id back to its key, `unknown_inputs` is how many programmed frontends have no known
//! inputs (restored, not yet rewritten), and every table in the slot array counts the entries pointing at it
//! ([`Tables`]). The fields are private and every change of what is programmed goes through [`Ledger::put`] or
//! [`Ledger::remove`], so nothing else can let them drift. Should they disagree anyway (a bug), the ledger says so
//! ([`Ledger::needs_full`]) and the next full sync recounts them from what they count.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use lb_common::{BackendValue, ServiceKey, ServiceValue};

use super::ids::IdAllocator;
use super::tables::{Inputs, Tables};
use crate::state::ServiceEntry;

fn table_offset(v: &ServiceValue) -> Option<u64> {
    (v.table_size > 0).then_some(u64::from(v.table_offset))
}

/// What is programmed for one frontend, mirrored in memory so unchanged services cost nothing.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Programmed {
    pub(super) value: ServiceValue,
    /// What the table was built from; `None` after a restart until rebuilt once.
    pub(super) inputs: Option<Arc<Inputs>>,
    /// The desired entry `value` and `inputs` were computed from, `None` until then, after the table size bounds
    /// change, and once the service entry is deleted. An equal desired entry plans to exactly the same writes
    /// (none), so the sync skips it without looking up its backends: the backend ids it names stay allocated
    /// because its inputs hold a reference to each.
    pub(super) entry: Option<ServiceEntry>,
}

pub(super) struct Ledger {
    frontends: BTreeMap<ServiceKey, Programmed>,
    /// Service id → the key programmed under it.
    keys_by_id: HashMap<u32, ServiceKey>,
    /// Programmed frontends whose inputs are unknown (restored, not yet rewritten). Such a frontend's table may
    /// name any backend, so while one remains no backend may be deleted and every sync is a full one.
    unknown_inputs: usize,
    service_ids: IdAllocator,
    /// Ids a migrated `LB_SERVICES` gave these keys, kept for them until the first full sync (whose frontends take
    /// them back) is done.
    reserved: HashMap<ServiceKey, u32>,
    backends: Backends,
    /// The tables in the slot array, with the entries pointing at each.
    tables: Tables,
    /// The counts cannot be trusted to skip anything (after a restore, a change of the table size bounds, or an
    /// inconsistency): the next sync visits every frontend, and recounts.
    needs_full: bool,
}

/// The backends written to `LB_BACKENDS`, with their ids and how many programmed frontends use each.
struct Backends {
    ids: BTreeMap<BackendValue, u32>,
    /// The reverse of `ids`.
    values: HashMap<u32, BackendValue>,
    /// Backend id → how many times the inputs of programmed frontends name it.
    refs: Vec<u32>,
    alloc: IdAllocator,
    /// Backend ids whose last reference went, or that were allocated, during the current sync: with the retries,
    /// the only ids a sync of changed frontends can find unused.
    candidates: Vec<u32>,
}

impl Ledger {
    /// Adopts what the maps hold: every entry with unknown inputs, every backend with its id.
    pub(super) fn restore(
        services: Vec<(ServiceKey, ServiceValue)>,
        backends: Vec<(u32, BackendValue)>,
        max_services: u32,
        max_backends: u32,
        slot_capacity: u64,
        fence_epoch: u64,
        migrated: Vec<(ServiceKey, u32)>,
    ) -> Self {
        let tables = Tables::restore(services.iter().map(|(_, v)| v), slot_capacity, fence_epoch);
        // Ids 1..=max: 0 means "none" to the programs, and the counter maps have one element more.
        let mut service_ids = IdAllocator::new(max_services.saturating_add(1));
        let mut frontends = BTreeMap::new();
        let mut keys_by_id = HashMap::new();
        for (key, value) in services {
            service_ids.mark(value.service_id);
            keys_by_id.insert(value.service_id, key);
            frontends.insert(
                key,
                Programmed {
                    value,
                    inputs: None,
                    entry: None,
                },
            );
        }
        let mut b = Backends {
            ids: BTreeMap::new(),
            values: HashMap::new(),
            refs: Vec::new(),
            alloc: IdAllocator::new(max_backends.saturating_add(1)),
            candidates: Vec::new(),
        };
        for (id, value) in backends {
            b.alloc.mark(id);
            b.ids.insert(value, id);
            b.values.insert(id, value);
        }
        let mut reserved = HashMap::new();
        for (key, id) in migrated {
            if id > 0
                && id <= max_services
                && !frontends.contains_key(&key)
                && !keys_by_id.contains_key(&id)
                && !reserved.values().any(|r| *r == id)
            {
                service_ids.mark(id);
                reserved.insert(key, id);
            }
        }
        Self {
            unknown_inputs: frontends.len(),
            frontends,
            keys_by_id,
            service_ids,
            reserved,
            backends: b,
            tables,
            needs_full: true,
        }
    }

    pub(super) fn get(&self, key: &ServiceKey) -> Option<&Programmed> {
        self.frontends.get(key)
    }

    pub(super) fn contains(&self, key: &ServiceKey) -> bool {
        self.frontends.contains_key(key)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.frontends.keys()
    }

    pub(super) fn len(&self) -> usize {
        self.frontends.len()
    }

    /// Every id in use: programmed, or kept for a frontend of a migrated map.
    pub(super) fn service_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.frontends
            .values()
            .map(|p| p.value.service_id)
            .chain(self.reserved.values().copied())
    }

    pub(super) fn service_id(&self, key: &ServiceKey) -> Option<u32> {
        self.frontends.get(key).map(|p| p.value.service_id)
    }

    /// The key programmed under a service id.
    pub(super) fn key_of(&self, service_id: u32) -> Option<&ServiceKey> {
        self.keys_by_id.get(&service_id)
    }

    /// Records `p` as programmed under `key`, counting the references its inputs and its table hold.
    pub(super) fn put(&mut self, key: ServiceKey, p: Programmed) {
        // The new table's reference first: should the old entry hold the same table, it must not drop to zero.
        if let Some(offset) = table_offset(&p.value)
            && !self.tables.reference(offset)
        {
            self.inconsistent("an entry points at a table the ledger does not know");
        }
        match &p.inputs {
            Some(inputs) => {
                for &id in &inputs.ids {
                    let i = id as usize;
                    if i >= self.backends.refs.len() {
                        self.backends.refs.resize(i + 1, 0);
                    }
                    self.backends.refs[i] += 1;
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
        if let Some(old) = self.frontends.insert(key, p) {
            if old.value.service_id != id {
                self.inconsistent("a programmed key changed its service id");
            }
            self.release(&old);
        }
    }

    /// Forgets what is programmed under `key`, dropping the references it held.
    pub(super) fn remove(&mut self, key: &ServiceKey) -> Option<Programmed> {
        let old = self.frontends.remove(key)?;
        if self.keys_by_id.get(&old.value.service_id) == Some(key) {
            self.keys_by_id.remove(&old.value.service_id);
        } else {
            self.inconsistent("a programmed key missing from the id index");
        }
        self.release(&old);
        Some(old)
    }

    /// Forgets every remembered desired entry (the counts do not depend on them), so the next sync plans every
    /// frontend in full.
    pub(super) fn forget_entries(&mut self) {
        for p in self.frontends.values_mut() {
            p.entry = None;
        }
    }

    fn release(&mut self, old: &Programmed) {
        if let Some(offset) = table_offset(&old.value)
            && !self.tables.unreference(offset)
        {
            self.inconsistent("a table reference count below zero");
        }
        let Some(inputs) = &old.inputs else {
            self.unknown_inputs = self.unknown_inputs.saturating_sub(1);
            return;
        };
        for &id in &inputs.ids {
            match self.backends.refs.get_mut(id as usize) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    if *n == 0 {
                        self.backends.candidates.push(id);
                    }
                }
                _ => self.inconsistent("a backend reference count below zero"),
            }
        }
    }

    /// How many programmed frontends' inputs name `backend_id`.
    pub(super) fn references(&self, backend_id: u32) -> u32 {
        self.backends
            .refs
            .get(backend_id as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Programmed frontends whose inputs are unknown: their tables may name any backend.
    pub(super) fn unknown_inputs(&self) -> usize {
        self.unknown_inputs
    }

    /// The backends a deleted frontend leaves, for affinity purges and departures.
    pub(super) fn backend_ids_of(&self, key: &ServiceKey) -> Vec<u32> {
        let Some(p) = self.frontends.get(key) else {
            return Vec::new();
        };
        p.inputs
            .as_ref()
            .map(|inputs| inputs.ids.clone())
            .unwrap_or_else(|| {
                // After a restart the inputs are unknown until the first successful write: any backend may be named.
                self.backends.values.keys().copied().collect()
            })
    }

    pub(super) fn needs_full(&self) -> bool {
        self.needs_full
    }

    /// The next sync must visit every frontend (its skips would rest on something that changed).
    pub(super) fn distrust(&mut self) {
        self.needs_full = true;
    }

    /// The start of a full sync: recounts if the counts are distrusted; from here on they are trusted.
    pub(super) fn begin_full_sync(&mut self) {
        if self.needs_full {
            self.recount();
        }
        self.needs_full = false;
    }

    /// The start of any sync: candidates are collected afresh.
    pub(super) fn begin_sync(&mut self) {
        self.backends.candidates.clear();
    }

    /// Rebuilds the counts from what they count, so that a full sync after an inconsistency trusts nothing counted.
    fn recount(&mut self) {
        let mut refs: Vec<u32> = Vec::new();
        let mut unknown = 0;
        let mut keys_by_id = HashMap::with_capacity(self.frontends.len());
        let mut table_refs: HashMap<u64, u32> = HashMap::new();
        for (key, p) in &self.frontends {
            keys_by_id.insert(p.value.service_id, *key);
            if let Some(offset) = table_offset(&p.value) {
                *table_refs.entry(offset).or_default() += 1;
            }
            let Some(inputs) = &p.inputs else {
                unknown += 1;
                continue;
            };
            for &id in &inputs.ids {
                let i = id as usize;
                if i >= refs.len() {
                    refs.resize(i + 1, 0);
                }
                refs[i] += 1;
            }
        }
        self.backends.refs = refs;
        self.tables.recount(&table_refs);
        self.unknown_inputs = unknown;
        self.keys_by_id = keys_by_id;
        self.backends.values = self.backends.ids.iter().map(|(v, id)| (*id, *v)).collect();
    }

    /// The counts disagree with themselves: the next sync is a full one, which recounts.
    fn inconsistent(&mut self, what: &str) {
        tracing::warn!(
            what,
            "reconciler state inconsistent; the next sync visits every frontend"
        );
        self.needs_full = true;
    }

    /// Keeps the table at `offset` alive while a sync plans to point an entry at it (other frontends of the same
    /// sync may move away from it first). Every hold is dropped with [`Ledger::unhold_table`] once the entries are
    /// written, so between syncs the counts are entries alone.
    pub(super) fn hold_table(&mut self, offset: u64) {
        if !self.tables.reference(offset) {
            self.inconsistent("a sync holds a table the ledger does not know");
        }
    }

    pub(super) fn unhold_table(&mut self, offset: u64) {
        if !self.tables.unreference(offset) {
            self.inconsistent("a table hold released twice");
        }
    }

    pub(super) fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The table store, for what does not change which entries point where: finding, claiming and adding tables,
    /// holding one for the length of a sync, managing regions.
    pub(super) fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    /// An id for a new frontend: the one a migrated map gave its key (`true`: its counters carry over and must not
    /// be reset), or a fresh one.
    pub(super) fn allocate_service_id(&mut self, key: &ServiceKey) -> Option<(u32, bool)> {
        if let Some(id) = self.reserved.remove(key) {
            return Some((id, true));
        }
        self.service_ids.allocate().map(|id| (id, false))
    }

    /// The first full sync is done: ids no frontend took back are free.
    pub(super) fn release_reservations(&mut self) {
        for (_, id) in self.reserved.drain() {
            self.service_ids.free(id);
        }
    }

    pub(super) fn free_service_id(&mut self, id: u32) {
        self.service_ids.free(id);
    }

    pub(super) fn service_id_capacity(&self) -> u32 {
        self.service_ids.capacity()
    }

    pub(super) fn backend_id(&self, value: &BackendValue) -> Option<u32> {
        self.backends.ids.get(value).copied()
    }

    pub(super) fn backend_value(&self, id: u32) -> Option<&BackendValue> {
        self.backends.values.get(&id)
    }

    pub(super) fn backend_values(&self) -> &HashMap<u32, BackendValue> {
        &self.backends.values
    }

    pub(super) fn backend_count(&self) -> usize {
        self.backends.ids.len()
    }

    pub(super) fn backend_id_capacity(&self) -> u32 {
        self.backends.alloc.capacity()
    }

    /// Every backend in the order of their values (the order a full sync deletes in).
    pub(super) fn backends(&self) -> impl Iterator<Item = (BackendValue, u32)> + '_ {
        self.backends.ids.iter().map(|(v, id)| (*v, *id))
    }

    /// Backend ids whose last reference went, or that were allocated, in this sync.
    pub(super) fn candidates(&self) -> &[u32] {
        &self.backends.candidates
    }

    pub(super) fn allocate_backend_id(&mut self) -> Option<u32> {
        self.backends.alloc.allocate()
    }

    /// Gives back an id whose backend could not be written.
    pub(super) fn free_backend_id(&mut self, id: u32) {
        self.backends.alloc.free(id);
    }

    /// A backend written under a newly allocated id; unused until a frontend's inputs name it.
    pub(super) fn add_backend(&mut self, id: u32, value: BackendValue) {
        self.backends.ids.insert(value, id);
        self.backends.values.insert(id, value);
        // Unused if the frontend that asked for it fails later on.
        self.backends.candidates.push(id);
    }

    /// A backend deleted from `LB_BACKENDS`: its id goes back to the pool.
    pub(super) fn forget_backend(&mut self, value: &BackendValue, id: u32) {
        self.backends.ids.remove(value);
        self.backends.values.remove(&id);
        self.backends.alloc.free(id);
    }
}

#[cfg(test)]
impl Ledger {
    /// Everything the ledger holds, to compare two of them.
    pub(super) fn snapshot(&self) -> String {
        let mut refs = self.backends.refs.clone();
        while refs.last() == Some(&0) {
            refs.pop();
        }
        format!(
            "{:?}",
            (
                &self.frontends,
                &self.backends.ids,
                self.backends.values.iter().collect::<BTreeMap<_, _>>(),
                refs,
                self.keys_by_id.iter().collect::<BTreeMap<_, _>>(),
                self.reserved.iter().collect::<BTreeMap<_, _>>(),
                self.unknown_inputs,
                self.needs_full,
                (&self.service_ids, &self.backends.alloc),
                self.tables.snapshot(),
            )
        )
    }

    /// Loses the reference counts, as a bug would.
    pub(super) fn lose_counts(&mut self) {
        self.backends.refs.clear();
    }

    pub(super) fn programmed(&self) -> impl Iterator<Item = (&ServiceKey, &Programmed)> {
        self.frontends.iter()
    }

    /// The counts agree with what they count; `kept` says which unused backends may legitimately remain (their
    /// delete failed, or a failed entry write pinned them).
    pub(super) fn check_counts(&self, kept: impl Fn(u32) -> bool) {
        let mut refs: Vec<u32> = Vec::new();
        for p in self.frontends.values() {
            for &id in p.inputs.iter().flat_map(|inputs| &inputs.ids) {
                if refs.len() <= id as usize {
                    refs.resize(id as usize + 1, 0);
                }
                refs[id as usize] += 1;
                assert!(
                    self.backends.values.contains_key(&id),
                    "backend {id} in use but forgotten"
                );
            }
        }
        let mut counted = self.backends.refs.clone();
        counted.resize(counted.len().max(refs.len()), 0);
        refs.resize(counted.len(), 0);
        assert_eq!(counted, refs, "backend reference counts");
        let keys: HashMap<u32, ServiceKey> = self
            .frontends
            .iter()
            .map(|(k, p)| (p.value.service_id, *k))
            .collect();
        assert_eq!(self.keys_by_id, keys, "service id index");
        let unknown = self
            .frontends
            .values()
            .filter(|p| p.inputs.is_none())
            .count();
        assert_eq!(self.unknown_inputs, unknown);
        let mut table_refs: BTreeMap<u64, u32> = BTreeMap::new();
        for p in self.frontends.values() {
            if let Some(offset) = table_offset(&p.value) {
                *table_refs.entry(offset).or_default() += 1;
            }
        }
        assert_eq!(
            self.tables.references(),
            table_refs,
            "table reference counts"
        );
        let values: HashMap<u32, BackendValue> =
            self.backends.ids.iter().map(|(v, id)| (*id, *v)).collect();
        assert_eq!(self.backends.values, values);
        // And what the counts decide: no backend outlives its last user unless it is kept for a reason, or a
        // frontend of unknown inputs may name it.
        if self.unknown_inputs == 0 {
            for id in self.backends.ids.values() {
                assert!(
                    refs.get(*id as usize).is_some_and(|n| *n > 0) || kept(*id),
                    "backend {id} unused but kept"
                );
            }
        }
    }
}
