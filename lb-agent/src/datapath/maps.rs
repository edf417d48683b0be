//! Access to lb's maps through two traits (as cilium's `pkg/loadbalancer/maps/lbmaps.go` does): [`MapsRead`] for
//! reading and [`Maps`] for writing. [`PinnedMaps`] talks to the kernel; `FakeMaps` is an in-memory stand-in for
//! tests, compiled only into test builds (`cfg(test)`, or the `test-support` feature for integration tests). The
//! reconciler is the only writer.

use std::collections::HashSet;
#[cfg(any(test, feature = "test-support"))]
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use super::map_batch;
use super::map_error::{MapsError, open_pinned};
use super::packet_maps::NodeEntry;
use aya::maps::{
    Array, HashMap, HashOfMaps, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
};
use aya::sys::SyscallError;
use lb_common::{
    AffinityKey, AffinityValue, BPF_F_INNER_MAP, BackendStats, BackendValue, LUT_LEN_INDEX,
    ServiceKey, ServiceStats, ServiceValue, SockRevNatKey, SockRevNatValue, map_names,
};

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

/// Which affinity entries a sync invalidated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleAffinity {
    /// Deleted services: every entry of theirs goes.
    pub services: HashSet<u32>,
    /// (service id, backend id) pairs whose backend left the service.
    pub pairs: HashSet<(u32, u32)>,
}

impl StaleAffinity {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.pairs.is_empty()
    }

    pub fn covers(&self, key: &AffinityKey, value: &AffinityValue) -> bool {
        self.services.contains(&key.service_id)
            || self.pairs.contains(&(key.service_id, value.backend_id))
    }
}

/// Reading the maps: what the reconciler adopts at start and the read-only views (`inspect`, `listings`) show. The
/// views take this trait, not [`PinnedMaps`], so they run on [`FakeMaps`] in tests just as on the pins.
pub trait MapsRead {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError>;
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapsError>;
    /// Reads a service's lookup table (slots only); `None` when it has none.
    fn table(&self, service_id: u32) -> Result<Option<Vec<u32>>, MapsError>;
    /// A service's counters summed over CPUs (zero for maps that keep none).
    fn service_stats(&self, _service_id: u32) -> Result<ServiceStats, MapsError> {
        Ok(ServiceStats::default())
    }
    /// A backend's counters summed over CPUs (zero for maps that keep none).
    fn backend_stats(&self, _backend_id: u32) -> Result<BackendStats, MapsError> {
        Ok(BackendStats::default())
    }
    /// Session-affinity entries.
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapsError> {
        Ok(Vec::new())
    }
    /// Sockets the socket LB translated and still remembers (for reverse translation).
    fn sock_revnat_entries(&self) -> Result<Vec<(SockRevNatKey, SockRevNatValue)>, MapsError> {
        Ok(Vec::new())
    }

    // The per-packet datapath's node-level maps (`packet_maps`). The defaults keep nothing, for maps without a
    // per-packet datapath.

    /// The `LB_CONFIG` record.
    fn config(&self) -> Result<lb_common::ConfigValue, MapsError> {
        Ok(lb_common::ConfigValue::default())
    }
    /// Every entry of `LB_LOCAL_NETS`, `LB_SRC_RANGES`, `LB_VIPS` and `LB_SVC_CIDRS`.
    fn node_entries(&self) -> Result<Vec<NodeEntry>, MapsError> {
        Ok(Vec::new())
    }
}

