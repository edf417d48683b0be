//! The per-packet datapath on the node's external interfaces, one core per direction (cilium `bpf/lib/lb.h` and
//! `nodeport.h`; katran `balancer.bpf.c`'s `process_packet` for the shape): each step is "done, or continue".
//!
//! [`ingress`]: parse -> conntrack (a reply to an SNAT address: destination back to the client; an established
//! flow: follow its entry, rule 12) -> service lookup (Internal frontend for this node's own pods and addresses,
//! kube-proxy's local-traffic detector; External otherwise; source ranges before that, rule 9) -> reject / drop
//! (rules 5, 8) -> backend (affinity, then Maglev over a node-independent hash of the 5-tuple, or random) ->
//! conntrack entries -> DNAT. The packet then goes on through the stack, routed to the backend.
//!
//! [`egress`]: a DNATed packet leaving towards a remote backend for an outside client gets the node's SNAT address
//! (rule 6); a reply leaving towards the client gets the VIP back as source.
//!
//! NAT is split as iptables splits it (DNAT at PREROUTING, SNAT at POSTROUTING) for a reason: the stack drops a
//! packet arriving with one of its own addresses as source (a martian), so the source may only become the node
//! address (SNAT) or the VIP (which may be the node's own NodePort address) once the packet is routed and leaving.
//! Conntrack holds up to four entries per flow, one per (direction, hook), in two key directions so that each hook
//! needs one lookup: `CT_DIR_FWD` for ingress (client -> VIP; with `CT_FLAG_SNAT_PAIR` backend -> node address),
//! `CT_DIR_REPLY` for egress (backend -> client; with `CT_FLAG_SNAT_PAIR` client -> backend).
//!
//! Fragments: a first fragment is handled by its ports like any packet; when it is translated, `LB_FRAGMENTS`
//! remembers the rewritten addresses under (source, destination, identification, protocol, hook), and the later
//! fragments of that datagram (no L4 header, no ports) get the same addresses ([`fragment::follow`]). A later
//! fragment without an entry (its first fragment was not seen here, arrives after it, or was not a service's)
//! passes untouched, as before; an untranslated first fragment removes a stale entry of its key.
//!
//! Files by concern: this one holds the two cores and the conntrack steps, [`service`] the choice of service and
//! backend for a new flow, [`nat`] the conntrack entries of a new flow and the rewrite, [`fragment`] the later
//! fragments, [`verdict`] the outcome (counters, trace record, rejects). Per-packet state lives in
//! `scratch::TcScratch` (see `scratch.rs` for why).

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value; by value, \
              Rust would copy them onto the stack first, which is what the scratch map exists to avoid"
)]

mod fragment;
mod nat;
mod service;
mod verdict;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use lb_common::{
    CT_DIR_FWD, CT_DIR_REPLY, CT_FLAG_CLOSING, CT_FLAG_SNAT, CT_FLAG_SNAT_PAIR, ConfigValue,
    CtValue, FRAG_HOOK_EGRESS, FRAG_HOOK_INGRESS, PROTO_TCP, reason,
};

use crate::ct::{self, inverse_key, packet_key};
use crate::maps::LB_CONFIG;
use crate::packet::{
    self, FRAGMENT, MALFORMED, NEEDS_PULL, OTHER, PARSED, Packet, TCP_ACK, TCP_SYN,
};
use crate::scratch::{self, SCRATCH_EGRESS, SCRATCH_INGRESS, TcScratch};
use crate::stats;

/// tc ingress on an external interface. Returns the tc verdict.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(s) = scratch::tc(SCRATCH_INGRESS) else {
        return TC_ACT_UNSPEC;
    };
    config(&mut s.cfg);
    s.out.pass(reason::NONE);
    s.hook = FRAG_HOOK_INGRESS;
    match parse(ctx, &mut s.pkt) {
        PARSED => {
            // The step's result is in `s.out`; the returned reason only keeps r0 a scalar (see `ingress_packet`).
            let _ = ingress_packet(ctx, s);
            fragment::forget(s);
        }
        OTHER => {}
        FRAGMENT => {
            let _ = fragment::follow(ctx, s);
        }
        _ => s.out.reason = reason::MALFORMED,
    }
    verdict::finish(ctx, s)
}

