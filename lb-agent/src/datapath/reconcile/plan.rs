//! Phase 1 of a sync for one frontend: its new backends written, its service id allocated, its table found (an
//! identical table already in the slot array, or one planned earlier in this sync) or built in memory. Nothing a
//! reader follows is touched yet: new tables and service entries are written by the later phases
//! (`Reconciler::run`), for every planned frontend at once.

use std::collections::HashMap;
use std::sync::Arc;

use lb_common::{
    BACKEND_FLAG_LOCAL, BackendValue, SVC_FLAG_DROP_NO_BACKEND, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue,
};

use super::super::lut::{self, Encoded, Layout};
use super::super::maps::Maps;
use super::ReconcileConfig;
use super::SyncReport;
use super::error::FrontendError;
use super::ledger::{Ledger, Programmed};
use super::retry::Retry;
use super::tables::Inputs;
use crate::maglev;
use crate::state::{Algorithm, Frontend, ServiceEntry};

/// A frontend whose backends are written and whose table is found or built, waiting for phases 2 and 3.
pub(super) struct Pending {
    pub(super) frontend: Frontend,
    pub(super) key: ServiceKey,
    /// The entry to write; its `table_offset` is filled in by phase 2 when the table is new.
    pub(super) value: ServiceValue,
    pub(super) inputs: Arc<Inputs>,
    /// Where its table comes from.
    pub(super) table: TableSource,
    /// The backends of the table being replaced, for affinity purges and departures.
    pub(super) previous_ids: Option<Vec<u32>>,
    /// The programmed entry, `None` for a new frontend (whose id goes back to the pool on failure).
    pub(super) previous: Option<ServiceValue>,
    /// The desired entry this was planned from, remembered once written.
    pub(super) entry: ServiceEntry,
}

pub(super) enum TableSource {
    /// No backends, no table.
    None,
    /// A table already in the slot array, held for this sync (`Ledger::hold_table`).
    Held(u64),
    /// A table this sync writes: index into [`Plan::new_tables`].
    New(usize),
}

/// A table to write in phase 2.
pub(super) struct NewTable {
    pub(super) inputs: Arc<Inputs>,
    pub(super) encoded: Encoded,
    pub(super) hash: u64,
    /// Where phase 2 wrote it, or why it could not.
    pub(super) outcome: Option<Result<u64, FrontendError>>,
}

/// What phase 1 of one sync planned.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) pending: Vec<Pending>,
    pub(super) new_tables: Vec<NewTable>,
    new_by_inputs: HashMap<Arc<Inputs>, usize>,
}

/// Phase 1 for one desired frontend: skipped when its entry is the one programmed, else planned into `plan`,
/// or failed into `report` and `failed` (keeping whatever it had).
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per piece of the sync's state that phase 1 reads or updates, each owned elsewhere"
)]
pub(super) fn plan_frontend(
    ledger: &mut Ledger,
    cfg: &ReconcileConfig,
    maps: &mut impl Maps,
    frontend: &Frontend,
    key: ServiceKey,
    entry: &ServiceEntry,
    plan: &mut Plan,
    report: &mut SyncReport,
    failed: &mut Retry,
) {
    if let Some(Programmed {
        inputs: Some(_),
        entry: Some(programmed),
        ..
    }) = ledger.get(&key)
        && programmed == entry
    {
        return;
    }
    if let Err(reason) = plan_service(ledger, cfg, maps, frontend, &key, entry, plan, report) {
        // Keeps whatever it had, as in phase 3.
        failed.frontends.insert(*frontend);
        report.failed.push((*frontend, reason));
    }
}