/// Writing the maps: what the reconciler needs besides reading them. The reconciler is the only caller.
pub trait Maps: MapsRead {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapsError>;
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapsError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError>;
    /// Installs `slots` (backend ids) as service `service_id`'s lookup table, replacing any previous table in one
    /// atomic update, so a reader sees the old table or the new one, never a mix.
    fn put_table(&mut self, service_id: u32, slots: &[u32]) -> Result<(), MapsError>;
    fn delete_table(&mut self, service_id: u32) -> Result<(), MapsError>;
    /// Installs many tables as [`Maps::put_table`] does each, in as few kernel operations as possible: every
    /// update of the map-of-maps waits for an RCU grace period, a batch only once (Linux >= 6.7). Returns the
    /// service ids whose table could not be installed, with why; every other table is installed.
    fn put_tables(&mut self, tables: &[(u32, Vec<u32>)]) -> Vec<(u32, MapsError)>;
    /// Deletes many tables (a missing one counts as deleted), batched as [`Maps::put_tables`]. Returns the ids
    /// that could not be deleted.
    fn delete_tables(&mut self, service_ids: &[u32]) -> Vec<(u32, MapsError)>;
    /// Zeroes a service's counters when its id is (re)allocated, so a new service never inherits old numbers.
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), MapsError>;
    fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), MapsError>;
    /// Removes affinity entries that may no longer be followed: those of deleted services, and those pointing at a
    /// backend that left that service (backend ids are shared between services, so the datapath's "does the
    /// backend still exist" check alone would keep a client on a backend its service no longer has).
    fn purge_affinity(&mut self, stale: &StaleAffinity) -> Result<usize, MapsError>;

    // The per-packet datapath's node-level maps (`packet_maps`). The defaults keep nothing, for maps without a
    // per-packet datapath.

    fn put_config(&mut self, _value: &lb_common::ConfigValue) -> Result<(), MapsError> {
        Ok(())
    }
    fn put_node_entry(&mut self, _e: &NodeEntry) -> Result<(), MapsError> {
        Ok(())
    }
    fn delete_node_entry(&mut self, _e: &NodeEntry) -> Result<(), MapsError> {
        Ok(())
    }
}

/// The pinned maps, opened from the loaded object (the agent) or from their pins (the CLI).
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    /// `LB_MAGLEV`'s fd again, for the batch commands aya 0.14 lacks (`map_batch`).
    maglev_fd: OwnedFd,
    /// Set once the kernel refused a batch command that a single update then accepted: use single updates.
    batch_unsupported: bool,
    /// The same for filling inner tables (array maps), which is decided separately: the outer hash-of-maps and
    /// the inner arrays have separate batch implementations.
    fill_batch_unsupported: bool,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    be_stats: PerCpuArray<MapData, BackendStats>,
    nr_cpus: usize,
    /// The per-packet datapath's maps.
    pub packet: super::packet_maps::PacketMaps,
}

