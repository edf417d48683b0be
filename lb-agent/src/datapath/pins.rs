//! Pinned maps that no longer fit. aya 0.14 reuses an existing pin without comparing its type, key/value size or
//! capacity, so before loading we compare every pin with what this build expects; a pin that differs is moved
//! aside to `<name>:pending`, the loader creates a fresh map, the agent refills it, and only then is the old pin
//! dropped (cilium's `pkg/bpf/bpffs_migrate.go` does the same). If loading fails the old pins are put back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use lb_common::{
    AffinityKey, AffinityValue, BackendStats, BackendValue, ConfigValue, CtKey, CtValue, FragKey,
    FragValue, ServiceKey, ServiceStats, ServiceValue, SockRevNatKey, SockRevNatValue,
    SrcRangeData, TraceValue, XdpL2Value, map_names,
};

/// Configured map capacities (`max_entries`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub services: u32,
    pub backends: u32,
    pub affinity: u32,
    pub sock_revnat: u32,
    /// `LB_CONNTRACK` (LRU; up to four entries per flow of the tc datapath).
    pub conntrack: u32,
    /// `LB_FRAGMENTS` (LRU; one entry per fragmented datagram in flight whose first fragment was translated).
    pub fragments: u32,
    /// The XDP fast path is on (`--xdp`): `LB_XDP_L2` holds a learned header per SNATed flow leg, sized from
    /// `conntrack`. Off, nothing writes it (tc learns headers only under `CONFIG_FLAG_XDP`), and it is one entry
    /// instead of a preallocated 16 MiB; switching `--xdp` needs a restart, which migrates the map (a cache, relearned).
    pub xdp: bool,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            services: lb_common::DEFAULT_MAX_SERVICES,
            backends: lb_common::DEFAULT_MAX_BACKENDS,
            affinity: lb_common::DEFAULT_MAX_AFFINITY,
            sock_revnat: lb_common::DEFAULT_MAX_SOCK_REVNAT,
            conntrack: lb_common::DEFAULT_MAX_CONNTRACK,
            fragments: lb_common::DEFAULT_MAX_FRAGMENTS,
            xdp: true,
        }
    }
}

/// What a map must look like for this build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// The map flags, where a pin created with others must be migrated (aya compares none): `LB_CONNTRACK`'s
    /// `BPF_F_NO_COMMON_LRU`. `None`: not compared.
    pub flags: Option<u32>,
}

fn size<T>() -> u32 {
    size_of::<T>() as u32
}

