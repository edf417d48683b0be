//! A new flow's conntrack entries (forward, reply, and for SNAT the SNAT pair with a claimed port), the removal of
//! a dead flow, and the rewrite of a packet by an entry (`rewrite::rewrite`), which also remembers a translated
//! first fragment for its datagram's later fragments.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value; by value, \
              Rust would copy them onto the stack first, which is what the scratch map exists to avoid"
)]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    helpers::bpf_ktime_get_ns,
    programs::TcContext,
};
use lb_common::{
    CONFIG_FLAG_XDP, CT_DIR_FWD, CT_DIR_REPLY, CT_FLAG_SNAT, CT_FLAG_SNAT_PAIR,
    CT_LIFETIME_OTHER_S, CT_LIFETIME_SYN_S, CtLifetimes, CtValue, FRAG_FLAG_COUNTED, PROTO_TCP,
    PROTO_UDP, VERDICT_FORWARD, XDP_L2_REFRESH_S, reason,
};

use super::fragment::frag_key;
use super::service::flow_hash;
use crate::ct::{self, inverse_key, packet_key};
use crate::maps::{LB_CONNTRACK, LB_FRAGMENTS, LB_XDP_L2};
use crate::packet::{FRAG_FIRST, FRAG_NONE, Packet};
use crate::rewrite::{self, Nat};
use crate::scratch::TcScratch;
use crate::stats;

/// SNAT ports tried when the client's own port is taken on the node address towards that backend.
const SNAT_TRIES: u32 = 8;
const SNAT_PORT_MIN: u32 = 32768;
const SNAT_PORT_RANGE: u32 = 28232;

/// Writes the new flow's conntrack entries (SNAT pair first, then reply, then forward) and translates the packet.
#[inline(never)]
pub(super) fn install(ctx: &TcContext, s: &mut TcScratch) -> u32 {
    let svc_id = s.svc.service_id;
    s.snat_addr = if s.pkt.is_v4() {
        s.cfg.snat_v4
    } else {
        s.cfg.snat_v6
    };
    // The reply entry (as the backend sends it to the client): source back to the VIP, destination the client.
    // The SNAT reply entry has the same value with `CT_FLAG_SNAT_PAIR` (set and cleared around its insert).
    ct_entry(
        &mut s.rev,
        initial_lifetime(&s.pkt, &s.cfg.ct_lifetimes),
        s.svc.service_id,
        s.backend_id,
        s.snat,
    );
    s.rev.new_saddr = s.pkt.daddr;
    s.rev.new_sport = s.pkt.dport;
    s.rev.new_daddr = s.pkt.saddr;
    s.rev.new_dport = s.pkt.sport;
    if s.snat != 0 {
        let why = install_snat(s);
        if why != reason::NONE {
            s.out.drop(why, svc_id);
            return s.out.reason;
        }
    }
    // The forward entry: the client's packets go to the backend.
    ct_entry(
        &mut s.ct,
        initial_lifetime(&s.pkt, &s.cfg.ct_lifetimes),
        s.svc.service_id,
        s.backend_id,
        s.snat,
    );
    s.ct.new_saddr = s.pkt.saddr;
    s.ct.new_sport = s.pkt.sport;
    s.ct.new_daddr = s.backend.addr;
    s.ct.new_dport = s.backend.port;
    inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
    packet_key(&mut s.key, &s.pkt, CT_DIR_FWD);
    if LB_CONNTRACK.insert(&s.other, &s.rev, 0).is_err()
        || LB_CONNTRACK.insert(&s.key, &s.ct, 0).is_err()
    {
        s.out.drop(reason::CT_FULL, svc_id);
        return s.out.reason;
    }
    stats::count_packet(svc_id, s.backend_id, ctx.len());
    dst_nat(&mut s.nat, &s.pkt, &s.ct);
    let _ = apply(ctx, s, reason::NEW_FLOW);
    s.out.reason
}

/// The fields every entry of a new flow shares (addresses and ports are the caller's).
#[inline(always)]
fn ct_entry(ct: &mut CtValue, lifetime: u32, service_id: u32, backend_id: u32, snat: u32) {
    ct.last_seen_jiffies = ct::now();
    ct.backend_id = backend_id;
    ct.service_id = service_id;
    ct.lifetime_s = lifetime;
    ct.flags = if snat != 0 { CT_FLAG_SNAT } else { 0 };
    ct._pad = [0; 7];
}

