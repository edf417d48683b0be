//! Protocol numbers, scopes, algorithms, service and backend flags, and default map capacities.

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
/// drop rather than reject (docs/semantics.md rule 8).
pub const SVC_FLAG_DROP_NO_BACKEND: u8 = 1;

/// Service flag: the frontend has `loadBalancerSourceRanges`; sources outside `LB_SRC_RANGES` for its id drop
/// (docs/semantics.md rule 9). Set on LoadBalancer frontends of both scopes: tc checks the packet's source, the socket
/// LB the address of the socket's namespace (`LB_NETNS_ADDRS`).
pub const SVC_FLAG_SOURCE_RANGES: u8 = 2;

/// Backend flag: the endpoint runs on this node (its `nodeName` is this node's name). A remote backend reached from
/// outside the node needs SNAT (docs/semantics.md rule 6).
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
/// Network namespaces whose addresses the socket LB knows (`LB_NETNS_ADDRS`): this node's pods and the host, and
/// whatever else is pinned under /run/netns.
pub const DEFAULT_MAX_NETNS_ADDRS: u32 = 8192;
/// Fragmented datagrams in flight whose first fragment was translated (`LB_FRAGMENTS`, LRU).
pub const DEFAULT_MAX_FRAGMENTS: u32 = 8192;

/// `BPF_F_INNER_MAP`: lets inner arrays of one map-of-maps differ in `max_entries`, so the slot array (`LB_MAGLEV`'s
/// inner array) can grow without reloading the programs. Inner maps must carry the same flags as the template.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: an array the agent maps into its memory and writes tables into with plain stores.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_PREALLOC`: required for hash-of-maps updates to be atomic with respect to readers.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_NO_COMMON_LRU`: an LRU hash with one LRU list per CPU instead of one shared list (see `LB_CONNTRACK`).
pub const BPF_F_NO_COMMON_LRU: u32 = 2;
