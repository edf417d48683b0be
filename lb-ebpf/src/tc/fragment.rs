//! Later fragments of a datagram whose first fragment was translated here (`LB_FRAGMENTS`): they carry no L4
//! header, so they get the addresses their first fragment got.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the map helpers as references into the scratch map value; by value, \
              Rust would copy them onto the stack first, which is what the scratch map exists to avoid"
)]

use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_ktime_get_ns, programs::TcContext};
use lb_common::{
    CT_FLAG_SNAT, FRAG_FLAG_COUNTED, FRAG_HOOK_INGRESS, FRAG_LIFETIME_S, FragKey, VERDICT_FORWARD,
    reason,
};

use crate::ct::NS_PER_SEC;
use crate::maps::LB_FRAGMENTS;
use crate::packet::{FRAG_FIRST, Packet};
use crate::rewrite;
use crate::scratch::TcScratch;
use crate::stats;

/// The `LB_FRAGMENTS` key of the packet as it is now.
#[inline(always)]
pub(super) fn frag_key(k: &mut FragKey, p: &Packet, hook: u8) {
    k.saddr = p.saddr;
    k.daddr = p.daddr;
    k.id = p.frag_id;
    k.proto = p.proto;
    k.hook = hook;
    k._pad = [0; 2];
}

/// A first fragment that was not translated (not a service's, dropped, rejected) removes any entry of its key: an
/// older datagram's entry would otherwise translate this datagram's later fragments.
#[inline(always)]
pub(super) fn forget(s: &mut TcScratch) {
    if s.pkt.frag == FRAG_FIRST && s.out.verdict != VERDICT_FORWARD {
        frag_key(&mut s.fkey, &s.pkt, s.hook);
        let _ = LB_FRAGMENTS.remove(&s.fkey);
    }
}

/// A later fragment: translated to the addresses its first fragment got, when that was seen here within
/// `FRAG_LIFETIME_S`; otherwise it passes untouched (ingress counts it as `reason::FRAGMENT`).
#[inline(never)]
pub(super) fn follow(ctx: &TcContext, s: &mut TcScratch) -> u32 {
    frag_key(&mut s.fkey, &s.pkt, s.hook);
    let unknown = if s.hook == FRAG_HOOK_INGRESS {
        reason::FRAGMENT
    } else {
        reason::NONE
    };
    let Some(ptr) = LB_FRAGMENTS.get_ptr(&s.fkey) else {
        s.out.pass(unknown);
        return s.out.reason;
    };
    // SAFETY: read at once, by value, from a successful lookup (a concurrent LRU reuse yields at worst another
    // datagram's entry, which the key comparison of the next lookup would not find again).
    s.fval = unsafe { ptr.read() };
    // SAFETY: no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(s.fval.created_ns) > u64::from(FRAG_LIFETIME_S) * NS_PER_SEC {
        let _ = LB_FRAGMENTS.remove(&s.fkey);
        s.out.pass(unknown);
        return s.out.reason;
    }
    let n = &mut s.nat;
    n.saddr = s.fval.new_saddr;
    n.daddr = s.fval.new_daddr;
    // 0 on both sides: a later fragment has no ports.
    n.sport = s.pkt.sport;
    n.dport = s.pkt.dport;
    let svc_id = s.fval.service_id;
    if rewrite::rewrite(ctx, &mut s.pkt, &s.nat) != 0 {
        s.out.drop(reason::MALFORMED, svc_id);
        return s.out.reason;
    }
    if s.fval.flags & FRAG_FLAG_COUNTED != 0 {
        stats::count_packet(svc_id, s.fval.backend_id, ctx.len());
    }
    s.out.set(
        VERDICT_FORWARD,
        reason::FRAGMENT_FOLLOWED,
        svc_id,
        TC_ACT_OK,
    );
    s.out.backend_id = s.fval.backend_id;
    s.out.snat = u32::from(s.fval.flags & CT_FLAG_SNAT != 0);
    s.out.reason
}