impl PinnedMaps {
    /// Takes the maps out of a freshly loaded object (they are already pinned by the loader).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { map: name });
        let maps = [
            take(map_names::SERVICES)?,
            take(map_names::BACKENDS)?,
            take(map_names::MAGLEV)?,
            take(map_names::AFFINITY)?,
            take(map_names::SOCK_REVNAT)?,
            take(map_names::SVC_STATS)?,
            take(map_names::BE_STATS)?,
        ];
        let packet = super::packet_maps::PacketMaps::from_ebpf(ebpf)?;
        Self::from_maps(maps, packet)
    }

    /// Opens the maps pinned under `dir`, for the CLI (works whether or not the agent runs).
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| open_pinned(dir, name);
        Self::from_maps(
            [
                open(map_names::SERVICES)?,
                open(map_names::BACKENDS)?,
                open(map_names::MAGLEV)?,
                open(map_names::AFFINITY)?,
                open(map_names::SOCK_REVNAT)?,
                open(map_names::SVC_STATS)?,
                open(map_names::BE_STATS)?,
            ],
            super::packet_maps::PacketMaps::open(dir)?,
        )
    }

    fn from_maps(
        maps: [Map; 7],
        packet: super::packet_maps::PacketMaps,
    ) -> Result<Self, MapsError> {
        let [
            services,
            backends,
            maglev,
            affinity,
            sock_revnat,
            svc_stats,
            be_stats,
        ] = maps;
        let layout = |map: &'static str| move |source| MapsError::Layout { map, source };
        // aya 0.14's HashOfMaps does not expose its fd; keep a duplicate for the batch commands.
        let maglev_fd = match &maglev {
            Map::HashOfMaps(data) => Some(data.fd().as_fd().try_clone_to_owned().map_err(
                |source| MapsError::Fd {
                    map: map_names::MAGLEV,
                    source,
                },
            )?),
            _ => None,
        };
        let maglev = HashOfMaps::try_from(maglev).map_err(layout(map_names::MAGLEV))?;
        // Not a HashOfMaps would have failed the conversion above.
        let maglev_fd = maglev_fd.ok_or(MapsError::Missing {
            map: map_names::MAGLEV,
        })?;
        Ok(Self {
            maglev_fd,
            batch_unsupported: false,
            fill_batch_unsupported: false,
            services: HashMap::try_from(services).map_err(layout(map_names::SERVICES))?,
            backends: HashMap::try_from(backends).map_err(layout(map_names::BACKENDS))?,
            maglev,
            affinity: HashMap::try_from(affinity).map_err(layout(map_names::AFFINITY))?,
            sock_revnat: HashMap::try_from(sock_revnat).map_err(layout(map_names::SOCK_REVNAT))?,
            svc_stats: PerCpuArray::try_from(svc_stats).map_err(layout(map_names::SVC_STATS))?,
            be_stats: PerCpuArray::try_from(be_stats).map_err(layout(map_names::BE_STATS))?,
            nr_cpus: aya::util::nr_cpus()
                .map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?,
            packet,
        })
    }

    /// One `BPF_MAP_UPDATE_BATCH` of at most [`TABLE_BATCH`] tables (see [`Maps::put_tables`]).
    fn put_tables_chunk(&mut self, tables: &[(u32, Vec<u32>)]) -> Vec<(u32, MapsError)> {
        let mut failed = Vec::new();
        // Every inner map stays open until the batch returns; the outer map then holds its own reference.
        let mut ids = Vec::with_capacity(tables.len());
        let mut inners = Vec::with_capacity(tables.len());
        for (id, slots) in tables {
            match inner_table(slots, &mut self.fill_batch_unsupported) {
                Ok(inner) => {
                    ids.push(*id);
                    inners.push(inner);
                }
                Err(e) => failed.push((*id, e)),
            }
        }
        let fds: Vec<u32> = inners
            .iter()
            .map(|inner| inner.map().fd().as_fd().as_raw_fd() as u32)
            .collect();
        let mut start = 0;
        while start < ids.len() {
            if self.batch_unsupported {
                for (id, inner) in ids[start..].iter().zip(&inners[start..]) {
                    if let Err(e) = self.maglev.insert(id, inner, 0) {
                        failed.push((*id, op(map_names::MAGLEV, "update")(e)));
                    }
                }
                break;
            }
            let failure =
                match map_batch::update_u32(self.maglev_fd.as_fd(), &ids[start..], &fds[start..]) {
                    Ok(()) => break,
                    Err(f) => f,
                };
            // Elements before the failing one are installed; that one is retried alone or reported, the rest
            // go in the next batch.
            let i = start + failure.applied;
            start = i + 1;
            if failure.applied == 0 && map_batch::means_unsupported(&failure.error) {
                match self.maglev.insert(ids[i], &inners[i], 0) {
                    Ok(()) => {
                        // The element is fine, so the command is what the kernel refused (before 5.6 it has no
                        // batch commands).
                        tracing::warn!(error = %failure.error, "BPF_MAP_UPDATE_BATCH refused on {}; updating tables one by one (one RCU grace period each)", map_names::MAGLEV);
                        self.batch_unsupported = true;
                    }
                    Err(e) => failed.push((ids[i], op(map_names::MAGLEV, "update")(e))),
                }
                continue;
            }
            failed.push((ids[i], batch_error("bpf_map_update_batch", failure.error)));
        }
        failed
    }

    /// One frontend's entry in `LB_SERVICES`, `None` when it has none.
    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, MapsError> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(op(map_names::SERVICES, "lookup")(e)),
        }
    }
}