impl Capacities {
    pub fn specs(&self) -> [MapSpec; 22] {
        let spec = |name, map_type, key_size, value_size, max_entries| MapSpec {
            name,
            map_type,
            key_size,
            value_size,
            max_entries,
            flags: None,
        };
        [
            spec(
                map_names::SERVICES,
                MapType::Hash,
                size::<ServiceKey>(),
                size::<ServiceValue>(),
                self.services,
            ),
            spec(
                map_names::BACKENDS,
                MapType::Hash,
                size::<u32>(),
                size::<BackendValue>(),
                self.backends,
            ),
            // One element, the slot array (created, grown and pinned by the agent: `slot_array`).
            spec(
                map_names::MAGLEV,
                MapType::ArrayOfMaps,
                size::<u32>(),
                size::<u32>(),
                1,
            ),
            spec(
                map_names::AFFINITY,
                MapType::LruHash,
                size::<AffinityKey>(),
                size::<AffinityValue>(),
                self.affinity,
            ),
            spec(
                map_names::SOCK_REVNAT,
                MapType::LruHash,
                size::<SockRevNatKey>(),
                size::<SockRevNatValue>(),
                self.sock_revnat,
            ),
            // Indexed by service id, 1..=services (0 means "no service" to the programs).
            spec(
                map_names::SVC_STATS,
                MapType::PerCpuArray,
                size::<u32>(),
                size::<ServiceStats>(),
                self.services.saturating_add(1),
            ),
            // Indexed by backend id, 1..=backends.
            spec(
                map_names::BE_STATS,
                MapType::PerCpuArray,
                size::<u32>(),
                size::<BackendStats>(),
                self.backends.saturating_add(1),
            ),
            // Per-CPU LRU lists: the kernel rounds the capacity up to a multiple of the possible CPUs (each list
            // gets an equal share); asking for that multiple keeps the pin equal to the spec across restarts.
            MapSpec {
                flags: Some(lb_common::BPF_F_NO_COMMON_LRU),
                ..spec(
                    map_names::CONNTRACK,
                    MapType::LruHash,
                    size::<CtKey>(),
                    size::<CtValue>(),
                    per_cpu_lru_capacity(self.conntrack),
                )
            },
            spec(
                map_names::CONFIG,
                MapType::Array,
                size::<u32>(),
                size::<ConfigValue>(),
                1,
            ),
            // LPM keys are {u32 prefix length, data}.
            spec(
                map_names::LOCAL_NETS,
                MapType::LpmTrie,
                size::<u32>() + 16,
                size::<u8>(),
                lb_common::DEFAULT_MAX_LOCAL_NETS,
            ),
            spec(
                map_names::SRC_RANGES,
                MapType::LpmTrie,
                size::<u32>() + size::<SrcRangeData>(),
                size::<u8>(),
                lb_common::DEFAULT_MAX_SRC_RANGES,
            ),
            spec(
                map_names::VIPS,
                MapType::Hash,
                16,
                size::<u8>(),
                lb_common::DEFAULT_MAX_VIPS,
            ),
            spec(
                map_names::DROP_STATS,
                MapType::PerCpuArray,
                size::<u32>(),
                size::<u64>(),
                lb_common::reason::COUNT,
            ),
            spec(
                map_names::TRACE,
                MapType::Array,
                size::<u32>(),
                size::<TraceValue>(),
                1,
            ),
            spec(
                map_names::FRAGMENTS,
                MapType::LruHash,
                size::<FragKey>(),
                size::<FragValue>(),
                self.fragments,
            ),
            spec(
                map_names::SVC_CIDRS,
                MapType::LpmTrie,
                size::<u32>() + 16,
                size::<u8>(),
                lb_common::DEFAULT_MAX_SVC_CIDRS,
            ),
            // Two learned headers per SNATed flow (forward and reply leg), which holds four conntrack entries.
            spec(
                map_names::XDP_L2,
                MapType::LruHash,
                size::<CtKey>(),
                size::<XdpL2Value>(),
                if self.xdp {
                    (self.conntrack / 2).max(1)
                } else {
                    1
                },
            ),
            spec(
                map_names::NETNS_ADDRS,
                MapType::Hash,
                size::<u64>(),
                size::<lb_common::NetnsAddrs>(),
                lb_common::DEFAULT_MAX_NETNS_ADDRS,
            ),
            spec(
                map_names::SOCK_STATS,
                MapType::PerCpuArray,
                size::<u32>(),
                size::<u64>(),
                lb_common::reason::COUNT,
            ),
            // A ring buffer has no key or value: its size is `max_entries`, in bytes.
            spec(
                map_names::EVENTS,
                MapType::RingBuf,
                0,
                0,
                lb_common::EVENTS_RING_BYTES,
            ),
            spec(
                map_names::MONITOR,
                MapType::Array,
                size::<u32>(),
                size::<lb_common::MonitorConfig>(),
                1,
            ),
            spec(
                map_names::MONITOR_RATE,
                MapType::PerCpuArray,
                size::<u32>(),
                size::<lb_common::MonitorBucket>(),
                1,
            ),
        ]
    }
}

