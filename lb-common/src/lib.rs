//! Map keys and values shared by lb's eBPF programs (`lb-ebpf`) and its agent (`lb-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding fields, so the layout the kernel sees, the layout BTF
//! describes (and bpftool prints by field) and the layout the agent writes are the same, with no uninitialised bytes
//! in map keys.
//!
//! Byte order, once for all types: **addresses** are 16-byte arrays in network byte order (IPv4 as the IPv4-mapped
//! IPv6 address `::ffff:a.b.c.d`, so one map serves both families); **ports** are in host byte order, so that
//! `bpftool map dump` shows `80`, not `20480`. The programs convert ports at the edge; the agent uses the
//! constructors below.
#![no_std]

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;
/// `IPPROTO_SCTP`.
pub const PROTO_SCTP: u8 = 132;

/// Traffic that arrives from outside this node (tc / XDP): NodePort, LoadBalancer, externalIPs, ClusterIP from the
/// wire. Uses the external traffic policy's endpoint set.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Traffic from this node's own pods and processes (socket LB). Uses the internal traffic policy's set for
/// ClusterIPs and the whole cluster set for external VIPs (kube-proxy short-circuits those for local clients).
pub const SCOPE_INTERNAL: u8 = 1;

/// Pick a backend by Maglev consistent hashing of the flow.
pub const ALG_MAGLEV: u8 = 0;
/// Pick a backend uniformly at random (weighted by the table's contents).
pub const ALG_RANDOM: u8 = 1;

/// Service flag: endpoints exist but none may be used from this scope (a `Local` policy with no local endpoint):
/// drop rather than reject (SEMANTICS.md rule 8).
pub const SVC_FLAG_DROP_NO_BACKEND: u8 = 1;

/// Map capacities compiled into the object. The agent overrides them from its configuration at load time
/// (`EbpfLoader::set_max_entries`), so these only need to be sane defaults.
pub const DEFAULT_MAX_SERVICES: u32 = 65536;
pub const DEFAULT_MAX_BACKENDS: u32 = 65536;
pub const DEFAULT_MAX_AFFINITY: u32 = 65536;
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262144;

/// `BPF_F_INNER_MAP`: lets inner arrays of one map-of-maps differ in `max_entries`, so each service's lookup table
/// is exactly as large as it needs to be. Inner maps must carry the same flag as the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_NO_PREALLOC`: required for hash-of-maps updates to be atomic with respect to readers.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// Index of the table length inside a lookup table (`LB_MAGLEV` inner array); slots follow from index 1.
pub const LUT_LEN_INDEX: u32 = 0;

/// Map names as the object defines them and bpftool shows them (kernel map names hold 15 characters).
pub mod map_names {
    pub const SERVICES: &str = "LB_SERVICES";
    pub const BACKENDS: &str = "LB_BACKENDS";
    pub const MAGLEV: &str = "LB_MAGLEV";
    pub const AFFINITY: &str = "LB_AFFINITY";
    pub const SOCK_REVNAT: &str = "LB_SOCK_REVNAT";
    pub const SVC_STATS: &str = "LB_SVC_STATS";
    pub const BE_STATS: &str = "LB_BE_STATS";
    /// Every map the agent pins, in the order it creates them.
    pub const ALL: [&str; 7] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        AFFINITY,
        SOCK_REVNAT,
        SVC_STATS,
        BE_STATS,
    ];
}

/// Program names as the object defines them (function names, which aya uses as program names).
pub mod prog_names {
    pub const CONNECT4: &str = "lb_connect4";
    pub const CONNECT6: &str = "lb_connect6";
    pub const SENDMSG4: &str = "lb_sendmsg4";
    pub const SENDMSG6: &str = "lb_sendmsg6";
    pub const RECVMSG4: &str = "lb_recvmsg4";
    pub const RECVMSG6: &str = "lb_recvmsg6";
    pub const GETPEERNAME4: &str = "lb_getpeername4";
    pub const GETPEERNAME6: &str = "lb_getpeername6";
    pub const SOCK_ALL: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
}

/// Converts an IPv4 address (octets in network order) to lb's 16-byte form, `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// Whether a 16-byte address is the IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
}

/// Converts an address to lb's 16-byte form (IPv4 becomes `::ffff:a.b.c.d`).
#[inline(always)]
pub const fn addr_bytes(addr: core::net::IpAddr) -> [u8; 16] {
    match addr {
        core::net::IpAddr::V4(a) => v4_mapped(a.octets()),
        core::net::IpAddr::V6(a) => a.octets(),
    }
}

