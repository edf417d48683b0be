//! Phase 1 of a sync for one frontend: its new backends written, its service id allocated, its table built in
//! memory. Nothing a reader follows is touched yet: the table and the service entry are written by the later
//! phases (`Reconciler::run`), for every planned frontend at once.

use lb_common::{
    BACKEND_FLAG_LOCAL, BackendValue, SVC_FLAG_DROP_NO_BACKEND, SVC_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue,
};

use super::super::maps::Maps;
use super::ReconcileConfig;
use super::SyncReport;
use super::error::FrontendError;
use super::ledger::{Inputs, Ledger, Programmed};
use super::retry::Retry;
use crate::maglev;
use crate::state::{Algorithm, Frontend, ServiceEntry};

/// Phase 1's verdict on one frontend.
enum Planned {
    /// Nothing to write.
    Unchanged,
    Write(Box<Pending>),
}

/// A frontend whose backends are written and whose table is built, waiting for phases 2 and 3 of a sync.
pub(super) struct Pending {
    pub(super) frontend: Frontend,
    pub(super) key: ServiceKey,
    pub(super) value: ServiceValue,
    pub(super) inputs: Inputs,
    pub(super) ids: Vec<u32>,
    /// The new table, when it changed and the service has backends (taken by phase 2).
    pub(super) table: Option<Vec<u32>>,
    /// The backends of the table being replaced, for affinity purges and departures.
    pub(super) previous_ids: Option<Vec<u32>>,
    /// The programmed entry, `None` for a new frontend (whose id goes back to the pool on failure).
    pub(super) previous: Option<ServiceValue>,
    /// The desired entry this was planned from, remembered once written.
    pub(super) entry: ServiceEntry,
}

/// Phase 1 for one desired frontend: skipped when its entry is the one programmed, else planned into `pending`,
/// or failed into `report` and `failed` (keeping whatever it had).
#[allow(clippy::too_many_arguments)]
pub(super) fn plan_frontend(
    ledger: &mut Ledger,
    cfg: &ReconcileConfig,
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
    }) = ledger.get(&key)
        && programmed == entry
    {
        return;
    }
    match plan_service(ledger, cfg, maps, frontend, &key, entry, report) {
        Ok(Planned::Unchanged) => {}
        Ok(Planned::Write(p)) => pending.push(*p),
        Err(reason) => {
            // Keeps whatever it had, as in phase 3.
            failed.frontends.insert(*frontend);
            report.failed.push((*frontend, reason));
        }
    }
}

/// Writes the frontend's new backends, allocates its id, builds its table if that changed. Writes neither the
/// table nor the service entry.
fn plan_service(
    ledger: &mut Ledger,
    cfg: &ReconcileConfig,
    maps: &mut impl Maps,
    frontend: &Frontend,
    key: &ServiceKey,
    entry: &ServiceEntry,
    report: &mut SyncReport,
) -> Result<Planned, FrontendError> {
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

    // The remembered entry is not needed here (and cloning it is not free).
    let previous = ledger
        .get(key)
        .map(|p| (p.value, p.inputs.clone(), p.entry_deleted));
    let inputs = (
        entry.algorithm,
        ids.clone(),
        table_size(cfg, entry.algorithm, ids.len()),
    );
    let (slots, table_hash) = match &previous {
        Some((value, previous_inputs, _)) if previous_inputs.as_ref() == Some(&inputs) => {
            (None, value.table_hash)
        }
        _ => {
            let slots = build_slots(entry, &ids, inputs.2)?;
            let hash = table_hash(entry.algorithm, &slots);
            (Some(slots), hash)
        }
    };

    let service_id = match &previous {
        Some((value, _, _)) => value.service_id,
        None => {
            let id =
                ledger
                    .allocate_service_id()
                    .ok_or_else(|| FrontendError::ServiceCapacity {
                        capacity: ledger.service_id_capacity(),
                    })?;
            if let Err(e) = maps.reset_service_stats(id) {
                ledger.free_service_id(id);
                return Err(e.into());
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
        ledger.put(
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
            None => match build_slots(entry, &ids, inputs.2) {
                Ok(s) => Some(s),
                Err(e) => {
                    if previous.is_none() {
                        ledger.free_service_id(service_id);
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

fn table_size(cfg: &ReconcileConfig, algorithm: Algorithm, backends: usize) -> u32 {
    match algorithm {
        Algorithm::Maglev => {
            maglev::stable_table_size(backends, cfg.maglev_min_size, cfg.maglev_max_size)
        }
        Algorithm::Random => backends as u32,
    }
}

/// The lookup table: Maglev slots, or the plain backend list for random selection.
fn build_slots(entry: &ServiceEntry, ids: &[u32], size: u32) -> Result<Vec<u32>, FrontendError> {
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
            let table = maglev::build_table(&input, size)?;
            Ok(table.into_iter().map(|i| ids[i as usize]).collect())
        }
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
