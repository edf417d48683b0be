//! The lookup tables in the slot array, stored once per content: frontends whose tables would be identical (the
//! External and Internal frontends of a Service whose traffic policies are both Cluster, or two Services with the
//! same endpoints) point at one region, counted.
//!
//! A table is known by its inputs (algorithm, backend ids, weights, size), from which its bytes follow; a table
//! adopted after a restart is known only by its layout and hash until a frontend that wants exactly those bytes
//! claims it. The reference counts are kept by the ledger ([`super::ledger::Ledger::put`] and `remove`): a table
//! whose last entry moved away leaves for quarantine ([`super::regions`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use lb_common::ServiceValue;

use super::regions::Regions;
use crate::datapath::lut::Layout;
use crate::state::Algorithm;

/// What a frontend's table is built from; equal inputs build equal tables, which are then stored once.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Inputs {
    pub(super) algorithm: Algorithm,
    /// Backend ids in table order.
    pub(super) ids: Vec<u32>,
    /// Their Maglev weights, empty when all are 1.
    pub(super) weights: Vec<u32>,
    /// Slots.
    pub(super) size: u32,
}

/// One table in the slot array.
#[derive(Debug, PartialEq)]
pub(super) struct Table {
    pub(super) layout: Layout,
    pub(super) hash: u64,
    /// Programmed entries pointing at it.
    refs: u32,
    /// What it was built from; `None` for a table adopted after a restart and not yet claimed.
    inputs: Option<Arc<Inputs>>,
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct Tables {
    /// Live tables by region offset.
    live: BTreeMap<u64, Table>,
    /// Live tables of known inputs.
    by_inputs: HashMap<Arc<Inputs>, u64>,
    regions: Regions,
    /// Regions whose last entry moved away since the last [`Tables::quarantine_released`].
    released: Vec<(u64, u64)>,
}

impl Tables {
    /// Adopts the tables the programmed entries point at, in an array of `capacity` bytes; everything else is
    /// quarantined under `epoch` (see [`Regions::restore`]).
    pub(super) fn restore<'a>(
        values: impl Iterator<Item = &'a ServiceValue>,
        capacity: u64,
        epoch: u64,
    ) -> Self {
        let mut live: BTreeMap<u64, Table> = BTreeMap::new();
        for v in values {
            let Some(layout) = Layout::of(v) else {
                continue;
            };
            let offset = u64::from(v.table_offset);
            let t = live.entry(offset).or_insert(Table {
                layout,
                hash: v.table_hash,
                refs: 0,
                inputs: None,
            });
            if t.layout != layout || t.hash != v.table_hash {
                // Two entries disagree on what is at one offset (no agent writes that): keep the larger claim, and
                // the frontends whose hash differs are rewritten anyway.
                tracing::warn!(
                    offset,
                    "two service entries describe different tables at one offset"
                );
                if layout.region_len() > t.layout.region_len() {
                    t.layout = layout;
                }
            }
            t.refs += 1;
        }
        let regions: Vec<(u64, u64)> = live
            .iter()
            .map(|(offset, t)| (*offset, t.layout.region_len()))
            .collect();
        Tables {
            live,
            by_inputs: HashMap::new(),
            regions: Regions::restore(capacity, &regions, epoch),
            released: Vec::new(),
        }
    }

    /// The live table built from `inputs`, if any.
    pub(super) fn find(&self, inputs: &Inputs) -> Option<(u64, &Table)> {
        let offset = *self.by_inputs.get(inputs)?;
        self.live.get(&offset).map(|t| (offset, t))
    }

    pub(super) fn get(&self, offset: u64) -> Option<&Table> {
        self.live.get(&offset)
    }

    /// A table adopted after a restart turns out to hold exactly what `inputs` build: it is known by them now.
    pub(super) fn claim(&mut self, offset: u64, inputs: &Arc<Inputs>) {
        if let Some(t) = self.live.get_mut(&offset)
            && t.inputs.is_none()
            && !self.by_inputs.contains_key(inputs)
        {
            t.inputs = Some(Arc::clone(inputs));
            self.by_inputs.insert(Arc::clone(inputs), offset);
        }
    }

    /// A table just written at `offset`, not yet referenced by any entry.
    pub(super) fn add(&mut self, offset: u64, layout: Layout, hash: u64, inputs: Arc<Inputs>) {
        self.by_inputs.insert(Arc::clone(&inputs), offset);
        self.live.insert(
            offset,
            Table {
                layout,
                hash,
                refs: 0,
                inputs: Some(inputs),
            },
        );
    }

    /// An entry points at the table at `offset`. `false` when there is none (the counts are then inconsistent).
    pub(super) fn reference(&mut self, offset: u64) -> bool {
        match self.live.get_mut(&offset) {
            Some(t) => {
                t.refs += 1;
                true
            }
            None => false,
        }
    }

    /// An entry stopped pointing at the table at `offset`; the last one sends it to quarantine (at the next
    /// [`Tables::quarantine_released`]). `false` when there was no reference to drop.
    pub(super) fn unreference(&mut self, offset: u64) -> bool {
        let Some(t) = self.live.get_mut(&offset) else {
            return false;
        };
        if t.refs == 0 {
            return false;
        }
        t.refs -= 1;
        if t.refs == 0
            && let Some(t) = self.live.remove(&offset)
        {
            self.forget_inputs(&t, offset);
            self.released.push((offset, t.layout.region_len()));
        }
        true
    }

    fn forget_inputs(&mut self, t: &Table, offset: u64) {
        if let Some(inputs) = &t.inputs
            && self.by_inputs.get(inputs) == Some(&offset)
        {
            self.by_inputs.remove(inputs);
        }
    }

    /// Quarantines the regions released since the last call under `epoch`, the fences started by now (read after
    /// the entry switches that released them). Whether any was.
    pub(super) fn quarantine_released(&mut self, epoch: u64) -> bool {
        let any = !self.released.is_empty();
        for (offset, len) in self.released.drain(..) {
            self.regions.free_after_fence(offset, len, epoch);
        }
        any
    }

    pub(super) fn regions(&self) -> &Regions {
        &self.regions
    }

    pub(super) fn regions_mut(&mut self) -> &mut Regions {
        &mut self.regions
    }

    /// Every table's reference count set to `count(offset)`; tables nobody references go to quarantine.
    pub(super) fn recount(&mut self, counts: &HashMap<u64, u32>) {
        let offsets: Vec<u64> = self.live.keys().copied().collect();
        for offset in offsets {
            let n = counts.get(&offset).copied().unwrap_or(0);
            if let Some(t) = self.live.get_mut(&offset) {
                t.refs = n;
            }
            if n == 0
                && let Some(t) = self.live.remove(&offset)
            {
                self.forget_inputs(&t, offset);
                self.released.push((offset, t.layout.region_len()));
            }
        }
    }

    /// Everything the store holds, in a stable order, to compare two of them.
    #[cfg(test)]
    pub(super) fn snapshot(&self) -> String {
        let by_inputs: BTreeMap<u64, &Inputs> =
            self.by_inputs.iter().map(|(i, o)| (*o, &**i)).collect();
        format!(
            "{:?} {:?} {:?} {:?}",
            self.live, by_inputs, self.regions, self.released
        )
    }

    /// (offset, references) of every live table, for the tests' consistency checks.
    #[cfg(test)]
    pub(super) fn references(&self) -> BTreeMap<u64, u32> {
        self.live.iter().map(|(o, t)| (*o, t.refs)).collect()
    }
}
