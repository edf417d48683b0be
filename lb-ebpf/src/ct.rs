//! Connection tracking shared by the tc programs and `lb_xdp` (`LB_CONNTRACK`; cilium's `conntrack.h` over
//! `conntrack_map.h`): keys, the lookup that treats an expired entry as a miss, and the refresh on a hit.
//!
//! Keys and values are lb-common's ([`CtKey`], [`CtValue`]); the map's contract (who writes, who reads) is in
//! `maps.rs`. **Invariant:** the entries of a flow come in pairs that share a lifetime, (forward, reply) and (SNAT,
//! SNAT reply): a hit refreshes its entry and, when the lifetime changes, its pair ([`touch`]). The entries one
//! hook looks up share a key direction (lb-common `conntrack.rs`), so a packet of an established flow costs one
//! lookup; `CT_FLAG_SNAT_PAIR` tells the roles apart.
//!
//! **Time** is `bpf_jiffies64()`: the verifier inlines it (a load of `jiffies_64`), where `bpf_ktime_get_ns` is a
//! helper call of ~30 ns, twice per packet (expiry check and refresh). Lifetimes are in seconds, so a tick (1 to
//! 10 ms) is precision enough; the tick rate comes from the agent (`ConfigValue::hz`).

use aya_ebpf::helpers::bpf_jiffies64;
use lb_common::{
    CT_DIR_FWD, CT_FLAG_CLOSING, CT_FLAG_ESTABLISHED, CT_FLAG_FIN, CT_FLAG_SNAT_PAIR,
    CT_LIFETIME_CLOSING_S, CT_LIFETIME_OTHER_S, ConfigValue, CtKey, CtLifetimes, CtValue,
    HZ_UNKNOWN_ASSUMED, PROTO_TCP, PROTO_UDP,
};

use crate::maps::{LB_CONFIG, LB_CONNTRACK};
use crate::packet::{Packet, TCP_FIN, TCP_RST, TCP_SYN};

pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Jiffies per second by the agent's configuration (`HZ_UNKNOWN_ASSUMED` when an older agent left it 0).
#[inline(always)]
pub fn hz(cfg: &ConfigValue) -> u64 {
    if cfg.hz == 0 {
        u64::from(HZ_UNKNOWN_ASSUMED)
    } else {
        u64::from(cfg.hz)
    }
}

/// Now, in jiffies.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no argument, no precondition.
    unsafe { bpf_jiffies64() }
}

/// The key of a packet's own tuple, in direction `dir`.
#[inline(always)]
pub fn set_key(
    k: &mut CtKey,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    dir: u8,
) {
    k.saddr = *saddr;
    k.daddr = *daddr;
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
    k.dir = dir;
    k._pad = [0; 2];
}

/// The key of the other direction an entry implies: a forward entry's reply (`dir` = `CT_DIR_REPLY`, the packet
/// the backend sends back) or a reply entry's forward key (`dir` = `CT_DIR_FWD`, the client's packet to the VIP).
/// Either way it is the entry's translated tuple, reversed.
#[inline(always)]
pub fn inverse_key(k: &mut CtKey, v: &CtValue, proto: u8, dir: u8) {
    k.saddr = v.new_daddr;
    k.daddr = v.new_saddr;
    k.sport = v.new_dport;
    k.dport = v.new_sport;
    k.proto = proto;
    k.dir = dir;
    k._pad = [0; 2];
}

/// A live (unexpired) entry: copied into `out`, and a pointer for updates. `hz`: see [`hz`].
#[inline(always)]
pub fn lookup(key: &CtKey, out: &mut CtValue, hz: u64) -> Option<*mut CtValue> {
    let ptr = LB_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: the pointer comes from a successful lookup and is read at once, by value. An LRU entry can be evicted
    // and reused concurrently; the worst outcome is one foreign entry, which the backend check catches for forward
    // entries.
    *out = unsafe { ptr.read() };
    // Saturating: a stamp in the future is an older build's nanoseconds (lb-common `ct_rekey_legacy`), alive
    // until this build's next refresh writes jiffies.
    if now().saturating_sub(out.last_seen_jiffies) > u64::from(out.lifetime_s) * hz {
        return None;
    }
    Some(ptr)
}