impl MapsRead for PinnedMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError> {
        self.services
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::SERVICES, "iterate"))
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapsError> {
        self.backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::BACKENDS, "iterate"))
    }
    fn table(&self, service_id: u32) -> Result<Option<Vec<u32>>, MapsError> {
        let inner = match self.maglev.get(&service_id, 0) {
            Ok(inner) => inner,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(op(map_names::MAGLEV, "lookup")(e)),
        };
        let len = inner
            .get(&LUT_LEN_INDEX, 0)
            .map_err(op(map_names::MAGLEV, "read inner table"))?;
        let mut slots = Vec::with_capacity(len as usize);
        for i in 1..=len {
            slots.push(
                inner
                    .get(&i, 0)
                    .map_err(op(map_names::MAGLEV, "read inner table"))?,
            );
        }
        Ok(Some(slots))
    }
    fn config(&self) -> Result<lb_common::ConfigValue, MapsError> {
        self.packet.config()
    }
    fn node_entries(&self) -> Result<Vec<NodeEntry>, MapsError> {
        self.packet.node_entries()
    }

    /// Sums a service's per-CPU counters.
    fn service_stats(&self, service_id: u32) -> Result<ServiceStats, MapsError> {
        let per_cpu = self
            .svc_stats
            .get(&service_id, 0)
            .map_err(op(map_names::SVC_STATS, "lookup"))?;
        Ok(per_cpu.iter().fold(ServiceStats::default(), |mut acc, s| {
            acc.sock_connects += s.sock_connects;
            acc.sock_rejects += s.sock_rejects;
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc.drops += s.drops;
            acc
        }))
    }

    /// Sums a backend's per-CPU counters.
    fn backend_stats(&self, backend_id: u32) -> Result<BackendStats, MapsError> {
        let per_cpu = self
            .be_stats
            .get(&backend_id, 0)
            .map_err(op(map_names::BE_STATS, "lookup"))?;
        Ok(per_cpu.iter().fold(BackendStats::default(), |mut acc, s| {
            acc.sock_connects += s.sock_connects;
            acc.packets += s.packets;
            acc.bytes += s.bytes;
            acc
        }))
    }

    /// Sockets the socket LB translated and still remembers (for reverse translation).
    fn sock_revnat_entries(&self) -> Result<Vec<(SockRevNatKey, SockRevNatValue)>, MapsError> {
        self.sock_revnat
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::SOCK_REVNAT, "iterate"))
    }

    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapsError> {
        self.affinity
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::AFFINITY, "iterate"))
    }
}

