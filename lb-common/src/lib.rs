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

/// Service flag: the frontend has `loadBalancerSourceRanges`; sources outside `LB_SRC_RANGES` for its id drop
/// (SEMANTICS.md rule 9). Set only on `SCOPE_EXTERNAL` LoadBalancer frontends.
pub const SVC_FLAG_SOURCE_RANGES: u8 = 2;

/// Backend flag: the endpoint runs on this node (its `nodeName` is this node's name). A remote backend reached from
/// outside the node needs SNAT (SEMANTICS.md rule 6).
pub const BACKEND_FLAG_LOCAL: u8 = 1;

/// Map capacities compiled into the object. The agent overrides them from its configuration at load time
/// (`EbpfLoader::set_max_entries`), so these only need to be sane defaults.
pub const DEFAULT_MAX_SERVICES: u32 = 65536;
pub const DEFAULT_MAX_BACKENDS: u32 = 65536;
pub const DEFAULT_MAX_AFFINITY: u32 = 65536;
pub const DEFAULT_MAX_SOCK_REVNAT: u32 = 262144;
/// Conntrack entries (two per flow: forward and reply).
pub const DEFAULT_MAX_CONNTRACK: u32 = 262144;
/// Local networks (pod CIDRs and node addresses) and source ranges.
pub const DEFAULT_MAX_LOCAL_NETS: u32 = 1024;
pub const DEFAULT_MAX_SRC_RANGES: u32 = 16384;
pub const DEFAULT_MAX_VIPS: u32 = 65536;
/// Service CIDRs (`LB_SVC_CIDRS`): a cluster has a handful of ServiceCIDR objects, each with at most two CIDRs.
pub const DEFAULT_MAX_SVC_CIDRS: u32 = 256;
/// Fragmented datagrams in flight whose first fragment was translated (`LB_FRAGMENTS`, LRU).
pub const DEFAULT_MAX_FRAGMENTS: u32 = 8192;

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
    pub const CONNTRACK: &str = "LB_CONNTRACK";
    pub const CONFIG: &str = "LB_CONFIG";
    pub const LOCAL_NETS: &str = "LB_LOCAL_NETS";
    pub const SRC_RANGES: &str = "LB_SRC_RANGES";
    pub const VIPS: &str = "LB_VIPS";
    pub const DROP_STATS: &str = "LB_DROP_STATS";
    pub const TRACE: &str = "LB_TRACE";
    pub const FRAGMENTS: &str = "LB_FRAGMENTS";
    /// The cluster's service CIDRs (ServiceCIDR objects, or `--service-cidrs`); 15 characters at most, as every
    /// kernel map name.
    pub const SVC_CIDRS: &str = "LB_SVC_CIDRS";
    pub const XDP_L2: &str = "LB_XDP_L2";
    /// Kubernetes names of the service ids, for operators; created by the agent, not by the object.
    pub const SVC_NAMES: &str = "LB_SVC_NAMES";
    /// Maps the agent creates and pins itself (no program uses them), so the loader does not know them.
    pub const AGENT_CREATED: [&str; 1] = [SVC_NAMES];
    /// Every map the agent pins, in the order it creates them.
    pub const ALL: [&str; 17] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        AFFINITY,
        SOCK_REVNAT,
        SVC_STATS,
        BE_STATS,
        CONNTRACK,
        CONFIG,
        LOCAL_NETS,
        SRC_RANGES,
        VIPS,
        DROP_STATS,
        TRACE,
        FRAGMENTS,
        SVC_CIDRS,
        XDP_L2,
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
    /// tc programs on the node's external interfaces (ingress: service DNAT and reply reverse-SNAT; egress: reverse
    /// DNAT of replies from local backends).
    pub const TC_INGRESS: &str = "lb_tc_ingress";
    pub const TC_EGRESS: &str = "lb_tc_egress";
    /// The XDP fast path on the same interfaces (`--xdp`): early source-range drops and established remote-backend
    /// flows translated and sent back out without the stack.
    pub const XDP: &str = "lb_xdp";
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

/// CRC32c's generator polynomial, bit-reflected (Castagnoli; SCTP, RFC 9260 appendix A).
pub const CRC32C_POLY: u32 = 0x82f6_3b78;