/// The SNAT half of a new flow: claims a port on the node address (writing the SNAT reply entry, `s.rev`) and
/// writes the SNAT entry. Returns the drop reason on failure, `reason::NONE` on success.
#[inline(always)]
fn install_snat(s: &mut TcScratch) -> u32 {
    if s.snat_addr == [0; 16] {
        return reason::NO_SNAT;
    }
    let port = claim_snat_port(s);
    if port == 0 {
        return reason::NO_SNAT;
    }
    // The SNAT entry, keyed by the DNATed packet at egress: its source becomes (node address, port).
    let k = &mut s.key;
    k.saddr = s.pkt.saddr;
    k.daddr = s.backend.addr;
    k.sport = s.pkt.sport;
    k.dport = s.backend.port;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_REPLY;
    k._pad = [0; 2];
    ct_entry(
        &mut s.ct,
        initial_lifetime(&s.pkt, &s.cfg.ct_lifetimes),
        s.svc.service_id,
        s.backend_id,
        s.snat,
    );
    s.ct.flags |= CT_FLAG_SNAT_PAIR;
    s.ct.new_saddr = s.snat_addr;
    s.ct.new_sport = port;
    s.ct.new_daddr = s.backend.addr;
    s.ct.new_dport = s.backend.port;
    if LB_CONNTRACK.insert(&s.key, &s.ct, 0).is_err() {
        return reason::CT_FULL;
    }
    reason::NONE
}

/// Picks the SNAT port: the client's own if free on (node address, backend), else a few hashed ones. The SNAT reply
/// entry (`s.rev`) is inserted here with `BPF_NOEXIST`, which is what claims the port. Ports of the node's own
/// sockets are not checked (as with any SNAT sharing the node address; the agent's connections to backends are
/// rare). Returns the port, or 0 when none was free.
#[inline(never)]
fn claim_snat_port(s: &mut TcScratch) -> u16 {
    // Hashed from the packet's own fields: a copy into a key first made LLVM keep all 32 address bytes in registers
    // and spill them (kernel 6.18 limits the whole call chain's stack to 512 bytes).
    let base = flow_hash(&s.pkt);
    let k = &mut s.other;
    k.saddr = s.backend.addr;
    k.daddr = s.snat_addr;
    k.sport = s.backend.port;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_FWD;
    k._pad = [0; 2];
    // The SNAT reply entry is the reply entry's value as one of the SNAT pair; `install` writes the reply entry
    // next, without the flag.
    s.rev.flags |= CT_FLAG_SNAT_PAIR;
    let port = claim_snat_port_loop(s, base);
    s.rev.flags &= !CT_FLAG_SNAT_PAIR;
    port
}

/// `claim_snat_port`'s tries. A port whose tuple another flow's forward entry holds (it shares the key direction)
/// is taken too: `BPF_NOEXIST` refuses it, and it is not this client's.
#[inline(always)]
fn claim_snat_port_loop(s: &mut TcScratch, base: u32) -> u16 {
    let mut i = 0;
    while i < SNAT_TRIES {
        let port = if i == 0 {
            s.pkt.sport
        } else {
            (SNAT_PORT_MIN + base.wrapping_add(i.wrapping_mul(7919)) % SNAT_PORT_RANGE) as u16
        };
        s.other.dport = port;
        if LB_CONNTRACK
            .insert(&s.other, &s.rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return port;
        }
        // Taken: by this very client (its other entries expired or were evicted first), reuse it.
        if let Some(existing) = LB_CONNTRACK.get_ptr(&s.other) {
            // SAFETY: read at once, from a successful lookup.
            let same = unsafe {
                (*existing).flags & CT_FLAG_SNAT_PAIR != 0
                    && (*existing).new_daddr == s.rev.new_daddr
                    && (*existing).new_dport == s.rev.new_dport
            };
            if same {
                let _ = LB_CONNTRACK.insert(&s.other, &s.rev, 0);
                return port;
            }
        }
        i += 1;
    }
    0
}

/// Removes a dead flow's entries: forward (in `s.key`), reply, and the SNAT pair. `s.ct` is the forward entry.
#[inline(always)]
pub(super) fn remove_flow(s: &mut TcScratch) {
    let _ = LB_CONNTRACK.remove(&s.key);
    inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
    let _ = LB_CONNTRACK.remove(&s.other);
    if s.ct.flags & CT_FLAG_SNAT != 0 {
        let k = &mut s.key;
        k.saddr = s.pkt.saddr;
        k.daddr = s.ct.new_daddr;
        k.sport = s.pkt.sport;
        k.dport = s.ct.new_dport;
        k.dir = CT_DIR_REPLY;
        if let Some(snat) = LB_CONNTRACK.get_ptr(&s.key) {
            // SAFETY: read at once, by value, from a successful lookup.
            let (snat_addr, snat_port) = unsafe { ((*snat).new_saddr, (*snat).new_sport) };
            let o = &mut s.other;
            o.saddr = s.ct.new_daddr;
            o.daddr = snat_addr;
            o.sport = s.ct.new_dport;
            o.dport = snat_port;
            o.dir = CT_DIR_FWD;
            let _ = LB_CONNTRACK.remove(&s.other);
        }
        let _ = LB_CONNTRACK.remove(&s.key);
    }
}

/// Source from the entry, destination as it is.
#[inline(always)]
pub(super) fn src_nat(nat: &mut Nat, p: &Packet, ct: &CtValue) {
    nat.saddr = ct.new_saddr;
    nat.sport = ct.new_sport;
    nat.daddr = p.daddr;
    nat.dport = p.dport;
}