impl Maps for PinnedMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        self.services
            .insert(key, value, 0)
            .map_err(op(map_names::SERVICES, "update"))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        ignore_missing(self.services.remove(key)).map_err(op(map_names::SERVICES, "delete"))
    }

    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapsError> {
        self.backends
            .insert(id, value, 0)
            .map_err(op(map_names::BACKENDS, "update"))
    }

    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        ignore_missing(self.backends.remove(&id)).map_err(op(map_names::BACKENDS, "delete"))
    }

    fn put_table(&mut self, service_id: u32, slots: &[u32]) -> Result<(), MapsError> {
        let inner = inner_table(slots, &mut self.fill_batch_unsupported)?;
        self.maglev
            .insert(service_id, &inner, 0)
            .map_err(op(map_names::MAGLEV, "update"))
    }

    fn delete_table(&mut self, service_id: u32) -> Result<(), MapsError> {
        ignore_missing(self.maglev.remove(&service_id)).map_err(op(map_names::MAGLEV, "delete"))
    }

    fn put_tables(&mut self, tables: &[(u32, Vec<u32>)]) -> Vec<(u32, MapsError)> {
        let mut failed = Vec::new();
        // Every inner map of a batch is an open fd until the batch returns, so a batch is capped: 20k tables at
        // once would hit a 20k RLIMIT_NOFILE (EMFILE) and hold every table in memory. A few more grace periods
        // (one per chunk) are the price.
        for chunk in tables.chunks(TABLE_BATCH) {
            failed.extend(self.put_tables_chunk(chunk));
        }
        failed
    }

    fn delete_tables(&mut self, service_ids: &[u32]) -> Vec<(u32, MapsError)> {
        let mut failed = Vec::new();
        // A batch stops at a missing key (ENOENT) and still waits for a grace period, so skip the absent ones
        // first: a lookup waits for nothing.
        let ids: Vec<u32> = service_ids
            .iter()
            .copied()
            .filter(|id| map_batch::contains_u32(self.maglev_fd.as_fd(), *id).unwrap_or(true))
            .collect();
        let mut start = 0;
        while start < ids.len() {
            if self.batch_unsupported {
                for id in &ids[start..] {
                    if let Err(e) = self.delete_table(*id) {
                        failed.push((*id, e));
                    }
                }
                break;
            }
            let failure = match map_batch::delete_u32(self.maglev_fd.as_fd(), &ids[start..]) {
                Ok(()) => break,
                Err(f) => f,
            };
            let i = start + failure.applied;
            start = i + 1;
            if failure.error.raw_os_error() == Some(libc::ENOENT) {
                // Gone since the lookup: deleted is what we want.
                continue;
            }
            if failure.applied == 0 && map_batch::means_unsupported(&failure.error) {
                match self.delete_table(ids[i]) {
                    Ok(()) => {
                        tracing::warn!(error = %failure.error, "BPF_MAP_DELETE_BATCH refused on {}; deleting tables one by one (one RCU grace period each)", map_names::MAGLEV);
                        self.batch_unsupported = true;
                    }
                    Err(e) => failed.push((ids[i], e)),
                }
                continue;
            }
            failed.push((ids[i], batch_error("bpf_map_delete_batch", failure.error)));
        }
        failed
    }

    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![ServiceStats::default(); self.nr_cpus])
            .map_err(|e| MapsError::Cpus(e.to_string()))?;
        self.svc_stats
            .set(service_id, zero, 0)
            .map_err(op(map_names::SVC_STATS, "update"))
    }

    fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), MapsError> {
        let zero = PerCpuValues::try_from(vec![BackendStats::default(); self.nr_cpus])
            .map_err(|e| MapsError::Cpus(e.to_string()))?;
        self.be_stats
            .set(backend_id, zero, 0)
            .map_err(op(map_names::BE_STATS, "update"))
    }

    fn purge_affinity(&mut self, stale: &StaleAffinity) -> Result<usize, MapsError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let stale: Vec<AffinityKey> = self
            .affinity_entries()?
            .into_iter()
            .filter(|(k, v)| stale.covers(k, v))
            .map(|(k, _)| k)
            .collect();
        for k in &stale {
            ignore_missing(self.affinity.remove(k)).map_err(op(map_names::AFFINITY, "delete"))?;
        }
        Ok(stale.len())
    }

    fn put_config(&mut self, value: &lb_common::ConfigValue) -> Result<(), MapsError> {
        self.packet.put_config(value)
    }
    fn put_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        self.packet.put_node_entry(e)
    }
    fn delete_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        self.packet.delete_node_entry(e)
    }
}

/// Tables per `BPF_MAP_UPDATE_BATCH`: bounds the open inner-map fds and the memory of one batch.
const TABLE_BATCH: usize = 1024;

