//! Connection tracking of the per-packet datapath (`LB_CONNTRACK`): directions, flags, lifetimes, key and value.

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
