//! Access to lb's maps through two traits (as cilium's `pkg/loadbalancer/maps/lbmaps.go` does): [`MapsRead`] for
//! reading and [`Maps`] for writing. [`PinnedMaps`] talks to the kernel; `FakeMaps` is an in-memory stand-in for
//! tests, compiled only into test builds (`cfg(test)`, or the `test-support` feature for integration tests). The
//! reconciler is the only writer.

use std::collections::HashSet;
#[cfg(any(test, feature = "test-support"))]
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;

use super::lut::{self, Layout};
use super::map_error::{MapsError, open_pinned};
use super::packet_maps::NodeEntry;
use super::rcu_fence::Fence;
use super::slot_array::SlotArray;
use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
#[cfg(any(test, feature = "test-support"))]
use aya::sys::SyscallError;
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, ServiceKey, ServiceStats, ServiceValue,
    SockRevNatKey, SockRevNatValue, map_names,
};

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

/// Which affinity entries a sync invalidated.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleAffinity {
    /// Affinity ids (Service ports) no frontend uses any more: every entry of theirs goes.
    pub ids: HashSet<u64>,
    /// (affinity id, backend id) pairs whose backend left every frontend of the Service port.
    pub pairs: HashSet<(u64, u32)>,
}

impl StaleAffinity {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.pairs.is_empty()
    }

    pub fn covers(&self, key: &AffinityKey, value: &AffinityValue) -> bool {
        self.ids.contains(&key.affinity_id)
            || self.pairs.contains(&(key.affinity_id, value.backend_id))
    }
}