/// Writes the frontend's new backends, allocates its id, finds or builds its table. Writes neither the table nor
/// the service entry.
#[expect(
    clippy::too_many_arguments,
    reason = "one argument per piece of the sync's state that planning reads or updates, each owned elsewhere"
)]
fn plan_service(
    ledger: &mut Ledger,
    cfg: &ReconcileConfig,
    maps: &mut impl Maps,
    frontend: &Frontend,
    key: &ServiceKey,
    entry: &ServiceEntry,
    plan: &mut Plan,
    report: &mut SyncReport,
) -> Result<(), FrontendError> {
    let proto = frontend.proto.number();
    let mut ids = Vec::with_capacity(entry.backends.len());
    for b in &entry.backends {
        let value = BackendValue {
            flags: if b.local { BACKEND_FLAG_LOCAL } else { 0 },
            ..BackendValue::new(b.addr, b.port, proto)
        };
        let id = match ledger.backend_id(&value) {
            Some(id) => id,
            None => {
                let id =
                    ledger
                        .allocate_backend_id()
                        .ok_or_else(|| FrontendError::BackendCapacity {
                            capacity: ledger.backend_id_capacity(),
                            needed: None,
                            backend: *b,
                        })?;
                let written = maps
                    .reset_backend_stats(id)
                    .and_then(|()| maps.put_backend(id, &value));
                if let Err(e) = written {
                    ledger.free_backend_id(id);
                    return Err(e.into());
                }
                ledger.add_backend(id, value);
                report.backends_written += 1;
                id
            }
        };
        ids.push(id);
    }

    let previous = ledger.get(key).map(|p| (p.value, p.inputs.clone()));
    let weights: Vec<u32> = if entry.backends.iter().all(|b| b.weight == 1) {
        Vec::new()
    } else {
        entry.backends.iter().map(|b| u32::from(b.weight)).collect()
    };
    let wanted = Inputs {
        algorithm: entry.algorithm,
        size: table_size(cfg, entry.algorithm, ids.len()),
        ids,
        weights,
    };
    // The programmed inputs when equal, so that equal inputs share one allocation.
    let inputs = match &previous {
        Some((_, Some(p))) if **p == wanted => Arc::clone(p),
        _ => Arc::new(wanted),
    };

    // The table: none; the one programmed (same inputs); an identical one in the slot array or planned this sync;
    // the restored one when its bytes are what would be written; or a new one.
    let mut table = TableSource::None;
    let mut described: Option<(Layout, u64)> = None;
    if !inputs.ids.is_empty() {
        let programmed = previous.as_ref().and_then(|(v, p)| {
            let offset = u64::from(v.table_offset);
            let t = ledger.tables().get(offset)?;
            Layout::of(v).map(|_| (offset, t.layout, t.hash, p.as_ref()))
        });
        if let Some((offset, layout, hash, Some(p))) = programmed
            && **p == *inputs
        {
            table = TableSource::Held(offset);
            described = Some((layout, hash));
        } else if let Some((offset, t)) = ledger.tables().find(&inputs) {
            described = Some((t.layout, t.hash));
            table = TableSource::Held(offset);
        } else if let Some(&i) = plan.new_by_inputs.get(&inputs) {
            let t = &plan.new_tables[i];
            described = Some((t.encoded.layout, t.hash));
            table = TableSource::New(i);
        } else {
            let encoded = build(entry, &inputs)?;
            let hash = encoded.hash(inputs.algorithm.number());
            match programmed {
                Some((offset, layout, h, None)) if layout == encoded.layout && h == hash => {
                    // Restored, and holding exactly these bytes: known by these inputs from now on.
                    ledger.tables_mut().claim(offset, &inputs);
                    table = TableSource::Held(offset);
                }
                _ => {
                    let i = plan.new_tables.len();
                    plan.new_by_inputs.insert(Arc::clone(&inputs), i);
                    plan.new_tables.push(NewTable {
                        inputs: Arc::clone(&inputs),
                        encoded: encoded.clone(),
                        hash,
                        outcome: None,
                    });
                    table = TableSource::New(i);
                }
            }
            described = Some((encoded.layout, hash));
        }
    }

    let service_id = match &previous {
        Some((value, _)) => value.service_id,
        None => {
            let (id, carried_over) =
                ledger
                    .allocate_service_id(key)
                    .ok_or_else(|| FrontendError::ServiceCapacity {
                        capacity: ledger.service_id_capacity(),
                        needed: None,
                    })?;
            if !carried_over && let Err(e) = maps.reset_service_stats(id) {
                ledger.free_service_id(id);
                return Err(e.into());
            }
            id
        }
    };
    let (layout, table_hash) = match described {
        Some((l, h)) => (Some(l), h),
        None => (None, 0),
    };
    let value = ServiceValue {
        service_id,
        backend_count: inputs.ids.len() as u32,
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
        slot_width: layout.map_or(0, |l| l.width),
        _pad: 0,
        table_offset: match table {
            TableSource::Held(offset) => offset as u32,
            TableSource::None | TableSource::New(_) => 0,
        },
        table_size: layout.map_or(0, |l| l.size),
        table_hash,
    };
    if let (Some((previous_value, _)), TableSource::Held(_) | TableSource::None) =
        (&previous, &table)
        && *previous_value == value
    {
        // Nothing to write; what it was built from is known now (after a restart it was not).
        ledger.put(
            *key,
            Programmed {
                value,
                inputs: Some(inputs),
                entry: Some(entry.clone()),
            },
        );
        return Ok(());
    }

    // Backends that leave a service must not keep its clients through affinity, nor through sockets connected to
    // them. Read before the entry is replaced: after a restart the previous set is known only from the table.
    let previous_ids: Option<Vec<u32>> = match &previous {
        Some((v, previous_inputs)) if v.table_hash != table_hash => Some(match previous_inputs {
            Some(p) => p.ids.clone(),
            None => read_backend_ids(maps, v).unwrap_or_default(),
        }),
        _ => None,
    };
    if let TableSource::Held(offset) = table {
        // Kept alive until phase 3 is done, whatever other frontends do meanwhile.
        ledger.hold_table(offset);
    }
    plan.pending.push(Pending {
        frontend: *frontend,
        key: *key,
        value,
        inputs,
        table,
        previous_ids,
        previous: previous.map(|(v, _)| v),
        entry: entry.clone(),
    });
    Ok(())
}

/// The distinct backends a programmed table names, read from the slot array.
fn read_backend_ids(maps: &impl Maps, value: &ServiceValue) -> Option<Vec<u32>> {
    let layout = Layout::of(value)?;
    let bytes = maps
        .read_slots(u64::from(value.table_offset), layout.bytes())
        .ok()?;
    lut::backend_ids(&layout, &bytes)
}

fn table_size(cfg: &ReconcileConfig, algorithm: Algorithm, backends: usize) -> u32 {
    match algorithm {
        Algorithm::Maglev => {
            maglev::stable_table_size(backends, cfg.maglev_min_size, cfg.maglev_max_size)
        }
        Algorithm::Random => backends as u32,
    }
}

/// The table's bytes: Maglev slots, or the plain backend list for random selection.
fn build(entry: &ServiceEntry, inputs: &Inputs) -> Result<Encoded, FrontendError> {
    match inputs.algorithm {
        Algorithm::Random => Ok(Encoded::plain(&inputs.ids)),
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
            let slots = maglev::build_table(&input, inputs.size)?;
            Ok(Encoded::maglev(&inputs.ids, &slots))
        }
    }
}