/// Destination from the entry, source as it is.
#[inline(always)]
pub(super) fn dst_nat(nat: &mut Nat, p: &Packet, ct: &CtValue) {
    nat.saddr = p.saddr;
    nat.sport = p.sport;
    nat.daddr = ct.new_daddr;
    nat.dport = ct.new_dport;
}

/// Rewrites the packet by `s.nat` and reports it forwarded for `s.ct`'s flow (or dropped when the rewrite failed
/// half way). A first fragment's translation is remembered for the datagram's later fragments.
///
/// Not inlined: inlined into its six callers, the fragment bookkeeping's spills grew `ingress_packet`'s frame and
/// the chain lb_tc_ingress -> ingress_packet -> install -> claim_snat_port passed kernel 6.18's 512 bytes
/// ("combined stack size of 4 calls is 528. Too large").
#[inline(never)]
pub(super) fn apply(ctx: &TcContext, s: &mut TcScratch, why: u32) -> u32 {
    let first_fragment = s.pkt.frag == FRAG_FIRST;
    if first_fragment {
        // Keyed by the addresses as the later fragments will carry them, so before the rewrite changes `s.pkt`.
        frag_key(&mut s.fkey, &s.pkt, s.hook);
    }
    if rewrite::rewrite(ctx, &mut s.pkt, &s.nat) != 0 {
        s.out.drop(reason::MALFORMED, s.ct.service_id);
        return s.out.reason;
    }
    s.out.set(VERDICT_FORWARD, why, s.ct.service_id, TC_ACT_OK);
    s.out.backend_id = s.ct.backend_id;
    s.out.snat = u32::from(s.ct.flags & CT_FLAG_SNAT != 0);
    if first_fragment {
        let counted = why == reason::NEW_FLOW || why == reason::CONNTRACK;
        let f = &mut s.fval;
        // SAFETY: no argument, no precondition.
        f.created_ns = unsafe { bpf_ktime_get_ns() };
        f.new_saddr = s.nat.saddr;
        f.new_daddr = s.nat.daddr;
        f.service_id = s.ct.service_id;
        f.backend_id = s.ct.backend_id;
        f.flags = (s.ct.flags & CT_FLAG_SNAT) | if counted { FRAG_FLAG_COUNTED } else { 0 };
        f._pad = [0; 7];
        // A full map evicts its oldest entry (LRU); a failure only leaves the later fragments untranslated.
        let _ = LB_FRAGMENTS.insert(&s.fkey, &s.fval, 0);
    }
    s.out.reason
}

/// With the XDP fast path on (`CONFIG_FLAG_XDP`): records the Ethernet header and interface a translated packet of
/// an SNATed flow leaves with, under the conntrack key just used (`s.key`, egress direction: the SNAT or the reply
/// entry's), for `lb_xdp` (see xdp.rs, "Learned L2"). An unchanged entry is rewritten only once
/// `XDP_L2_REFRESH_S` old.
/// Returns 0.
#[inline(never)]
pub(super) fn learn_l2(ctx: &TcContext, s: &mut TcScratch) -> u32 {
    if s.cfg.flags & CONFIG_FLAG_XDP == 0
        || s.out.verdict != VERDICT_FORWARD
        || s.ct.flags & CT_FLAG_SNAT == 0
        || s.pkt.frag != FRAG_NONE
    {
        return 0;
    }
    let Ok(macs) = ctx.load::<[u8; 12]>(0) else {
        return 0;
    };
    // SAFETY: reads the context's own ifindex field (at egress: the device the packet leaves through).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let now = ct::now();
    let l = &mut s.l2;
    l.ifindex = ifindex;
    l.dmac = [macs[0], macs[1], macs[2], macs[3], macs[4], macs[5]];
    l.smac = [macs[6], macs[7], macs[8], macs[9], macs[10], macs[11]];
    if let Some(old) = LB_XDP_L2.get_ptr(&s.key) {
        // SAFETY: read at once, by value, from a successful lookup.
        let old = unsafe { old.read() };
        if old.ifindex == l.ifindex
            && old.dmac == l.dmac
            && old.smac == l.smac
            // Wrapping: an older build's nanosecond stamp (larger than any jiffies) reads as old, not as new.
            && now.wrapping_sub(old.learned_jiffies) < XDP_L2_REFRESH_S * ct::hz(&s.cfg)
        {
            return 0;
        }
    }
    l.learned_jiffies = now;
    let _ = LB_XDP_L2.insert(&s.key, &s.l2, 0);
    0
}

/// A new flow's lifetime: TCP's until the handshake completes, UDP's until the backend answers (`ct::touch`
/// lengthens both), other protocols' for good.
#[inline(always)]
fn initial_lifetime(p: &Packet, life: &CtLifetimes) -> u32 {
    match p.proto {
        PROTO_TCP => CT_LIFETIME_SYN_S,
        PROTO_UDP => life.udp(),
        _ => CT_LIFETIME_OTHER_S,
    }
}