/// The reduction table of one CRC32c shift step: `[0, CRC32C_POLY]`, indexed by the bit that falls out.
///
/// The eBPF programs read it from a map rather than a constant on purpose (kernel 6.18, LLVM 22): with a constant,
/// LLVM turns the step into a select, i.e. a branch or a `(x << 63) s>> 63 & C` mask on a packet-derived bit, and
/// the verifier forks on each of those (the mask form splits the state without a join to prune at), so 32 steps
/// became 2^32 paths ("BPF program is too large. Processed 1000001 insn"). A load from map memory at a 0/4 offset is
/// one unknown value for the verifier and no fork.
pub const CRC32C_STEP: [u32; 2] = [0, CRC32C_POLY];

/// `a * b mod P` over GF(2) for polynomials in CRC32c's reflected form (bit 31 is the coefficient of x^0, bit 0
/// that of x^31). `a` should be a constant the verifier knows (its bits pick what is added); `b` may come from the
/// packet. `step` is [`CRC32C_STEP`].
#[inline(always)]
pub fn crc32c_mulmod(a: u32, b: u32, step: &[u32; 2]) -> u32 {
    let mut b = b;
    let mut product = 0u32;
    let mut i = 0;
    while i < 32 {
        // Coefficient of x^i in `a`, as an all-ones or all-zeros mask; `b` is the original b * x^i here.
        product ^= b & 0u32.wrapping_sub((a >> (31 - i)) & 1);
        // b * x: shift towards x^31, and reduce by P when x^32 falls out.
        b = (b >> 1) ^ step[(b & 1) as usize];
        i += 1;
    }
    product
}

/// How an SCTP packet's CRC32c field changes when its first 4 bytes (source and destination port) change from
/// `old` to `new` and nothing else does: `new_field = old_field ^ delta` with the field read as a little-endian
/// `u32` (as SCTP stores it), for a packet of `len` bytes (common header and chunks, so at least 12). `step` is
/// [`CRC32C_STEP`] (see there why it is a parameter).
///
/// Why it holds: write CRC(m) = raw(~0, m) ^ ~0, where raw(s, m) is the CRC register after feeding m to the
/// register s. raw is affine: raw(s, m) = raw(s, 0) ^ raw(0, m), and linear in m. For two packets of the same
/// length that differ in bytes 0..4 by D (the checksum field counts as zero in both, RFC 9260 §6.8), CRC(a) ^ CRC(b)
/// = raw(0, D followed by len - 4 zero bytes). Feeding D's 4 bytes to the zero register gives r; each further zero
/// byte multiplies the register by x^8 mod P, so the result is r * x^(8 (len - 4)) mod P, computed by square and
/// multiply in 16 steps (len < 65536). The field is the CRC little-endian, so XOR applies to it as it is. An
/// incoming packet with a wrong CRC keeps a wrong one (nothing is recomputed from scratch), and the work does not
/// depend on the packet's size or on reading its chunks. `crc32c_port_delta_matches_a_full_recomputation` checks
/// it against a bitwise CRC32c for every length up to 9000 bytes.
#[inline(always)]
pub fn crc32c_port_delta(old: [u8; 4], new: [u8; 4], len: u32, step: &[u32; 2]) -> u32 {
    // raw(0, D): the 4 bytes XORed into the zero register (reflected CRCs take bytes little-endian first), then 32
    // shift steps.
    let mut r = u32::from_le_bytes([
        old[0] ^ new[0],
        old[1] ^ new[1],
        old[2] ^ new[2],
        old[3] ^ new[3],
    ]);
    let mut i = 0;
    while i < 32 {
        r = (r >> 1) ^ step[(r & 1) as usize];
        i += 1;
    }
    // r * x^(8 * zeros) mod P, multiplying r by x^(8 * 2^k) for every bit k set in `zeros`; x^8 is bit 31 - 8 in
    // reflected form, and each step squares it (constants the verifier computes itself).
    let zeros = len.saturating_sub(4) & 0xffff;
    let mut square = 1u32 << (31 - 8);
    let mut k = 0;
    while k < 16 {
        if (zeros >> k) & 1 != 0 {
            r = crc32c_mulmod(square, r, step);
        }
        square = crc32c_mulmod(square, square, step);
        k += 1;
    }
    r
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
    /// `BACKEND_FLAG_*` bits (`BACKEND_FLAG_LOCAL`: the endpoint is on this node).
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

/// Room for `namespace/name:port` (63 + 1 + 63 + 1 + 15 bytes, Kubernetes' own limits) and a NUL.
pub const SERVICE_NAME_LEN: usize = 144;

/// `ServiceNameValue::kind`: which kind of VIP the frontend is.
pub const VIP_KIND_CLUSTER_IP: u8 = 0;
pub const VIP_KIND_EXTERNAL_IP: u8 = 1;
pub const VIP_KIND_LOAD_BALANCER: u8 = 2;
pub const VIP_KIND_NODE_PORT: u8 = 3;

/// `LB_SVC_NAMES` value (hash, key: service id `u32`): the Kubernetes service port behind a service id, so the CLI
/// and the metrics can name services without the agent. Written by the agent after every sync (deleted with the
/// service); no program reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceNameValue {
    /// `namespace/name:port` (`:port` only for a named port), UTF-8, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// `VIP_KIND_*`.
    pub kind: u8,
    pub _pad: [u8; 7],
}

