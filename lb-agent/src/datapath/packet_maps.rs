//! The per-packet datapath's maps (issue 4): conntrack, fragments, node configuration, local networks, source
//! ranges, the ClusterIP set, the service CIDRs, drop counters and the trace record. Held by `maps::PinnedMaps`, written through the
//! `maps::Maps` trait's node-entry methods (the reconciler) and read by the CLI, `trace` and the conntrack
//! garbage collector.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    ConfigValue, CtKey, CtValue, FragKey, FragValue, SrcRangeData, TraceValue, addr_bytes,
    map_names,
};

use super::map_error::MapsError;

/// One entry of the small node-level maps the reconciler keeps in sync with the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeEntry {
    /// `LB_LOCAL_NETS`: (prefix length over the 16-byte form, address, `LOCAL_NET_*`).
    LocalNet {
        prefix: u32,
        addr: [u8; 16],
        kind: u8,
    },
    /// `LB_SRC_RANGES`: (service id, prefix length over the 16-byte form, address).
    SrcRange {
        service_id: u32,
        prefix: u32,
        addr: [u8; 16],
    },
    /// `LB_VIPS`: (address, `VIP_FLAG_*`).
    Vip { addr: [u8; 16], flags: u8 },
    /// `LB_SVC_CIDRS`: (prefix length over the 16-byte form, address).
    ServiceCidr { prefix: u32, addr: [u8; 16] },
}

impl NodeEntry {
    /// The map key alone: two entries with the same key are one map slot.
    pub fn same_key(&self, other: &NodeEntry) -> bool {
        match (self, other) {
            (
                NodeEntry::LocalNet { prefix, addr, .. },
                NodeEntry::LocalNet {
                    prefix: p2,
                    addr: a2,
                    ..
                },
            ) => prefix == p2 && addr == a2,
            (NodeEntry::Vip { addr, .. }, NodeEntry::Vip { addr: a2, .. }) => addr == a2,
            (a, b) => a == b,
        }
    }
}

/// A CIDR as the tries take it: the prefix length over lb's 16-byte form (IPv4 /n is 96 + n) and the address.
pub fn lpm_prefix(addr: IpAddr, len: u8) -> (u32, [u8; 16]) {
    let prefix = match addr {
        IpAddr::V4(_) => 96 + u32::from(len.min(32)),
        IpAddr::V6(_) => u32::from(len.min(128)),
    };
    (prefix, mask(addr_bytes(addr), prefix))
}

