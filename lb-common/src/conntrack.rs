//! Connection tracking of the per-packet datapath (`LB_CONNTRACK`): directions, flags, lifetimes, key and value.
//!
//! A flow has up to four entries, one per (direction, hook), but only two key directions: the entries a hook looks
//! up share one, so every packet of an established flow costs one hash lookup whatever its role (cilium's
//! `CT_INGRESS`/`CT_EGRESS` tuples do the same). The role of an entry is its key direction plus
//! [`CT_FLAG_SNAT_PAIR`]; [`ct_role`] names it. Two entries of different roles cannot share a key (a tuple would
//! have to be a client's and a backend's at once, on the same ports), and the SNAT port claim (`BPF_NOEXIST`)
//! skips a port whose tuple another entry holds.

/// `LB_CONNTRACK` key direction of the entries tc ingress looks up: the client's tuple (forward: destination to
/// the backend) and, with `CT_FLAG_SNAT_PAIR`, a backend's reply to the SNAT address and port (destination back to
/// the client).
pub const CT_DIR_FWD: u8 = 0;
/// `LB_CONNTRACK` key direction of the entries tc egress looks up: a reply as the backend sends it to the client
/// (source back to the VIP; tc ingress also follows it for a client on this node) and, with `CT_FLAG_SNAT_PAIR`, a
/// forward packet after DNAT leaving towards a remote backend (source to the node's SNAT address and port).
pub const CT_DIR_REPLY: u8 = 1;
/// Legacy key directions (layouts before the shared directions): the SNAT entry and the SNAT reply entry. No
/// program writes them; the agent rekeys such entries when it adopts an older map (`ct_rekey_legacy`).
pub const CT_DIR_SNAT: u8 = 2;
pub const CT_DIR_SNAT_REPLY: u8 = 3;

/// `CtValue.flags`: the flow was SNATed to the node address (its reply comes back to the node).
pub const CT_FLAG_SNAT: u8 = 1;
/// `CtValue.flags`: a TCP FIN or RST was seen; from then on the entry lives the close-wait lifetime while only
/// one side has sent a FIN, `CT_LIFETIME_CLOSING_S` once both have or after a RST, and never longer again.
pub const CT_FLAG_CLOSING: u8 = 2;
/// `CtValue.flags`: the entry is one of the SNAT pair (key direction `CT_DIR_FWD`: the SNAT reply entry;
/// `CT_DIR_REPLY`: the SNAT entry).
pub const CT_FLAG_SNAT_PAIR: u8 = 4;
/// `CtValue.flags`: this entry's direction sent a FIN (set on the entry the FIN matched, not on its pair): a FIN
/// from the other direction then finds the flow closed both ways.
pub const CT_FLAG_FIN: u8 = 8;
/// `CtValue.flags`: TCP past its handshake (a packet without SYN seen), UDP answered (a packet from the backend
/// seen); set on both entries of a pair with the established (or UDP stream) lifetime. `lb_xdp` takes a TCP flow
/// only with it.
pub const CT_FLAG_ESTABLISHED: u8 = 16;

/// The role of an entry, by its key direction and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtRole {
    /// Client -> VIP at ingress.
    Forward,
    /// Backend -> client at egress (or ingress, for a client on this node).
    Reply,
    /// Client -> backend at egress, source to the SNAT address.
    Snat,
    /// Backend -> SNAT address at ingress, destination back to the client.
    SnatReply,
}

/// The role of the entry `(k, v)`; legacy directions included.
pub fn ct_role(k: &CtKey, v: &CtValue) -> CtRole {
    let pair = v.flags & CT_FLAG_SNAT_PAIR != 0;
    match (k.dir, pair) {
        (CT_DIR_SNAT, _) | (CT_DIR_REPLY, true) => CtRole::Snat,
        (CT_DIR_SNAT_REPLY, _) | (CT_DIR_FWD, true) => CtRole::SnatReply,
        (CT_DIR_REPLY, false) => CtRole::Reply,
        _ => CtRole::Forward,
    }
}