impl ServiceNameValue {
    /// Stores `name`, cut at a character boundary if it is longer than the field (a valid Kubernetes name never is).
    pub fn new(name: &str, kind: u8) -> Self {
        let mut end = name.len().min(SERVICE_NAME_LEN - 1);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; SERVICE_NAME_LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self {
            name: bytes,
            kind,
            _pad: [0; 7],
        }
    }

    /// The stored name; empty if the bytes are not UTF-8.
    pub fn name(&self) -> &str {
        let len = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("")
    }
}

/// `LB_CONNTRACK` direction: the tuple as the client sent it (looked up at tc ingress).
pub const CT_DIR_FWD: u8 = 0;
/// `LB_CONNTRACK` direction: the tuple of a reply as the backend sends it to the client (tc egress: source back to
/// the VIP).
pub const CT_DIR_REPLY: u8 = 1;
/// `LB_CONNTRACK` direction: a forward packet after DNAT, leaving towards a remote backend (tc egress: source to the
/// node's SNAT address and port).
pub const CT_DIR_SNAT: u8 = 2;
/// `LB_CONNTRACK` direction: a reply to the SNAT address and port (tc ingress: destination back to the client).
pub const CT_DIR_SNAT_REPLY: u8 = 3;

/// `CtValue.flags`: the flow was SNATed to the node address (its reply comes back to the node).
pub const CT_FLAG_SNAT: u8 = 1;
/// `CtValue.flags`: a TCP FIN or RST was seen; the entry lives `CT_LIFETIME_CLOSING_S` from then on.
pub const CT_FLAG_CLOSING: u8 = 2;

/// Conntrack lifetimes in seconds, checked by the programs on lookup (an expired entry is a miss) and by the
/// agent's garbage collector: established TCP, TCP after FIN/RST, a TCP flow that has only seen a SYN, other protocols.
pub const CT_LIFETIME_TCP_S: u32 = 21600;
pub const CT_LIFETIME_CLOSING_S: u32 = 10;
pub const CT_LIFETIME_SYN_S: u32 = 60;
pub const CT_LIFETIME_OTHER_S: u32 = 60;

/// `LB_CONNTRACK` key: one direction of a flow, as the packet carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// Source and destination address, network byte order (IPv4-mapped for IPv4).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports, host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_FWD` or `CT_DIR_REPLY`.
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// `LB_CONNTRACK` value: how to rewrite a packet of this direction, and the entry's life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` of the last packet; the entry is expired once older than `lifetime_s`.
    pub last_seen_ns: u64,
    /// The rewritten source and destination (forward: SNAT address or the client itself, and the backend; reply:
    /// the VIP, and the client). Network byte order.
    pub new_saddr: [u8; 16],
    pub new_daddr: [u8; 16],
    /// Rewritten ports, host byte order.
    pub new_sport: u16,
    pub new_dport: u16,
    /// The backend the flow is pinned to; checked against `LB_BACKENDS` on every forward hit (rule 12).
    pub backend_id: u32,
    pub service_id: u32,
    pub lifetime_s: u32,
    /// `CT_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// `LB_CONFIG` value (array of one): node-wide settings of the per-packet datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigValue {
    /// SNAT addresses per family (rule 6), network byte order; all zero = none (then remote backends drop).
    pub snat_v4: [u8; 16],
    pub snat_v6: [u8; 16],
    /// `CONFIG_FLAG_*`.
    pub flags: u32,
    pub _pad: u32,
    /// The network namespace cookie of the node's own namespace (the agent's; `hostNetwork` in a cluster): the
    /// socket LB serves `localhost:nodePort` only to sockets of this namespace (rule 14).
    pub host_netns_cookie: u64,
}