/// `max_entries` as the kernel sets it for an LRU hash with `BPF_F_NO_COMMON_LRU`: rounded up to a multiple of the
/// possible CPUs.
pub fn per_cpu_lru_capacity(want: u32) -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    want.div_ceil(cpus).saturating_mul(cpus)
}

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("reading pinned map {path}: {source}")]
    Inspect {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("moving {from} to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

/// Describes how an existing pin differs from the spec; `None` when it matches.
fn mismatch(info: &MapInfo, spec: &MapSpec) -> Option<String> {
    let actual_type = info.map_type().ok();
    let mut diffs = Vec::new();
    if actual_type != Some(spec.map_type) {
        diffs.push(format!("type {actual_type:?} != {:?}", spec.map_type));
    }
    if info.key_size() != spec.key_size {
        diffs.push(format!("key size {} != {}", info.key_size(), spec.key_size));
    }
    if info.value_size() != spec.value_size {
        diffs.push(format!(
            "value size {} != {}",
            info.value_size(),
            spec.value_size
        ));
    }
    if info.max_entries() != spec.max_entries {
        diffs.push(format!(
            "max_entries {} != {}",
            info.max_entries(),
            spec.max_entries
        ));
    }
    if let Some(flags) = spec.flags
        && info.map_flags() != flags
    {
        diffs.push(format!("flags {:#x} != {flags:#x}", info.map_flags()));
    }
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

fn pending_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}:pending"))
}

/// Pins moved aside for this start; finish with [`Migration::commit`] or [`Migration::revert`].
#[derive(Debug, Default)]
#[must_use = "moved-aside pins must be committed or reverted"]
pub struct Migration {
    dir: PathBuf,
    moved: Vec<&'static str>,
}

impl Migration {
    pub fn moved(&self) -> &[&'static str] {
        &self.moved
    }

    /// The pin directory (moved-aside pins are `<name>:pending` in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The new maps are loaded and filled: drop the old ones.
    pub fn commit(self) {
        for name in &self.moved {
            let path = pending_path(&self.dir, name);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a migrated map's old pin");
            }
        }
    }

    /// Loading failed: put the old pins back so the running datapath keeps its state.
    pub fn revert(self) {
        for name in &self.moved {
            let (from, to) = (pending_path(&self.dir, name), self.dir.join(name));
            let _ = fs::remove_file(&to);
            if let Err(e) = fs::rename(&from, &to) {
                tracing::error!(from = %from.display(), error = %e, "could not restore a map pin");
            }
        }
    }
}

/// Moves aside every pin under `dir` that does not match `specs`. A `:pending` pin left by an interrupted start
/// is the older state, and a stale one would block the move, so it is removed first.
pub fn prepare(dir: &Path, specs: &[MapSpec]) -> Result<Migration, PinError> {
    let mut migration = Migration {
        dir: dir.to_path_buf(),
        moved: Vec::new(),
    };
    for spec in specs {
        let path = dir.join(spec.name);
        let pending = pending_path(dir, spec.name);
        if pending.exists() && path.exists() {
            let _ = fs::remove_file(&pending);
        }
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| PinError::Inspect {
            path: path.clone(),
            source,
        })?;
        if let Some(why) = mismatch(&info, spec) {
            tracing::warn!(map = spec.name, %why, "pinned map does not match this build; migrating to a new map");
            fs::rename(&path, &pending).map_err(|source| PinError::Move {
                from: path.clone(),
                to: pending.clone(),
                source,
            })?;
            migration.moved.push(spec.name);
        }
    }
    Ok(migration)
}