/// tc egress on an external interface. Returns the tc verdict.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(s) = scratch::tc(SCRATCH_EGRESS) else {
        return TC_ACT_UNSPEC;
    };
    config(&mut s.cfg);
    s.out.pass(reason::NONE);
    s.hook = FRAG_HOOK_EGRESS;
    match parse(ctx, &mut s.pkt) {
        PARSED => {
            let _ = egress_packet(ctx, s);
            fragment::forget(s);
        }
        FRAGMENT => {
            let _ = fragment::follow(ctx, s);
        }
        _ => {}
    }
    verdict::finish(ctx, s)
}

/// `packet::parse`, pulling the headers into the linear area once when they are not all there (a non-linear skb:
/// header-split drivers, some tunnels). Inlined into the entry point (see `packet.rs`).
#[inline(always)]
fn parse(ctx: &TcContext, p: &mut Packet) -> u32 {
    let r = packet::parse(ctx, p);
    if r != NEEDS_PULL {
        return r;
    }
    // Some room past what the parser asked for, so a second shortfall further in (the L4 header after a long
    // IPv6 extension chain) is unlikely; never more than the packet.
    let want = p.pull_len.max(PULL_MIN).min(ctx.len());
    if ctx.pull_data(want).is_err() {
        return MALFORMED;
    }
    match packet::parse(ctx, p) {
        NEEDS_PULL => MALFORMED,
        r => r,
    }
}

/// Bytes made linear when the headers are not (Ethernet + IPv6 + a few extension headers + TCP with options).
const PULL_MIN: u32 = 128;

// Every `#[inline(never)]` step below writes its result into `s.out` and returns `s.out.reason`: kernel 6.18
// rejects a subprogram that exits with a stack pointer in r0 ("cannot return stack pointer to the caller"), which
// LLVM leaves there for functions returning `()` or a struct through a pointer.

/// Egress: the SNAT of a flow to a remote backend, or the reply of a local backend getting the VIP back. Both
/// entries share the egress key direction: one lookup.
#[inline(never)]
fn egress_packet(ctx: &TcContext, s: &mut TcScratch) -> u32 {
    packet_key(&mut s.key, &s.pkt, CT_DIR_REPLY);
    let Some(ptr) = ct::lookup(&s.key, &mut s.ct, ct::hz(&s.cfg)) else {
        return s.out.reason;
    };
    // The other entry of the pair is the entry's translated tuple reversed, in the ingress direction either way:
    // the SNAT reply entry of a SNAT entry, the forward entry of a reply entry. The SNAT pair shares its lifetime
    // like the other pair: the SNAT reply entry sees only the backend's packets, and a connection whose backend has
    // sent nothing since its SYN-ACK would otherwise lose it after the SYN lifetime (60 s), so the backend's first
    // word after a longer idle time would not come back.
    if ct::needs_touch(&s.ct, s.pkt.proto, s.pkt.tcp_flags) {
        inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_FWD);
        let _ = ct::touch(ptr, &s.ct, s.pkt.proto, s.pkt.tcp_flags, &s.other);
    }
    // Source only: for a SNAT entry the destination is already the backend, for a reply the client.
    nat::src_nat(&mut s.nat, &s.pkt, &s.ct);
    let why = if s.ct.flags & CT_FLAG_SNAT_PAIR != 0 {
        reason::CONNTRACK
    } else {
        reason::REPLY
    };
    let _ = nat::apply(ctx, s, why);
    let _ = nat::learn_l2(ctx, s);
    s.out.reason
}