/// `ConfigValue.flags`: record every verdict in `LB_TRACE` (only `lb-agent trace` sets it, on its private maps).
pub const CONFIG_FLAG_TRACE: u32 = 1;
/// `ConfigValue.flags`: `localhost:nodePort` (IPv4 `127.0.0.0/8`) from the host's own namespace reaches the NodePort
/// Services, as kube-proxy's iptables mode does with `--iptables-localhost-nodeports` (rule 14).
pub const CONFIG_FLAG_LOCALHOST_NODEPORTS: u32 = 2;

/// The address the agent gives the `localhost:nodePort` frontends (`SCOPE_INTERNAL`, kind NodePort); the socket LB
/// looks up any `127.0.0.0/8` destination of a host socket under it.
pub const LOCALHOST_NODEPORT_ADDR: [u8; 4] = [127, 0, 0, 1];

/// `ConfigValue.flags`: the XDP fast path is attached (`--xdp`), so tc egress records the Ethernet header of the
/// SNATed flows' packets in `LB_XDP_L2`; without it tc egress skips that work.
pub const CONFIG_FLAG_XDP: u32 = 4;

/// How long (nanoseconds) a learned L2 header (`LB_XDP_L2`) may be used by XDP after tc egress recorded it. Past
/// that, XDP passes the flow's next packet to tc, whose egress records the header again: a changed neighbour (new
/// MAC, new route) is picked up within this time.
pub const XDP_L2_FRESH_NS: u64 = 10_000_000_000;
/// tc egress rewrites an unchanged `LB_XDP_L2` entry only when it is older than this, so a slow-path flow costs
/// one map update per second rather than one per packet.
pub const XDP_L2_REFRESH_NS: u64 = 1_000_000_000;

/// `LB_XDP_L2` value: the Ethernet header and interface a SNATed flow's packets left with, as tc egress saw them
/// (the neighbour subsystem filled it in). Key: the `CtKey` tc egress used for the packet: the `CT_DIR_SNAT` key
/// for the client -> backend leg, the `CT_DIR_REPLY` key for the backend -> client leg.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpL2Value {
    /// `bpf_ktime_get_ns()` when tc egress recorded it; XDP uses it for `XDP_L2_FRESH_NS`.
    pub learned_ns: u64,
    /// The egress interface's index.
    pub ifindex: u32,
    /// Destination and source MAC, as on the wire.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

/// `LB_LOCAL_NETS` (LPM trie, key data: a 16-byte address; the prefix length counts its bits, 96 + n for an IPv4
/// /n) value kinds: a pod CIDR of this node, or one of its own addresses.
pub const LOCAL_NET_POD: u8 = 1;
pub const LOCAL_NET_NODE: u8 = 2;

/// `LB_SRC_RANGES` key data (LPM trie): (service id, source prefix). The prefix length = 32 (the id, matched whole)
/// + the address bits (96 + n for IPv4 /n). Value: `u8` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SrcRangeData {
    /// Service id, big-endian bytes, so the trie matches it as the leading 32 bits.
    pub service_id: [u8; 4],
    pub addr: [u8; 16],
}

/// `LB_VIPS` value flag: the address is a ClusterIP (rule 8: an undefined port or protocol on it rejects).
pub const VIP_FLAG_CLUSTER_IP: u8 = 1;

/// `LB_SVC_CIDRS` (LPM trie, key data: a 16-byte address, prefix length as in `LB_LOCAL_NETS`) value: the prefix
/// is a service CIDR. An address inside one that is no ClusterIP (`LB_VIPS`) is unallocated (rule 8: drop).
pub const SVC_CIDR: u8 = 1;

/// Verdicts of the per-packet programs, as `LB_TRACE` records them.
pub const VERDICT_PASS: u32 = 0;
pub const VERDICT_FORWARD: u32 = 1;
pub const VERDICT_DROP: u32 = 2;
pub const VERDICT_REJECT: u32 = 3;

