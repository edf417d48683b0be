//! Node-wide settings of the datapath (`LB_CONFIG`) and the L2 headers XDP learns from tc (`LB_XDP_L2`).

use crate::conntrack::CtLifetimes;

/// `LB_CONFIG` value (array of one): node-wide settings of the per-packet datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConfigValue {
    /// SNAT addresses per family (rule 6), network byte order; all zero = none (then remote backends drop).
    pub snat_v4: [u8; 16],
    pub snat_v6: [u8; 16],
    /// `CONFIG_FLAG_*`.
    pub flags: u32,
    /// The kernel's tick rate (`CONFIG_HZ`), which the programs need to compare `bpf_jiffies64()` timestamps
    /// (conntrack, learned L2 headers) with lifetimes in seconds: `bpf_jiffies64` is inlined by the verifier, where
    /// `bpf_ktime_get_ns` costs a helper call (~30 ns) on every packet. The agent reads it from the resolution of
    /// `CLOCK_MONOTONIC_COARSE` (one tick). 0 (an older agent's padding) makes the programs assume 1000, the
    /// highest tick rate, so nothing expires early.
    pub hz: u32,
    /// The network namespace cookie of the node's own namespace (the agent's; `hostNetwork` in a cluster): the
    /// socket LB serves `localhost:nodePort` only to sockets of this namespace (rule 14).
    pub host_netns_cookie: u64,
    /// Conntrack lifetimes from the agent's kube-proxy-compatible flags (0: the default of each).
    pub ct_lifetimes: CtLifetimes,
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

/// `ConfigValue.flags`: another proxy also runs on the node (kube-proxy, during a migration or a rollback), so tc
/// ingress leaves a TCP packet to a frontend alone when it is not a SYN and lb tracks no flow for it: such a packet
/// belongs to a connection netfilter translated before lb started, and only netfilter's conntrack knows its backend.
/// New connections (their SYN) are still balanced by lb. UDP has no such marker: a datagram lb does not track starts
/// a new lb flow.
pub const CONFIG_FLAG_PASS_UNTRACKED_TCP: u32 = 8;

/// How long (seconds) a learned L2 header (`LB_XDP_L2`) may be used by XDP after tc egress recorded it. Past
/// that, XDP passes the flow's next packet to tc, whose egress records the header again: a changed neighbour (new
/// MAC, new route) is picked up within this time.
pub const XDP_L2_FRESH_S: u64 = 10;
/// tc egress rewrites an unchanged `LB_XDP_L2` entry only when it is older than this (seconds), so a slow-path flow
/// costs one map update per second rather than one per packet.
pub const XDP_L2_REFRESH_S: u64 = 1;

/// The tick rate the programs use for `ConfigValue::hz` 0.
pub const HZ_UNKNOWN_ASSUMED: u32 = 1000;

/// `LB_XDP_L2` value: the Ethernet header and interface a SNATed flow's packets left with, as tc egress saw them
/// (the neighbour subsystem filled it in). Key: the `CtKey` tc egress used for the packet (`CT_DIR_REPLY`): the
/// SNAT entry's key for the client -> backend leg, the reply entry's for the backend -> client leg.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct XdpL2Value {
    /// `bpf_jiffies64()` when tc egress recorded it; XDP uses it for `XDP_L2_FRESH_S`. An entry written by an older
    /// build holds `bpf_ktime_get_ns()`, a larger number than any jiffies value: the programs compare with wrapping
    /// arithmetic, so such an entry reads as stale and is learned again (never as fresh forever).
    pub learned_jiffies: u64,
    /// The egress interface's index.
    pub ifindex: u32,
    /// Destination and source MAC, as on the wire.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}