/// Ingress, in order: an entry in the ingress direction (an established flow, or a reply to the SNAT address: one
/// lookup either way), a reply to a client on this node, and otherwise a new flow ([`choose`] then [`install`]).
#[inline(never)]
fn ingress_packet(ctx: &TcContext, s: &mut TcScratch) -> u32 {
    let hz = ct::hz(&s.cfg);
    packet_key(&mut s.key, &s.pkt, CT_DIR_FWD);
    if let Some(ptr) = ct::lookup(&s.key, &mut s.ct, hz) {
        if s.ct.flags & CT_FLAG_SNAT_PAIR != 0 {
            // A reply to this node's SNAT address: destination back to the client; the source becomes the VIP at
            // egress.
            if ct::needs_touch(&s.ct, s.pkt.proto, s.pkt.tcp_flags) {
                let _ = snat_pair_key(s);
                let _ = ct::touch(ptr, &s.ct, s.pkt.proto, s.pkt.tcp_flags, &s.other);
            }
            nat::dst_nat(&mut s.nat, &s.pkt, &s.ct);
            let _ = nat::apply(ctx, s, reason::REPLY);
            return s.out.reason;
        }
        // An established flow follows its entry, not the current table (rule 12), unless a new SYN reuses the
        // ports of a closing flow.
        let reopened = s.pkt.proto == PROTO_TCP
            && s.pkt.tcp_flags & TCP_SYN != 0
            && s.ct.flags & CT_FLAG_CLOSING != 0;
        if !reopened {
            return follow_established(ctx, s, ptr);
        }
    }
    // A reply for a client on this node (no SNAT): it will not leave through an external interface, so the
    // source becomes the VIP here. A bare SYN opens a connection and is no reply: new flows skip this lookup.
    let bare_syn = s.pkt.proto == PROTO_TCP && s.pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !bare_syn {
        packet_key(&mut s.key, &s.pkt, CT_DIR_REPLY);
        if let Some(ptr) = ct::lookup(&s.key, &mut s.ct, hz)
            && s.ct.flags & CT_FLAG_SNAT == 0
        {
            if ct::needs_touch(&s.ct, s.pkt.proto, s.pkt.tcp_flags) {
                inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_FWD);
                let _ = ct::touch(ptr, &s.ct, s.pkt.proto, s.pkt.tcp_flags, &s.other);
            }
            nat::src_nat(&mut s.nat, &s.pkt, &s.ct);
            let _ = nat::apply(ctx, s, reason::REPLY);
            return s.out.reason;
        }
    }
    if service::choose(ctx, s) != 0 {
        return nat::install(ctx, s);
    }
    s.out.reason
}

/// Rule 12: the entry's backend must still exist with the same address (ids are reused); otherwise the flow ends.
#[inline(never)]
fn follow_established(ctx: &TcContext, s: &mut TcScratch, ptr: *mut CtValue) -> u32 {
    if !ct::backend_alive(ptr, &s.ct, s.cfg.backend_epoch) {
        nat::remove_flow(s);
        if s.pkt.proto == PROTO_TCP {
            verdict::reject_packet(ctx, s, reason::BACKEND_GONE, s.ct.service_id);
        } else {
            s.out.drop(reason::BACKEND_GONE, s.ct.service_id);
        }
        return s.out.reason;
    }
    if ct::needs_touch(&s.ct, s.pkt.proto, s.pkt.tcp_flags) {
        inverse_key(&mut s.other, &s.ct, s.pkt.proto, CT_DIR_REPLY);
        let _ = ct::touch(ptr, &s.ct, s.pkt.proto, s.pkt.tcp_flags, &s.other);
    }
    stats::count_packet(s.ct.service_id, s.ct.backend_id, ctx.len());
    nat::dst_nat(&mut s.nat, &s.pkt, &s.ct);
    let _ = nat::apply(ctx, s, reason::CONNTRACK);
    s.out.reason
}

/// The key of a SNAT reply entry's pair, the SNAT entry (egress direction, client -> backend: the client is the entry's rewritten
/// destination, the backend the packet's source), into `s.other`. Not inlined: written out in
/// [`ingress_packet`] it grew that frame past the verifier's combined 512-byte stack limit (kernel 6.18, by the
/// chain through `claim_snat_port`). Returns 0.
#[inline(never)]
fn snat_pair_key(s: &mut TcScratch) -> u32 {
    let k = &mut s.other;
    k.saddr = s.ct.new_daddr;
    k.daddr = s.pkt.saddr;
    k.sport = s.ct.new_dport;
    k.dport = s.pkt.sport;
    k.proto = s.pkt.proto;
    k.dir = CT_DIR_REPLY;
    k._pad = [0; 2];
    0
}

#[inline(always)]
pub(super) fn config(cfg: &mut ConfigValue) {
    match LB_CONFIG.get_ptr(0) {
        // SAFETY: an array slot is valid for the program run; read by value.
        Some(p) => *cfg = unsafe { p.read() },
        None => *cfg = ConfigValue::default(),
    }
}