/// Reasons, the index of `LB_DROP_STATS` and `TraceValue.reason`.
pub mod reason {
    /// Not a service packet (or forwarded: no reason needed).
    pub const NONE: u32 = 0;
    /// A new flow picked a backend.
    pub const NEW_FLOW: u32 = 1;
    /// An established flow followed its conntrack entry.
    pub const CONNTRACK: u32 = 2;
    /// A reply was translated back.
    pub const REPLY: u32 = 3;
    /// Rule 8: the service has no endpoints at all.
    pub const NO_ENDPOINTS: u32 = 4;
    /// Rule 5: endpoints exist but none is local under a Local policy.
    pub const NO_LOCAL_ENDPOINT: u32 = 5;
    /// Rule 9: the source is outside `loadBalancerSourceRanges`.
    pub const SOURCE_RANGE: u32 = 6;
    /// Rule 12: the flow's backend was deleted.
    pub const BACKEND_GONE: u32 = 7;
    /// Rule 8: a ClusterIP reached on a port or protocol its Service does not define.
    pub const UNKNOWN_PORT: u32 = 8;
    /// The packet is too short or inconsistent to be handled.
    pub const MALFORMED: u32 = 9;
    /// A later IPv4/IPv6 fragment with no `LB_FRAGMENTS` entry (its first fragment was not seen, came later, or
    /// was not translated): it carries no ports to match, so it passes untouched.
    pub const FRAGMENT: u32 = 10;
    /// A remote backend needs SNAT but no SNAT address of the family is configured, or no SNAT port was free.
    pub const NO_SNAT: u32 = 11;
    /// Conntrack could not be written (map full).
    pub const CT_FULL: u32 = 12;
    /// The lookup table or backend vanished under a concurrent update.
    pub const NO_BACKEND: u32 = 13;
    /// Building the reject reply failed.
    pub const REJECT_FAILED: u32 = 14;
    /// A later fragment translated as its datagram's first fragment was (`LB_FRAGMENTS`).
    pub const FRAGMENT_FOLLOWED: u32 = 15;
    /// Rule 8: the destination is inside a service CIDR but no Service holds it (kube-proxy nftables'
    /// "Drop traffic to unallocated ClusterIPs").
    pub const UNALLOCATED_CLUSTER_IP: u32 = 16;
    /// XDP translated a packet of an established remote-backend flow (client -> backend: DNAT + SNAT) and sent it
    /// out itself (XDP_TX / redirect), without the stack or tc.
    pub const XDP_FORWARD: u32 = 17;
    /// XDP translated a reply of such a flow (backend -> client: both reverse translations) and sent it out.
    pub const XDP_REPLY: u32 = 18;
    /// Number of reasons (size of `LB_DROP_STATS`).
    pub const COUNT: u32 = 19;

    /// The name `lb-agent trace` prints.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            NEW_FLOW => "new-flow",
            CONNTRACK => "conntrack",
            REPLY => "reply",
            NO_ENDPOINTS => "no-endpoints",
            NO_LOCAL_ENDPOINT => "no-local-endpoint",
            SOURCE_RANGE => "source-range",
            BACKEND_GONE => "backend-gone",
            UNKNOWN_PORT => "unknown-port",
            MALFORMED => "malformed",
            FRAGMENT => "fragment",
            NO_SNAT => "no-snat",
            CT_FULL => "conntrack-full",
            NO_BACKEND => "no-backend",
            REJECT_FAILED => "reject-failed",
            FRAGMENT_FOLLOWED => "fragment-followed",
            UNALLOCATED_CLUSTER_IP => "unallocated-cluster-ip",
            XDP_FORWARD => "xdp-forward",
            XDP_REPLY => "xdp-reply",
            _ => "not-a-service",
        }
    }
}

/// `FragKey::hook`: the tc hook that translated the first fragment. The same datagram carries different addresses
/// at ingress (before DNAT) and egress (after it), and one hook's entry must never translate the other's packets.
pub const FRAG_HOOK_INGRESS: u8 = 0;
pub const FRAG_HOOK_EGRESS: u8 = 1;

/// `FragValue::flags`: the first fragment was counted in the service's and backend's packet counters, so later
/// fragments are too.
pub const FRAG_FLAG_COUNTED: u8 = 2;

/// How long (seconds) a fragment entry translates later fragments after its first fragment. Fragments of one
/// datagram follow each other within milliseconds; a short life keeps an entry from translating an unrelated
/// datagram that reuses the identification (IPv4's is 16 bits and wraps after 65536 datagrams) when that
/// datagram's own first fragment was never seen here.
pub const FRAG_LIFETIME_S: u32 = 2;