/// Converts lb's 16-byte form back; IPv4-mapped addresses become IPv4.
pub fn addr_from_bytes(bytes: [u8; 16]) -> core::net::IpAddr {
    if is_v4_mapped(&bytes) {
        core::net::IpAddr::V4(core::net::Ipv4Addr::new(
            bytes[12], bytes[13], bytes[14], bytes[15],
        ))
    } else {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(bytes))
    }
}

/// `LB_SERVICES` key: one virtual service, a (VIP, port, protocol) as seen from one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, network byte order (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    /// `PROTO_TCP`, `PROTO_UDP` or `PROTO_SCTP`.
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_INTERNAL`.
    pub scope: u8,
}

impl ServiceKey {
    pub const fn new(addr: core::net::IpAddr, port: u16, proto: u8, scope: u8) -> Self {
        Self {
            addr: addr_bytes(addr),
            port,
            proto,
            scope,
        }
    }

    pub fn ip(&self) -> core::net::IpAddr {
        addr_from_bytes(self.addr)
    }
}

/// `LB_SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Agent-allocated id: key of this service's `LB_MAGLEV` table and index into `LB_SVC_STATS`. Stable across
    /// agent restarts (restored from this map).
    pub service_id: u32,
    /// Number of distinct backends; 0 means reject (or drop, with `SVC_FLAG_DROP_NO_BACKEND`).
    pub backend_count: u32,
    /// ClientIP session affinity timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
    /// `ALG_MAGLEV` or `ALG_RANDOM`.
    pub algorithm: u8,
    /// `SVC_FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Agent bookkeeping, ignored by the datapath: a hash of this service's `LB_MAGLEV` table, so a restarted agent
    /// knows whether the table already holds what it would write without reading it back slot by slot.
    pub table_hash: u32,
}

/// `LB_BACKENDS` value (key: backend id, `u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendValue {
    /// Endpoint address, network byte order (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    pub proto: u8,
    /// Reserved for backend state (terminating, maintenance); 0 today.
    pub flags: u8,
}

impl BackendValue {
    pub const fn new(addr: core::net::IpAddr, port: u16, proto: u8) -> Self {
        Self {
            addr: addr_bytes(addr),
            port,
            proto,
            flags: 0,
        }
    }

    pub fn ip(&self) -> core::net::IpAddr {
        addr_from_bytes(self.addr)
    }
}

/// `LB_AFFINITY` key: (service, client). The socket LB identifies a client by its network namespace cookie, since
/// at `connect()` time the socket has no source address yet and one pod is one namespace; the tc path uses the
/// client address and leaves the cookie 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    /// Client address, network byte order; zero for the socket LB.
    pub client_addr: [u8; 16],
    pub service_id: u32,
    pub _pad: u32,
}

/// `LB_AFFINITY` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last use; the entry is stale once this is older than the service's timeout.
    pub last_used_ns: u64,
}

/// `LB_SOCK_REVNAT` key: (socket cookie, backend address, backend port): what `recvmsg` and `getpeername` see
/// after the socket LB translated a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `LB_SOCK_REVNAT` value: the VIP the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRevNatValue {
    /// VIP, network byte order.
    pub addr: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
    pub service_id: u32,
}

/// `LB_SVC_STATS` value (per-CPU array indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Connections (TCP `connect`, UDP `connect`/first `sendmsg`) the socket LB translated.
    pub sock_connects: u64,
    /// `connect`/`sendmsg` calls rejected because the service had no backend.
    pub sock_rejects: u64,
    /// Packets and bytes the tc/XDP datapath forwarded (filled by the per-packet programs).
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped (no usable backend under a Local policy, source range, ...).
    pub drops: u64,
}

/// `LB_BE_STATS` value (per-CPU array indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    pub sock_connects: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], made only of integers and integer arrays, with explicit padding fields, so
    // any bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for BackendStats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The kernel side and BTF see these sizes; a change here is a map layout change that forces a pin migration.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 20);
        assert_eq!(size_of::<BackendValue>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 32);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<SockRevNatKey>(), 32);
        assert_eq!(size_of::<SockRevNatValue>(), 24);
        assert_eq!(size_of::<ServiceStats>(), 40);
        assert_eq!(size_of::<BackendStats>(), 24);
    }

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 10));
        assert_eq!(addr_from_bytes(addr_bytes(v4)), v4);
        assert_eq!(addr_from_bytes(addr_bytes(v6)), v6);
        assert_eq!(ServiceKey::new(v4, 80, PROTO_TCP, SCOPE_INTERNAL).ip(), v4);
    }

    #[test]
    fn v4_mapped_round_trips() {
        let a = v4_mapped([10, 96, 0, 1]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[10, 96, 0, 1]);
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        assert!(!is_v4_mapped(&v6));
    }
}
