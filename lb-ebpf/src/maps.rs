//! The pinned contract: every map the agent pins, reads or writes, named as `lb_common::map_names` says (the `#[btf_map]` static's name is the
//! map name). Keys and values are lb-common's types; their byte order is described there once.
//!
//! The agent's reconciler is the only writer of the configuration maps (`LB_SERVICES`, `LB_BACKENDS`, `LB_MAGLEV`);
//! the programs write only session state (`LB_AFFINITY`, `LB_SOCK_REVNAT`) and counters.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use lb_common::{
    AffinityKey, AffinityValue, BPF_F_INNER_MAP, BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU,
    BPF_F_NO_PREALLOC, BackendStats, BackendValue, ConfigValue, CtKey, CtValue,
    DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_CONNTRACK, DEFAULT_MAX_FRAGMENTS,
    DEFAULT_MAX_LOCAL_NETS, DEFAULT_MAX_NETNS_ADDRS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCK_REVNAT,
    DEFAULT_MAX_SRC_RANGES, DEFAULT_MAX_SVC_CIDRS, DEFAULT_MAX_VIPS, EVENTS_RING_BYTES, FragKey,
    FragValue, MonitorBucket, MonitorConfig, MonitorEvent, NetnsAddrs, ServiceKey, ServiceStats,
    ServiceValue, SlotBlock, SockRevNatKey, SockRevNatValue, SrcRangeData, TraceValue, XdpL2Value,
    reason,
};