/// `LB_FRAGMENTS` key: one fragmented IP datagram as its fragments carry it at one hook (RFC 791 / RFC 8200: a
/// datagram is identified by source, destination, protocol and identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source and destination as the fragment carries them, network byte order (IPv4-mapped for IPv4).
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The Identification: IPv4's 16-bit field or the IPv6 Fragment header's 32-bit one, host byte order.
    pub id: u32,
    /// The upper-layer protocol (`PROTO_TCP`, `PROTO_UDP`, `PROTO_SCTP`).
    pub proto: u8,
    /// `FRAG_HOOK_INGRESS` or `FRAG_HOOK_EGRESS`.
    pub hook: u8,
    pub _pad: [u8; 2],
}

/// `LB_FRAGMENTS` value: the addresses the first fragment was rewritten to. No ports: later fragments carry no L4
/// header, and the L4 checksum (pseudo-header included) lives in the first fragment, which was already updated.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    /// `bpf_ktime_get_ns()` when the first fragment was translated; the entry is dead `FRAG_LIFETIME_S` later.
    pub created_ns: u64,
    /// The first fragment's rewritten source and destination, network byte order.
    pub new_saddr: [u8; 16],
    pub new_daddr: [u8; 16],
    /// The flow's service and backend, for the counters and `lb-agent trace`.
    pub service_id: u32,
    pub backend_id: u32,
    /// `CT_FLAG_SNAT` (the flow is SNATed) and `FRAG_FLAG_COUNTED`.
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// `LB_TRACE` value (array of one, written only with `CONFIG_FLAG_TRACE`): the last verdict of the tc programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceValue {
    /// `VERDICT_*`.
    pub verdict: u32,
    /// `reason::*`.
    pub reason: u32,
    pub service_id: u32,
    pub backend_id: u32,
    /// 1 when the source was rewritten (SNAT).
    pub snat: u32,
    /// Incremented on every record, so a reader can tell a fresh record from a stale one.
    pub seq: u32,
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
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ConfigValue {}
    unsafe impl aya::Pod for SrcRangeData {}
    unsafe impl aya::Pod for TraceValue {}
    unsafe impl aya::Pod for ServiceNameValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for XdpL2Value {}
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
        assert_eq!(size_of::<CtKey>(), 40);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(size_of::<ConfigValue>(), 48);
        assert_eq!(size_of::<SrcRangeData>(), 20);
        assert_eq!(size_of::<TraceValue>(), 24);
        assert_eq!(size_of::<ServiceNameValue>(), 152);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 56);
        assert_eq!(size_of::<XdpL2Value>(), 24);
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
    fn service_names_round_trip_and_truncate_on_char_boundaries() {
        assert_eq!(
            ServiceNameValue::new("ns/web:http", 0).name(),
            "ns/web:http"
        );
        // Two-byte characters straddle the cut: 143 bytes available, so the last one must be dropped whole.
        let mut bytes = [0u8; 2 * SERVICE_NAME_LEN];
        for pair in bytes.chunks_mut(2) {
            pair.copy_from_slice("é".as_bytes());
        }
        let long = core::str::from_utf8(&bytes).expect("utf-8");
        let v = ServiceNameValue::new(long, 0);
        assert!(v.name().len() < SERVICE_NAME_LEN && v.name().chars().all(|c| c == 'é'));
    }

    /// CRC32c bit by bit, as RFC 9260 appendix A defines it (the reference the incremental update must match).
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ CRC32C_POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc32c_port_delta_matches_a_full_recomputation() {
        // A deterministic pseudo-random walk over lengths (all multiples of 4 from 12 to 9000, the jumbo MTU),
        // contents and port changes; the checksum field is zero while computing, as SCTP defines it.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut packet = [0u8; 9000];
        for len in (12..=9000usize).step_by(4) {
            for b in packet[..len].iter_mut() {
                *b = next() as u8;
            }
            packet[8..12].fill(0);
            let old_crc = crc32c(&packet[..len]);
            let old: [u8; 4] = packet[..4].try_into().expect("4 bytes");
            let new = (next() as u32).to_be_bytes();
            packet[..4].copy_from_slice(&new);
            let new_crc = crc32c(&packet[..len]);
            assert_eq!(
                old_crc ^ crc32c_port_delta(old, new, len as u32, &CRC32C_STEP),
                new_crc,
                "length {len}"
            );
        }
        // No change, no delta.
        assert_eq!(
            crc32c_port_delta([1, 2, 3, 4], [1, 2, 3, 4], 100, &CRC32C_STEP),
            0
        );
        // RFC 3720 B.4's CRC32c test vector: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
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