/// The service ids of a migrated `LB_SERVICES` (its pin moved to `:pending`), by key: the new map starts empty, and
/// the agent gives each frontend its old id again, so that counters, names, session affinity and the conntrack
/// entries of established flows (all keyed by service id) carry over. Every layout so far keeps `ServiceKey` as
/// the key and the id as the value's first field; a pin that does not is ignored (ids are then allocated afresh).
pub fn migrated_service_ids(dir: &Path) -> Vec<(ServiceKey, u32)> {
    let path = pending_path(dir, map_names::SERVICES);
    if !path.exists() {
        return Vec::new();
    }
    let read = || -> Result<Vec<(ServiceKey, u32)>, String> {
        let data = aya::maps::MapData::from_pin(&path).map_err(|e| e.to_string())?;
        let info = data.info().map_err(|e| e.to_string())?;
        let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
        if key_size != size_of::<ServiceKey>() || value_size < 4 {
            return Err(format!("key size {key_size}, value size {value_size}"));
        }
        let entries =
            super::map_batch::entries(std::os::fd::AsFd::as_fd(data.fd()), key_size, value_size)
                .map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .map(|(k, v)| {
                let key = ServiceKey {
                    addr: k[..16].try_into().unwrap_or([0; 16]),
                    port: u16::from_ne_bytes([k[16], k[17]]),
                    proto: k[18],
                    scope: k[19],
                };
                (key, u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            })
            .collect())
    };
    match read() {
        Ok(ids) => ids,
        Err(why) => {
            tracing::warn!(path = %path.display(), %why, "cannot read the previous service ids; new ones are allocated");
            Vec::new()
        }
    }
}

/// The entries of a migrated `LB_CONNTRACK` (its pin moved to `:pending`), in this build's form
/// (`lb_common::ct_rekey_legacy`, stamped at `now_jiffies` where they held nanoseconds), so that established flows
/// keep their backend and SNAT port across an upgrade that recreates the map. Key and value layouts are unchanged
/// since the map was introduced; a pin whose sizes differ is not read (its flows then start over).
pub fn migrated_conntrack(dir: &Path, now_jiffies: u64) -> Vec<(CtKey, CtValue)> {
    let path = pending_path(dir, map_names::CONNTRACK);
    if !path.exists() {
        return Vec::new();
    }
    let read = || -> Result<Vec<(CtKey, CtValue)>, String> {
        let data = aya::maps::MapData::from_pin(&path).map_err(|e| e.to_string())?;
        let info = data.info().map_err(|e| e.to_string())?;
        let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
        if key_size != size_of::<CtKey>() || value_size != size_of::<CtValue>() {
            return Err(format!("key size {key_size}, value size {value_size}"));
        }
        let entries =
            super::map_batch::entries(std::os::fd::AsFd::as_fd(data.fd()), key_size, value_size)
                .map_err(|e| e.to_string())?;
        Ok(entries
            .into_iter()
            .filter(|(k, v)| k.len() == key_size && v.len() == value_size)
            .map(|(k, v)| {
                // SAFETY: both buffers hold exactly the size of the plain-data `#[repr(C)]` type read (checked
                // above); every bit pattern is a valid value of them; unaligned reads.
                let (k, v) = unsafe {
                    (
                        k.as_ptr().cast::<CtKey>().read_unaligned(),
                        v.as_ptr().cast::<CtValue>().read_unaligned(),
                    )
                };
                lb_common::ct_rekey_legacy(&k, &v, now_jiffies).unwrap_or((k, v))
            })
            .collect())
    };
    match read() {
        Ok(entries) => entries,
        Err(why) => {
            tracing::warn!(path = %path.display(), %why, "cannot read the previous conntrack entries; established flows start over");
            Vec::new()
        }
    }
}

/// An interface name as it may appear in a pin name. bpffs refuses names containing a dot (EPERM), and VLAN
/// devices are named `eth0.100`; a colon is never part of an interface name (the kernel's `dev_valid_name` refuses
/// it), so mapping `.` to `:` keeps every device's pin distinct.
pub fn device_pin_name(dev: &str) -> String {
    dev.replace('.', ":")
}

#[cfg(test)]
mod device_pin_name_tests {
    use super::device_pin_name;

    #[test]
    fn dots_become_colons_and_names_stay_distinct() {
        assert_eq!(device_pin_name("eth0"), "eth0");
        assert_eq!(device_pin_name("eth0.100"), "eth0:100");
        assert!(!device_pin_name("bond0.2.3").contains('.'));
        assert_ne!(device_pin_name("eth0.100"), device_pin_name("eth0_100"));
    }
}