/// A new inner table: element 0 carries the length, so the datapath reads the length and the slots from the same
/// map and can never pair a new length with an old table. It is filled completely here, before the caller can
/// install it in `LB_MAGLEV`, so no packet ever sees a partly filled table.
///
/// Filled with one `BPF_MAP_UPDATE_BATCH` (array maps have it since Linux 5.6): a 16381-slot table was 16382
/// update syscalls, the most of what programming a service cost once the grace periods were batched. A kernel
/// that refuses the command gets single updates, and `fill_batch_unsupported` remembers that.
fn inner_table(
    slots: &[u32],
    fill_batch_unsupported: &mut bool,
) -> Result<Array<MapData, u32>, MapsError> {
    let len = u32::try_from(slots.len()).unwrap_or(u32::MAX);
    let mut inner = Array::<MapData, u32>::create(len.saturating_add(1), BPF_F_INNER_MAP)
        .map_err(op(map_names::MAGLEV, "create inner table"))?;
    // Index LUT_LEN_INDEX (0) holds the length, indices 1..=len the slots; the create above checked that
    // len + 1 fits in u32.
    let mut values = Vec::with_capacity(slots.len() + 1);
    values.push(len);
    values.extend_from_slice(slots);
    debug_assert_eq!(LUT_LEN_INDEX, 0);
    if !*fill_batch_unsupported {
        let keys: Vec<u32> = (0..=len).collect();
        let failure = match map_batch::update_u32(inner.map().fd().as_fd(), &keys, &values) {
            Ok(()) => return Ok(inner),
            Err(f) => f,
        };
        if failure.applied != 0 || !map_batch::means_unsupported(&failure.error) {
            return Err(batch_error(
                "bpf_map_update_batch (inner table)",
                failure.error,
            ));
        }
        fill_one_by_one(&mut inner, &values)?;
        tracing::warn!(error = %failure.error, "BPF_MAP_UPDATE_BATCH refused on a Maglev inner table; filling tables one element at a time");
        *fill_batch_unsupported = true;
        return Ok(inner);
    }
    fill_one_by_one(&mut inner, &values)?;
    Ok(inner)
}

fn fill_one_by_one(inner: &mut Array<MapData, u32>, values: &[u32]) -> Result<(), MapsError> {
    for (i, v) in values.iter().enumerate() {
        // i <= len <= u32::MAX - 1, checked by the create.
        inner
            .set(i as u32, v, 0)
            .map_err(op(map_names::MAGLEV, "fill inner table"))?;
    }
    Ok(())
}

fn batch_error(call: &'static str, io_error: std::io::Error) -> MapsError {
    MapsError::Op {
        map: map_names::MAGLEV,
        op: "batch",
        source: MapError::SyscallError(SyscallError { call, io_error }),
    }
}