/// The flat slot array, `LB_MAGLEV`'s inner map: every service's lookup table is a region of it (lb-common
/// `ServiceValue`, `SlotBlock`). Declared with one entry: `BPF_F_INNER_MAP` lets the real array have any size, so the
/// agent can grow it by swapping in a larger one without reloading the programs (lookups then go through the
/// helper and are checked against the real array's size at run time), and `BPF_F_MMAPABLE` lets the agent write it
/// through a memory mapping.
pub type SlotArray = Array<SlotBlock, 1, { (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize }>;

// `BPF_F_NO_PREALLOC` on the two configuration hashes: without it the kernel recycles a replaced or deleted element's
// memory at once (preallocated freelist), so a value the program is reading could turn into another entry's bytes
// halfway through the copy; with it, freed elements wait for an RCU grace period, which outlasts the program run.

/// `ServiceKey` -> `ServiceValue`: one virtual service per (VIP, port, protocol, scope). Written by the agent; read by
/// every forward hook.
#[btf_map]
pub static LB_SERVICES: HashMap<
    ServiceKey,
    ServiceValue,
    { DEFAULT_MAX_SERVICES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// backend id (`u32`) -> `BackendValue`: address and port of one endpoint. Written by the agent (before any table
/// names the id); read by the forward hooks after a table or affinity lookup.
#[btf_map]
pub static LB_BACKENDS: HashMap<
    u32,
    BackendValue,
    { DEFAULT_MAX_BACKENDS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// 0 -> `SlotArray`: the one slot array holding every service's table (Katran's `ch_rings`, one flat array, with
/// regions allocated by the agent instead of a fixed ring per VIP). Written by the agent, which writes tables into
/// free regions and swaps the whole array only to grow it; read by the forward hooks' and tc's backend selection.
#[btf_map]
pub static LB_MAGLEV: ArrayOfMaps<SlotArray, 1> = ArrayOfMaps::new();

/// `AffinityKey` {netns cookie or client address, affinity id} -> `AffinityValue` {backend id, last use, table
/// hash}: ClientIP session affinity, one per client and Service port.
/// Written and read by the forward hooks; entries expire by the service's timeout (checked on read) or LRU eviction.
#[btf_map]
pub static LB_AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// `SockRevNatKey` {socket cookie, backend address, backend port} -> `SockRevNatValue` {VIP, service port, service
/// id}. Written by the forward hooks; read by the reverse hooks (recvmsg, getpeername).
#[btf_map]
pub static LB_SOCK_REVNAT: LruHashMap<
    SockRevNatKey,
    SockRevNatValue,
    { DEFAULT_MAX_SOCK_REVNAT as usize },
> = LruHashMap::new();

/// service id -> `ServiceStats`, per CPU. Written by the programs; read (summed over CPUs) by the agent.
#[btf_map]
pub static LB_SVC_STATS: PerCpuArray<ServiceStats, { DEFAULT_MAX_SERVICES as usize }> =
    PerCpuArray::new();

/// backend id -> `BackendStats`, per CPU. Written by the programs; read (summed over CPUs) by the agent.
#[btf_map]
pub static LB_BE_STATS: PerCpuArray<BackendStats, { DEFAULT_MAX_BACKENDS as usize }> =
    PerCpuArray::new();

/// `CtKey` {one direction's 5-tuple, direction} -> `CtValue` {rewrite, backend, service, last seen, lifetime}: the
/// tc datapath's connection tracking, two entries per flow (forward and reply), four with SNAT. Written by the tc
/// programs; read by them and `lb_xdp`; the agent deletes entries of deleted services and expired ones (LRU
/// eviction bounds the rest).
///
/// `BPF_F_NO_COMMON_LRU`: one LRU list per CPU. With the shared list, every 64th insert on a CPU refills that CPU's
/// free list from the global one under a lock, shrinking other CPUs' lists on the way, which made one new flow in
/// 64 take 8-21 us (the SYN p99). Per-CPU lists cost no memory (the same preallocated elements, split evenly
/// between the possible CPUs) but capacity: an insert only evicts entries created on its own CPU, so each CPU holds
/// at most `max_entries / possible CPUs` (docs/datapath-notes.md, "Conntrack capacity").
#[btf_map]
pub static LB_CONNTRACK: LruHashMap<
    CtKey,
    CtValue,
    { DEFAULT_MAX_CONNTRACK as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// 0 -> `ConfigValue` {SNAT address per family, flags, host netns cookie}. Written by the agent at every sync; read
/// by the tc programs and (localhost:nodePort) the socket forward hooks.
#[btf_map]
pub static LB_CONFIG: Array<ConfigValue, 1> = Array::new();

/// LPM (16-byte address) -> `LOCAL_NET_POD` / `LOCAL_NET_NODE`: this node's pod CIDRs and addresses, whose packets
/// take the Internal frontends (kube-proxy's local-traffic detector). Written by the agent; read by tc ingress.
#[btf_map]
pub static LB_LOCAL_NETS: LpmTrie<[u8; 16], u8, { DEFAULT_MAX_LOCAL_NETS as usize }> =
    LpmTrie::new();

/// LPM `SrcRangeData` {service id, source prefix} -> 1: the allowed sources of services flagged
/// `SVC_FLAG_SOURCE_RANGES`. Written by the agent; read by tc ingress (rule 9).
#[btf_map]
pub static LB_SRC_RANGES: LpmTrie<SrcRangeData, u8, { DEFAULT_MAX_SRC_RANGES as usize }> =
    LpmTrie::new();

/// VIP (16-byte address) -> `VIP_FLAG_*`: every ClusterIP, so a packet to one on an undefined port rejects
/// (rule 8). Written by the agent; read by tc ingress.
#[btf_map]
pub static LB_VIPS: HashMap<[u8; 16], u8, { DEFAULT_MAX_VIPS as usize }> = HashMap::new();

/// LPM (16-byte address) -> `SVC_CIDR`: the cluster's service CIDRs (ServiceCIDR objects, or the agent's
/// `--service-cidrs`), so a destination inside one that is no ClusterIP drops (rule 8, unallocated ClusterIP).
/// Written by the agent; read by tc ingress and the socket forward hooks.
#[btf_map]
pub static LB_SVC_CIDRS: LpmTrie<[u8; 16], u8, { DEFAULT_MAX_SVC_CIDRS as usize }> = LpmTrie::new();

/// Network namespace cookie -> `NetnsAddrs`: the addresses a socket created in that namespace sends from, for the
/// socket LB's source range check (rule 9). Written by the agent; read by the socket forward hooks.
#[btf_map]
pub static LB_NETNS_ADDRS: HashMap<u64, NetnsAddrs, { DEFAULT_MAX_NETNS_ADDRS as usize }> =
    HashMap::new();

/// `reason::*` -> packets, per CPU: why the tc programs dropped, rejected or passed a packet, and how they
/// forwarded it. Written by the programs; read by the CLI and `lb-agent trace`.
#[btf_map]
pub static LB_DROP_STATS: PerCpuArray<u64, { reason::COUNT as usize }> = PerCpuArray::new();

/// `reason::*` -> refused `connect()` / `sendmsg()` calls, per CPU: why the socket LB failed a syscall
/// (`unallocated-cluster-ip` and `source-range` with EPERM; `unknown-port`, `no-endpoints` with ECONNREFUSED;
/// `no-local-endpoint` with EPERM). Counted on the refusal paths only: a translated connect costs nothing more.
/// Written by the socket forward hooks; read by the CLI and the metrics.
#[btf_map]
pub static LB_SOCK_STATS: PerCpuArray<u64, { reason::COUNT as usize }> = PerCpuArray::new();

/// 0 -> `TraceValue`: the last verdict, recorded only when `LB_CONFIG` has `CONFIG_FLAG_TRACE` (the private
/// maps of `lb-agent trace`). Written by the tc programs; read by `lb-agent trace`.
#[btf_map]
pub static LB_TRACE: Array<TraceValue, 1> = Array::new();

/// `FragKey` {source, destination, identification, protocol, hook} -> `FragValue` {rewritten addresses, service,
/// backend, created}: fragmented datagrams whose first fragment a tc program translated, so their later fragments
/// (no L4 header, no ports) get the same addresses. Written by the tc programs on a translated first fragment
/// (removed on an untranslated one); read by them on later fragments; entries die `FRAG_LIFETIME_S` after the first
/// fragment (checked on lookup) or by LRU eviction. The agent only pins it.
#[btf_map]
pub static LB_FRAGMENTS: LruHashMap<FragKey, FragValue, { DEFAULT_MAX_FRAGMENTS as usize }> =
    LruHashMap::new();

/// `CtKey` (the egress-direction key of a flow's SNAT entry, client -> backend leg, or of its reply entry, backend
/// -> client leg) -> `XdpL2Value` {egress interface, MACs, learned at}: the Ethernet header the leg's packets left
/// with. Written by tc egress (only with `CONFIG_FLAG_XDP`, only for SNATed flows); read by `lb_xdp`'s fast path.
/// LRU: an evicted entry only sends the flow's packets through tc until it is learned again.
#[btf_map]
pub static LB_XDP_L2: LruHashMap<CtKey, XdpL2Value, { (DEFAULT_MAX_CONNTRACK / 2) as usize }> =
    LruHashMap::new();

/// `lb-agent monitor`'s events (`MonitorEvent` records): new flows, drops, rejects. Written by every program, on
/// its event paths only, while `LB_MONITOR` says someone reads; read by the monitor.
#[btf_map]
pub static LB_EVENTS: RingBuf<MonitorEvent, { EVENTS_RING_BYTES as usize }> = RingBuf::new();

/// 0 -> `MonitorConfig` {lease, tick rate, rate limit, kinds}: whether events are emitted. Written by `lb-agent
/// monitor`; read by the programs on their event paths only.
#[btf_map]
pub static LB_MONITOR: Array<MonitorConfig, 1> = Array::new();

/// 0 -> `MonitorBucket`, per CPU: the token bucket of the events' rate limit, and the events it and a full ring
/// buffer suppressed. Written by the programs on their event paths; read by `lb-agent monitor`.
#[btf_map]
pub static LB_MONITOR_RATE: PerCpuArray<MonitorBucket, 1> = PerCpuArray::new();
