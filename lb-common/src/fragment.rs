//! IP fragments whose first fragment was translated (`LB_FRAGMENTS`).

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