/// Refreshes an entry on a hit (`ptr`, copied in `ct`), and moves the flow's state, which sets the lifetime of the
/// entry and of its pair (keyed by `other`):
/// - TCP: the first packet without SYN makes it established (`CT_FLAG_ESTABLISHED`, the configured established
///   lifetime); a FIN makes it closing, with the close-wait lifetime while only one side has sent a FIN
///   (`CT_FLAG_FIN` on the entry of the direction that sent it) and `CT_LIFETIME_CLOSING_S` once the other has too;
///   a RST closes it at once. As netfilter's states under kube-proxy's timeouts, in fewer states.
/// - UDP: the first packet from the backend makes it a stream (the configured stream lifetime).
///
/// The configured lifetimes are read only on a change (`LB_CONFIG`, an array: the verifier inlines the lookup).
/// Not inlined: one copy instead of five keeps the callers' frames small (`lb_tc_ingress`'s chain through
/// `claim_snat_port` is at the verifier's 512-byte combined stack limit). Returns 0 (a scalar: kernel 6.18 rejects a
/// subprogram that leaves a stack pointer in r0).
#[inline(never)]
pub fn touch(ptr: *mut CtValue, ct: &CtValue, proto: u8, tcp_flags: u8, other: &CtKey) -> u32 {
    let now = now();
    let mut flags = ct.flags;
    let mut other_ptr = None;
    if proto == PROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            flags |= CT_FLAG_CLOSING;
        } else if tcp_flags & TCP_FIN != 0 {
            flags |= CT_FLAG_CLOSING | CT_FLAG_FIN;
            other_ptr = LB_CONNTRACK.get_ptr_mut(other);
        } else if flags & (CT_FLAG_CLOSING | CT_FLAG_ESTABLISHED) == 0 && tcp_flags & TCP_SYN == 0 {
            flags |= CT_FLAG_ESTABLISHED;
        }
    } else if proto == PROTO_UDP && flags & CT_FLAG_ESTABLISHED == 0 && from_backend(ct, other) {
        flags |= CT_FLAG_ESTABLISHED;
    }
    // SAFETY: `ptr` came from a lookup in this run; fields are written in place (a racing eviction can only make
    // the write land in a recycled entry, which its own next lookup re-validates).
    unsafe { (*ptr).last_seen_jiffies = now };
    if flags == ct.flags && tcp_flags & (TCP_FIN | TCP_RST) == 0 {
        return 0;
    }
    let lifetime = lifetime_of(flags, proto, tcp_flags, other_ptr);
    // Flags only gain bits, and a closing entry's lifetime only shortens: two packets of one flow run on two CPUs at
    // once (a client's ACK and its FIN right after it, say), each with its own copy of the entry, and the later
    // writer would otherwise put back the lifetime the other had just shortened (seen with real traffic: the SNAT
    // entry of a closed flow kept the established lifetime, and its SNAT port).
    // SAFETY: as above.
    unsafe { settle(ptr, flags, lifetime) };
    if other_ptr.is_none() {
        other_ptr = LB_CONNTRACK.get_ptr_mut(other);
    }
    if let Some(o) = other_ptr {
        // SAFETY: as above. The pair gets the state, not this direction's FIN.
        unsafe {
            settle(o, flags & !CT_FLAG_FIN, lifetime);
            (*o).last_seen_jiffies = now;
        }
    }
    0
}

/// The lifetime of a flow in state `flags` (see [`touch`]); `other`, for a FIN, the pair's entry.
#[inline(always)]
fn lifetime_of(flags: u8, proto: u8, tcp_flags: u8, other: Option<*mut CtValue>) -> u32 {
    let life = match LB_CONFIG.get(0) {
        Some(c) => c.ct_lifetimes,
        None => CtLifetimes::default(),
    };
    if proto != PROTO_TCP {
        return if proto == PROTO_UDP {
            life.udp_stream()
        } else {
            CT_LIFETIME_OTHER_S
        };
    }
    if flags & CT_FLAG_CLOSING == 0 {
        return life.tcp_established();
    }
    // SAFETY: a pointer from a lookup in this run, read by value.
    let both_fins = other.is_some_and(|o| unsafe { (*o).flags } & CT_FLAG_FIN != 0);
    if tcp_flags & TCP_RST != 0 || both_fins {
        CT_LIFETIME_CLOSING_S
    } else {
        life.tcp_close_wait()
    }
}

/// Writes a state into an entry under the rules of [`touch`].
///
/// # Safety
/// `e` is a pointer from a lookup in this run.
#[inline(always)]
unsafe fn settle(e: *mut CtValue, flags: u8, lifetime: u32) {
    // SAFETY: the caller's.
    unsafe {
        let live = (*e).flags;
        let closing = live & CT_FLAG_CLOSING != 0;
        if live | flags != live {
            (*e).flags = live | flags;
        }
        let now_closing = (live | flags) & CT_FLAG_CLOSING != 0;
        let write = if closing {
            lifetime < (*e).lifetime_s
        } else {
            now_closing || lifetime != (*e).lifetime_s
        };
        if write {
            (*e).lifetime_s = lifetime;
        }
    }
}

/// Whether the packet that hit `ct` comes from the backend: its entry is a reply (key direction `CT_DIR_REPLY`,
/// not of the SNAT pair) or the SNAT reply (`CT_DIR_FWD`, of the SNAT pair). The pair's key `other` has the
/// entry's opposite direction.
#[inline(always)]
fn from_backend(ct: &CtValue, other: &CtKey) -> bool {
    (other.dir == CT_DIR_FWD) != (ct.flags & CT_FLAG_SNAT_PAIR != 0)
}

/// The key of a parsed tc packet's own tuple, in direction `dir`.
#[inline(always)]
pub fn packet_key(k: &mut CtKey, p: &Packet, dir: u8) {
    set_key(k, &p.saddr, &p.daddr, p.sport, p.dport, p.proto, dir);
}