/// Reading the maps: what the reconciler adopts at start and the read-only views (`inspect`, `listings`) show. The
/// views take this trait, not [`PinnedMaps`], so they run on [`FakeMaps`] in tests just as on the pins.
pub trait MapsRead {
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapsError>;
    /// The service ids of an `LB_SERVICES` of an older layout this start migrates from, by key (`pins`), so that
    /// the frontends keep their ids.
    fn migrated_service_ids(&self) -> Vec<(ServiceKey, u32)> {
        Vec::new()
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapsError>;

    // The slot array behind `LB_MAGLEV` (`slot_array`): every service's lookup table is a region of it.

    /// Bytes the slot array holds; 0 before it exists.
    fn slot_capacity(&self) -> u64;
    /// Reads `len` bytes of the slot array at `offset`.
    fn read_slots(&self, offset: u64, len: u64) -> Result<Vec<u8>, MapsError>;
    /// The backend id of every slot of the table `value` points at; `None` when it has none.
    fn table(&self, value: &ServiceValue) -> Result<Option<Vec<u32>>, MapsError> {
        let Some(layout) = Layout::of(value) else {
            return Ok(None);
        };
        let bytes = self.read_slots(u64::from(value.table_offset), layout.bytes())?;
        Ok(lut::decode_slots(&layout, &bytes))
    }

    // RCU fences (`rcu_fence`): a region freed when `fences_started()` was `s` may be reused once
    // `fences_completed() > s`.

    fn fences_started(&self) -> u64 {
        0
    }
    fn fences_completed(&self) -> u64 {
        0
    }

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
    /// Replaces the slot array with one of at least `bytes` whose first `keep` bytes are the current array's, and
    /// returns its size. Returns after an RCU grace period, which counts as a fence.
    fn grow_slots(&mut self, bytes: u64, keep: u64) -> Result<u64, MapsError>;
    /// Writes each `(offset, bytes)` into the slot array. The caller writes only regions no entry points at.
    fn write_slots(&mut self, writes: &[(u64, &[u8])]) -> Result<(), MapsError>;
    /// Starts a fence soon, without waiting for it.
    fn request_fence(&mut self) -> Result<(), MapsError>;
    /// Waits until fence `target` has completed.
    fn wait_fence(&mut self, target: u64) -> Result<(), MapsError>;
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
    /// `LB_MAGLEV`, the array of maps whose one element is the slot array.
    maglev: MapData,
    slots: SlotArray,
    /// Created at the first fence (the CLI, which only reads, never needs one).
    fence: Option<Fence>,
    /// See [`MapsRead::migrated_service_ids`].
    migrated_ids: Vec<(ServiceKey, u32)>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    be_stats: PerCpuArray<MapData, BackendStats>,
    nr_cpus: usize,
    /// The per-packet datapath's maps.
    pub packet: super::packet_maps::PacketMaps,
}

impl PinnedMaps {
    /// Takes the maps out of a freshly loaded object (they are already pinned by the loader, under `dir`).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<Self, MapsError> {
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
        let mut maps = Self::from_maps(maps, packet, dir)?;
        maps.migrated_ids = super::pins::migrated_service_ids(dir);
        // A start may follow deletions nobody counted (an older agent, a migrated `LB_BACKENDS`): every flow
        // checks its backend once more.
        maps.packet.bump_backend_epoch()?;
        Ok(maps)
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
            dir,
        )
    }

    fn from_maps(
        maps: [Map; 7],
        packet: super::packet_maps::PacketMaps,
        dir: &Path,
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
        let Map::ArrayOfMaps(maglev) = maglev else {
            return Err(MapsError::Missing {
                map: map_names::MAGLEV,
            });
        };
        let slots = SlotArray::open(dir, maglev.fd().as_fd())?;
        Ok(Self {
            maglev,
            slots,
            fence: None,
            migrated_ids: Vec::new(),
            services: HashMap::try_from(services).map_err(layout(map_names::SERVICES))?,
            backends: HashMap::try_from(backends).map_err(layout(map_names::BACKENDS))?,
            affinity: HashMap::try_from(affinity).map_err(layout(map_names::AFFINITY))?,
            sock_revnat: HashMap::try_from(sock_revnat).map_err(layout(map_names::SOCK_REVNAT))?,
            svc_stats: PerCpuArray::try_from(svc_stats).map_err(layout(map_names::SVC_STATS))?,
            be_stats: PerCpuArray::try_from(be_stats).map_err(layout(map_names::BE_STATS))?,
            nr_cpus: aya::util::nr_cpus()
                .map_err(|(what, e)| MapsError::Cpus(format!("{what}: {e}")))?,
            packet,
        })
    }

    fn fence(&mut self) -> Result<&mut Fence, MapsError> {
        if self.fence.is_none() {
            self.fence = Some(Fence::new().map_err(MapsError::Fence)?);
        }
        self.fence
            .as_mut()
            .ok_or_else(|| MapsError::Fence(std::io::Error::other("no fence")))
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
    fn migrated_service_ids(&self) -> Vec<(ServiceKey, u32)> {
        self.migrated_ids.clone()
    }

    fn slot_capacity(&self) -> u64 {
        self.slots.capacity()
    }

    fn read_slots(&self, offset: u64, len: u64) -> Result<Vec<u8>, MapsError> {
        self.slots.read(offset, len)
    }

    fn fences_started(&self) -> u64 {
        self.fence.as_ref().map_or(0, Fence::started)
    }

    fn fences_completed(&self) -> u64 {
        self.fence.as_ref().map_or(0, Fence::completed)
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
        ignore_missing(self.backends.remove(&id)).map_err(op(map_names::BACKENDS, "delete"))?;
        // After the delete: a flow that sees the new epoch finds the id gone. A failure is the delete's (retried,
        // and the retry bumps again).
        self.packet.bump_backend_epoch()
    }

    fn grow_slots(&mut self, bytes: u64, keep: u64) -> Result<u64, MapsError> {
        // The update of `LB_MAGLEV` waits for a grace period: a fence for everything freed before it.
        let seq = self.fence()?.external_begin();
        let grown = self.slots.grow(self.maglev.fd().as_fd(), bytes, keep);
        if grown.is_ok() {
            self.fence()?.external_done(seq);
        }
        grown.map(|()| self.slots.capacity())
    }

    fn write_slots(&mut self, writes: &[(u64, &[u8])]) -> Result<(), MapsError> {
        self.slots.write(writes)
    }

    fn request_fence(&mut self) -> Result<(), MapsError> {
        self.fence()?.request().map_err(MapsError::Fence)
    }

    fn wait_fence(&mut self, target: u64) -> Result<(), MapsError> {
        self.fence()?.wait(target).map_err(MapsError::Fence)
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
    /// The slot array (its length is its capacity).
    pub slots: Vec<u8>,
    /// Fences: started, completed. Requested fences complete at once unless `manual_fences`.
    pub fences: (u64, u64),
    pub manual_fences: bool,
    pub affinity: Vec<(AffinityKey, AffinityValue)>,
    pub stats_resets: Vec<(&'static str, u32)>,
    /// Every write in order, for tests of update ordering.
    pub log: Vec<String>,
    pub max_services: Option<usize>,
    /// What `migrated_service_ids` answers.
    pub migrated_ids: Vec<(ServiceKey, u32)>,
    /// Table writes fail (as a kernel error would).
    pub fail_slot_writes: bool,
    /// Service ids whose entry delete fails, backend ids whose delete fails.
    pub fail_service_deletes: HashSet<u32>,
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
impl FakeMaps {
    /// Gives the service programmed under `service_id` (already in `services`) a table whose slots are these backend
    /// ids, appended to the slot array.
    pub fn set_table(&mut self, service_id: u32, slots: &[u32]) {
        let table = super::lut::Encoded::plain(slots);
        let offset = self.slots.len();
        self.slots.extend_from_slice(&table.bytes);
        for v in self
            .services
            .values_mut()
            .filter(|v| v.service_id == service_id)
        {
            v.table_offset = offset as u32;
            v.table_size = table.layout.size;
            v.slot_width = table.layout.width;
            v.table_hash = table.hash(v.algorithm);
        }
    }

    /// The backend id of every slot of the table of the service programmed under `service_id`.
    pub fn table_of(&self, service_id: u32) -> Option<Vec<u32>> {
        let value = self
            .services
            .values()
            .find(|v| v.service_id == service_id)?;
        self.table(value).ok().flatten()
    }
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
    fn migrated_service_ids(&self) -> Vec<(ServiceKey, u32)> {
        self.migrated_ids.clone()
    }
    fn slot_capacity(&self) -> u64 {
        self.slots.len() as u64
    }
    fn read_slots(&self, offset: u64, len: u64) -> Result<Vec<u8>, MapsError> {
        let at = offset as usize;
        self.slots
            .get(at..at + len as usize)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| fake_failure("read"))
    }
    fn fences_started(&self) -> u64 {
        self.fences.0
    }
    fn fences_completed(&self) -> u64 {
        self.fences.1
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
    fn grow_slots(&mut self, bytes: u64, keep: u64) -> Result<u64, MapsError> {
        self.log.push(format!("grow_slots {bytes}"));
        let mut grown = vec![0u8; bytes as usize];
        let keep = keep.min(self.slots.len() as u64) as usize;
        grown[..keep].copy_from_slice(&self.slots[..keep]);
        self.slots = grown;
        // The kernel's growth is a grace period: a fence.
        self.fences.0 += 1;
        self.fences.1 = self.fences.0;
        Ok(bytes)
    }
    fn write_slots(&mut self, writes: &[(u64, &[u8])]) -> Result<(), MapsError> {
        if self.fail_slot_writes {
            return Err(fake_failure("write"));
        }
        self.log.push(format!("write_slots {}", writes.len()));
        for (offset, bytes) in writes {
            let at = *offset as usize;
            self.slots[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Ok(())
    }
    fn request_fence(&mut self) -> Result<(), MapsError> {
        self.fences.0 += 1;
        if !self.manual_fences {
            self.fences.1 = self.fences.0;
        }
        Ok(())
    }
    fn wait_fence(&mut self, target: u64) -> Result<(), MapsError> {
        self.fences.0 = self.fences.0.max(target);
        self.fences.1 = self.fences.1.max(target);
        Ok(())
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