/// Deleting what is already gone is success: the reconciler converges on "absent".
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(any(test, feature = "test-support"))]
/// In-memory maps for unit tests, with optional capacities to exercise the "map full" paths.
#[derive(Default, Debug)]
pub struct FakeMaps {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub affinity: Vec<(AffinityKey, AffinityValue)>,
    pub stats_resets: Vec<(&'static str, u32)>,
    /// Every write in order, for tests of update ordering.
    pub log: Vec<String>,
    pub max_services: Option<usize>,
    /// Service ids whose table installs fail (as a kernel error would).
    pub fail_tables: HashSet<u32>,
    /// Service ids whose entry delete fails, service ids whose (existing) table's delete fails, backend ids whose
    /// delete fails.
    pub fail_service_deletes: HashSet<u32>,
    pub fail_table_deletes: HashSet<u32>,
    pub fail_backend_deletes: HashSet<u32>,
    /// `LB_CONFIG` and the node-level maps (`packet_maps`), kept like the rest.
    pub config: lb_common::ConfigValue,
    pub node: BTreeSet<NodeEntry>,
    /// Node-level writes in order (kept apart from `log`, whose tests predate them).
    pub node_log: Vec<String>,
    /// Node entries whose write or delete fails.
    pub fail_node_entries: HashSet<NodeEntry>,
}

#[cfg(any(test, feature = "test-support"))]
fn fake_failure(op: &'static str) -> MapsError {
    MapsError::Op {
        map: map_names::MAGLEV,
        op,
        source: MapError::SyscallError(SyscallError {
            call: "fake",
            io_error: std::io::Error::from_raw_os_error(libc::ENOMEM),
        }),
    }
}

#[cfg(any(test, feature = "test-support"))]
impl MapsRead for FakeMaps {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapsError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn table(&self, service_id: u32) -> Result<Option<Vec<u32>>, MapsError> {
        Ok(self.tables.get(&service_id).cloned())
    }
    fn config(&self) -> Result<lb_common::ConfigValue, MapsError> {
        Ok(self.config)
    }
    fn node_entries(&self) -> Result<Vec<NodeEntry>, MapsError> {
        Ok(self.node.iter().copied().collect())
    }
    fn affinity_entries(&self) -> Result<Vec<(AffinityKey, AffinityValue)>, MapsError> {
        Ok(self.affinity.clone())
    }
}

#[cfg(any(test, feature = "test-support"))]
impl Maps for FakeMaps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapsError> {
        if let Some(max) = self.max_services
            && !self.services.contains_key(key)
            && self.services.len() >= max
        {
            return Err(MapsError::Op {
                map: map_names::SERVICES,
                op: "update",
                source: MapError::OutOfBounds {
                    index: max as u32,
                    max_entries: max as u32,
                },
            });
        }
        self.log.push(format!("put_service {}", value.service_id));
        self.services.insert(*key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapsError> {
        if let Some(v) = self.services.get(key) {
            if self.fail_service_deletes.contains(&v.service_id) {
                return Err(fake_failure("delete"));
            }
            self.log.push(format!("delete_service {}", v.service_id));
            self.services.remove(key);
        }
        Ok(())
    }
    fn put_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapsError> {
        self.log.push(format!("put_backend {id}"));
        self.backends.insert(id, *value);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapsError> {
        if self.fail_backend_deletes.contains(&id) {
            return Err(fake_failure("delete"));
        }
        self.log.push(format!("delete_backend {id}"));
        self.backends.remove(&id);
        Ok(())
    }
    fn put_table(&mut self, service_id: u32, slots: &[u32]) -> Result<(), MapsError> {
        self.log.push(format!("put_table {service_id}"));
        self.tables.insert(service_id, slots.to_vec());
        Ok(())
    }
    fn delete_table(&mut self, service_id: u32) -> Result<(), MapsError> {
        self.log.push(format!("delete_table {service_id}"));
        self.tables.remove(&service_id);
        Ok(())
    }
    fn put_tables(&mut self, tables: &[(u32, Vec<u32>)]) -> Vec<(u32, MapsError)> {
        let ids: Vec<String> = tables.iter().map(|(id, _)| id.to_string()).collect();
        self.log.push(format!("put_tables {}", ids.join(",")));
        let mut failed = Vec::new();
        for (id, slots) in tables {
            if self.fail_tables.contains(id) {
                failed.push((*id, fake_failure("update")));
            } else {
                self.tables.insert(*id, slots.clone());
            }
        }
        failed
    }
    fn delete_tables(&mut self, service_ids: &[u32]) -> Vec<(u32, MapsError)> {
        let ids: Vec<String> = service_ids.iter().map(u32::to_string).collect();
        self.log.push(format!("delete_tables {}", ids.join(",")));
        let mut failed = Vec::new();
        for id in service_ids {
            if self.fail_table_deletes.contains(id) && self.tables.contains_key(id) {
                failed.push((*id, fake_failure("delete")));
            } else {
                self.tables.remove(id);
            }
        }
        failed
    }
    fn reset_service_stats(&mut self, service_id: u32) -> Result<(), MapsError> {
        self.stats_resets.push((map_names::SVC_STATS, service_id));
        Ok(())
    }
    fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), MapsError> {
        self.stats_resets.push((map_names::BE_STATS, backend_id));
        Ok(())
    }
    fn purge_affinity(&mut self, stale: &StaleAffinity) -> Result<usize, MapsError> {
        let before = self.affinity.len();
        self.affinity.retain(|(k, v)| !stale.covers(k, v));
        Ok(before - self.affinity.len())
    }
    fn put_config(&mut self, value: &lb_common::ConfigValue) -> Result<(), MapsError> {
        self.node_log.push("put_config".to_string());
        self.config = *value;
        Ok(())
    }
    fn put_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        if self.fail_node_entries.contains(e) {
            return Err(fake_failure("update"));
        }
        self.node_log.push(format!("put {e:?}"));
        // One map slot per key: a new value replaces the old.
        self.node.retain(|o| !o.same_key(e));
        self.node.insert(*e);
        Ok(())
    }
    fn delete_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        if self.fail_node_entries.contains(e) {
            return Err(fake_failure("delete"));
        }
        self.node_log.push(format!("delete {e:?}"));
        self.node.retain(|o| !o.same_key(e));
        Ok(())
    }
}