/// An entry of an older layout in this one's form, or `None` when it already is: legacy SNAT directions get the
/// shared direction and `CT_FLAG_SNAT_PAIR`, and a `bpf_ktime_get_ns()` timestamp (any value past `now_jiffies`:
/// nanoseconds since boot outgrow jiffies within seconds of boot) becomes `now_jiffies`, so the entry lives its
/// whole lifetime from the migration on rather than expiring at once or never.
pub fn ct_rekey_legacy(k: &CtKey, v: &CtValue, now_jiffies: u64) -> Option<(CtKey, CtValue)> {
    let (mut k2, mut v2) = (*k, *v);
    match k.dir {
        CT_DIR_SNAT => {
            k2.dir = CT_DIR_REPLY;
            v2.flags |= CT_FLAG_SNAT_PAIR;
        }
        CT_DIR_SNAT_REPLY => {
            k2.dir = CT_DIR_FWD;
            v2.flags |= CT_FLAG_SNAT_PAIR;
        }
        _ => {}
    }
    if v2.last_seen_jiffies > now_jiffies {
        v2.last_seen_jiffies = now_jiffies;
    }
    (k2 != *k || v2 != *v).then_some((k2, v2))
}

/// Conntrack lifetimes in seconds. An entry carries its own (`CtValue::lifetime_s`), checked by the programs on
/// lookup (an expired entry is a miss) and by the agent's garbage collector; the programs set it when a flow starts
/// and when its state changes, from `ConfigValue::ct_lifetimes` where kube-proxy has a setting, whose defaults
/// (below) are the ones a kube-proxy node has: established TCP 24 h (`--conntrack-tcp-timeout-established`), TCP
/// with a FIN from one side only 1 h (`--conntrack-tcp-timeout-close-wait`), UDP not yet answered 30 s and answered
/// 120 s (`--conntrack-udp-timeout`, `--conntrack-udp-timeout-stream`: netfilter's own defaults, which kube-proxy
/// leaves unless told).
pub const CT_LIFETIME_TCP_S: u32 = 86400;
pub const CT_LIFETIME_CLOSE_WAIT_S: u32 = 3600;
pub const CT_LIFETIME_UDP_S: u32 = 30;
pub const CT_LIFETIME_UDP_STREAM_S: u32 = 120;
/// Fixed lifetimes: TCP closed both ways or reset, a TCP flow that has seen only its SYN, protocols other than TCP
/// and UDP (SCTP).
pub const CT_LIFETIME_CLOSING_S: u32 = 10;
pub const CT_LIFETIME_SYN_S: u32 = 60;
pub const CT_LIFETIME_OTHER_S: u32 = 60;

/// The configurable conntrack lifetimes (seconds), in `ConfigValue`; 0 is the default (`CT_LIFETIME_*`), so a
/// zeroed configuration, or an older agent's, gives a kube-proxy node's values.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtLifetimes {
    pub tcp_established_s: u32,
    pub tcp_close_wait_s: u32,
    pub udp_s: u32,
    pub udp_stream_s: u32,
}

impl CtLifetimes {
    #[inline(always)]
    pub const fn tcp_established(&self) -> u32 {
        or_default(self.tcp_established_s, CT_LIFETIME_TCP_S)
    }

    #[inline(always)]
    pub const fn tcp_close_wait(&self) -> u32 {
        or_default(self.tcp_close_wait_s, CT_LIFETIME_CLOSE_WAIT_S)
    }

    #[inline(always)]
    pub const fn udp(&self) -> u32 {
        or_default(self.udp_s, CT_LIFETIME_UDP_S)
    }

    #[inline(always)]
    pub const fn udp_stream(&self) -> u32 {
        or_default(self.udp_stream_s, CT_LIFETIME_UDP_STREAM_S)
    }
}

#[inline(always)]
const fn or_default(v: u32, default: u32) -> u32 {
    if v == 0 { default } else { v }
}

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
    /// `CT_DIR_FWD` (looked up at ingress) or `CT_DIR_REPLY` (egress).
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// `LB_CONNTRACK` value: how to rewrite a packet of this direction, and the entry's life.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtValue {
    /// `bpf_jiffies64()` of the last packet; the entry is expired once older than `lifetime_s` (times
    /// `ConfigValue::hz`). Layouts before this one held `bpf_ktime_get_ns()` here (see `ct_rekey_legacy`).
    pub last_seen_jiffies: u64,
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