/// Zeroes the bits past `prefix` (the trie stores the prefix as given; a host part would never match).
fn mask(mut a: [u8; 16], prefix: u32) -> [u8; 16] {
    for (i, b) in a.iter_mut().enumerate() {
        let bits = prefix.saturating_sub(i as u32 * 8).min(8);
        *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    a
}

pub struct PacketMaps {
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub config: Array<MapData, ConfigValue>,
    pub local_nets: LpmTrie<MapData, [u8; 16], u8>,
    pub src_ranges: LpmTrie<MapData, SrcRangeData, u8>,
    pub vips: HashMap<MapData, [u8; 16], u8>,
    pub svc_cidrs: LpmTrie<MapData, [u8; 16], u8>,
    pub drop_stats: PerCpuArray<MapData, u64>,
    pub trace: Array<MapData, TraceValue>,
    /// `LB_FRAGMENTS`: written and read by the programs only; held so tests and listings can read it.
    pub fragments: HashMap<MapData, FragKey, FragValue>,
}

fn layout(map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Layout { map, source }
}

fn op(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { map, op, source }
}

impl PacketMaps {
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        let mut take =
            |name: &'static str| ebpf.take_map(name).ok_or(MapsError::Missing { map: name });
        Self::from_maps(
            take(map_names::CONNTRACK)?,
            take(map_names::CONFIG)?,
            take(map_names::LOCAL_NETS)?,
            take(map_names::SRC_RANGES)?,
            take(map_names::VIPS)?,
            take(map_names::DROP_STATS)?,
            take(map_names::TRACE)?,
            take(map_names::FRAGMENTS)?,
            take(map_names::SVC_CIDRS)?,
        )
    }

    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let open = |name: &'static str| super::map_error::open_pinned(dir, name);
        Self::from_maps(
            open(map_names::CONNTRACK)?,
            open(map_names::CONFIG)?,
            open(map_names::LOCAL_NETS)?,
            open(map_names::SRC_RANGES)?,
            open(map_names::VIPS)?,
            open(map_names::DROP_STATS)?,
            open(map_names::TRACE)?,
            open(map_names::FRAGMENTS)?,
            open(map_names::SVC_CIDRS)?,
        )
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per map, in map_names order; a struct would only repeat the names"
    )]
    fn from_maps(
        conntrack: Map,
        config: Map,
        local_nets: Map,
        src_ranges: Map,
        vips: Map,
        drop_stats: Map,
        trace: Map,
        fragments: Map,
        svc_cidrs: Map,
    ) -> Result<Self, MapsError> {
        Ok(Self {
            conntrack: HashMap::try_from(conntrack).map_err(layout(map_names::CONNTRACK))?,
            config: Array::try_from(config).map_err(layout(map_names::CONFIG))?,
            local_nets: LpmTrie::try_from(local_nets).map_err(layout(map_names::LOCAL_NETS))?,
            src_ranges: LpmTrie::try_from(src_ranges).map_err(layout(map_names::SRC_RANGES))?,
            vips: HashMap::try_from(vips).map_err(layout(map_names::VIPS))?,
            drop_stats: PerCpuArray::try_from(drop_stats).map_err(layout(map_names::DROP_STATS))?,
            trace: Array::try_from(trace).map_err(layout(map_names::TRACE))?,
            fragments: HashMap::try_from(fragments).map_err(layout(map_names::FRAGMENTS))?,
            svc_cidrs: LpmTrie::try_from(svc_cidrs).map_err(layout(map_names::SVC_CIDRS))?,
        })
    }

    pub fn config(&self) -> Result<ConfigValue, MapsError> {
        self.config
            .get(&0, 0)
            .map_err(op(map_names::CONFIG, "lookup"))
    }

    /// Writes the configuration, keeping the map's `backend_epoch` (the caller's is ignored: only
    /// [`Self::bump_backend_epoch`] moves it, so a configuration write can never take it back).
    pub fn put_config(&mut self, value: &ConfigValue) -> Result<(), MapsError> {
        let value = ConfigValue {
            backend_epoch: self.config()?.backend_epoch,
            ..*value
        };
        self.config
            .set(0, value, 0)
            .map_err(op(map_names::CONFIG, "update"))
    }

    /// Moves `ConfigValue::backend_epoch` on (never to 0, which means "always check"), after a backend was
    /// deleted or when the agent starts: every flow's next packet checks its backend again.
    pub fn bump_backend_epoch(&mut self) -> Result<(), MapsError> {
        let mut value = self.config()?;
        value.backend_epoch = value.backend_epoch.wrapping_add(1).max(1);
        self.config
            .set(0, value, 0)
            .map_err(op(map_names::CONFIG, "update"))
    }

    pub fn node_entries(&self) -> Result<Vec<NodeEntry>, MapsError> {
        let mut out = Vec::new();
        for item in self.local_nets.iter() {
            let (k, kind) = item.map_err(op(map_names::LOCAL_NETS, "iterate"))?;
            out.push(NodeEntry::LocalNet {
                prefix: k.prefix_len(),
                addr: k.data(),
                kind,
            });
        }
        for item in self.src_ranges.iter() {
            let (k, _) = item.map_err(op(map_names::SRC_RANGES, "iterate"))?;
            let d = k.data();
            out.push(NodeEntry::SrcRange {
                service_id: u32::from_be_bytes(d.service_id),
                prefix: k.prefix_len().saturating_sub(32),
                addr: d.addr,
            });
        }
        for item in self.vips.iter() {
            let (addr, flags) = item.map_err(op(map_names::VIPS, "iterate"))?;
            out.push(NodeEntry::Vip { addr, flags });
        }
        for item in self.svc_cidrs.iter() {
            let (k, _) = item.map_err(op(map_names::SVC_CIDRS, "iterate"))?;
            out.push(NodeEntry::ServiceCidr {
                prefix: k.prefix_len(),
                addr: k.data(),
            });
        }
        Ok(out)
    }

    pub fn put_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        match *e {
            NodeEntry::LocalNet { prefix, addr, kind } => self
                .local_nets
                .insert(&Key::new(prefix, addr), kind, 0)
                .map_err(op(map_names::LOCAL_NETS, "update")),
            NodeEntry::SrcRange {
                service_id,
                prefix,
                addr,
            } => self
                .src_ranges
                .insert(&src_range_key(service_id, prefix, addr), 1, 0)
                .map_err(op(map_names::SRC_RANGES, "update")),
            NodeEntry::Vip { addr, flags } => self
                .vips
                .insert(addr, flags, 0)
                .map_err(op(map_names::VIPS, "update")),
            NodeEntry::ServiceCidr { prefix, addr } => self
                .svc_cidrs
                .insert(&Key::new(prefix, addr), lb_common::SVC_CIDR, 0)
                .map_err(op(map_names::SVC_CIDRS, "update")),
        }
    }

    pub fn delete_node_entry(&mut self, e: &NodeEntry) -> Result<(), MapsError> {
        let r = match *e {
            NodeEntry::LocalNet { prefix, addr, .. } => self
                .local_nets
                .remove(&Key::new(prefix, addr))
                .map_err(op(map_names::LOCAL_NETS, "delete")),
            NodeEntry::SrcRange {
                service_id,
                prefix,
                addr,
            } => self
                .src_ranges
                .remove(&src_range_key(service_id, prefix, addr))
                .map_err(op(map_names::SRC_RANGES, "delete")),
            NodeEntry::Vip { addr, .. } => self
                .vips
                .remove(&addr)
                .map_err(op(map_names::VIPS, "delete")),
            NodeEntry::ServiceCidr { prefix, addr } => self
                .svc_cidrs
                .remove(&Key::new(prefix, addr))
                .map_err(op(map_names::SVC_CIDRS, "delete")),
        };
        match r {
            Err(MapsError::Op {
                source: MapError::KeyNotFound,
                ..
            }) => Ok(()),
            Err(MapsError::Op {
                source: MapError::SyscallError(ref e),
                ..
            }) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Drop/verdict counters by `lb_common::reason`, summed over CPUs.
    pub fn reason_counts(&self) -> Result<Vec<u64>, MapsError> {
        let mut out = Vec::new();
        for r in 0..lb_common::reason::COUNT {
            let v = self
                .drop_stats
                .get(&r, 0)
                .map_err(op(map_names::DROP_STATS, "lookup"))?;
            out.push(v.iter().sum());
        }
        Ok(out)
    }

    pub fn trace_record(&self) -> Result<TraceValue, MapsError> {
        self.trace
            .get(&0, 0)
            .map_err(op(map_names::TRACE, "lookup"))
    }

    /// Conntrack garbage collection: removes expired entries (the programs treat them as misses, but they would
    /// hold LRU slots) and every entry of a service that no longer exists. `now_jiffies` and `hz` are the programs'
    /// clock (`clock::jiffies_now`, `clock::kernel_hz`). Entries of an older layout (legacy SNAT directions,
    /// nanosecond stamps) are rewritten in this one's form ([`lb_common::ct_rekey_legacy`]): the pin migration copies
    /// them, and the programs of the previous build may still write some until the new ones are attached.
    /// Returns how many entries went.
    pub fn conntrack_gc(
        &mut self,
        live_services: &HashSet<u32>,
        now_jiffies: u64,
        hz: u32,
    ) -> Result<usize, MapsError> {
        let mut stale = Vec::new();
        let mut legacy = Vec::new();
        for (k, v) in self.conntrack.iter().filter_map(Result::ok) {
            let expired = now_jiffies.saturating_sub(v.last_seen_jiffies)
                > u64::from(v.lifetime_s) * u64::from(hz);
            if expired || !live_services.contains(&v.service_id) {
                stale.push(k);
            } else if let Some(new) = lb_common::ct_rekey_legacy(&k, &v, now_jiffies) {
                legacy.push((k, new));
            }
        }
        for k in &stale {
            let _ = self.conntrack.remove(k);
        }
        for (old, (k, v)) in &legacy {
            if self.conntrack.insert(k, v, 0).is_ok() && old != k {
                let _ = self.conntrack.remove(old);
            }
        }
        Ok(stale.len())
    }

    /// Writes entries carried over from a migrated conntrack map (`pins::migrated_conntrack`); an entry the new
    /// map has already (a flow the new programs saw first) is kept. Returns how many were written.
    pub fn carry_conntrack(&mut self, entries: &[(CtKey, CtValue)]) -> usize {
        entries
            .iter()
            .filter(|(k, v)| self.conntrack.insert(k, v, BPF_NOEXIST).is_ok())
            .count()
    }

    /// Forward conntrack entries (one per flow), for listings.
    pub fn flows(&self) -> Result<Vec<(CtKey, CtValue)>, MapsError> {
        Ok(self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| lb_common::ct_role(k, v) == lb_common::CtRole::Forward)
            .collect())
    }
}

fn src_range_key(service_id: u32, prefix: u32, addr: [u8; 16]) -> Key<SrcRangeData> {
    Key::new(
        32 + prefix,
        SrcRangeData {
            service_id: service_id.to_be_bytes(),
            addr,
        },
    )
}

/// `bpf_map_update_elem` flag: only create, never replace (uapi `BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;

/// `CLOCK_MONOTONIC` in nanoseconds, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_prefixes_count_bits_of_the_mapped_form_and_clear_the_host_part() {
        let (p, a) = lpm_prefix("10.244.1.7".parse().expect("ip"), 24);
        assert_eq!(p, 120);
        assert_eq!(&a[12..], &[10, 244, 1, 0]);
        let (p, a) = lpm_prefix("fd00::1".parse().expect("ip"), 64);
        assert_eq!(p, 64);
        assert_eq!(a[15], 0);
    }
}
