//! The outcome of one tc run, in one place per verdict: [`Outcome`]'s setters, the reject, and [`finish`], which
//! counts it and records it for `lb-agent trace`.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use lb_common::{
    CONFIG_FLAG_TRACE, TraceValue, VERDICT_DROP, VERDICT_PASS, VERDICT_REJECT, reason,
};

use crate::events;
use crate::maps::LB_TRACE;
use crate::reject;
use crate::scratch::{Outcome, TcScratch};
use crate::stats;

impl Outcome {
    #[inline(always)]
    pub(super) fn set(&mut self, verdict: u32, reason: u32, service_id: u32, action: i32) {
        self.verdict = verdict;
        self.reason = reason;
        self.service_id = service_id;
        self.backend_id = 0;
        self.snat = 0;
        self.action = action;
    }

    #[inline(always)]
    pub(super) fn pass(&mut self, reason: u32) {
        self.set(VERDICT_PASS, reason, 0, TC_ACT_UNSPEC);
    }

    #[inline(always)]
    pub(super) fn drop(&mut self, reason: u32, service_id: u32) {
        self.set(VERDICT_DROP, reason, service_id, TC_ACT_SHOT);
    }
}

/// Turns the packet into a RST / ICMP unreachable (`reject`) and records the verdict; drops what may not be
/// answered (`reject::answerable`).
#[inline(always)]
pub(super) fn reject_packet(ctx: &TcContext, s: &mut TcScratch, why: u32, service_id: u32) {
    if !reject::answerable(&s.pkt) {
        // A RST, or a source no answer can go to: dropped, for the same reason.
        s.out.drop(why, service_id);
        return;
    }
    let action = reject::reject(ctx, &s.pkt, &mut s.rej);
    if action >= 0 {
        s.out.set(VERDICT_REJECT, why, service_id, action);
    } else {
        // The packet may be half rewritten: drop it, and say which reject failed.
        s.out.drop(reason::REJECT_FAILED, service_id);
    }
}

/// Counts, reports (`lb-agent monitor`) and (for `lb-agent trace`) records the outcome; returns the tc verdict.
#[inline(always)]
pub(super) fn finish(ctx: &TcContext, s: &TcScratch) -> i32 {
    let out = &s.out;
    if out.reason != reason::NONE {
        stats::count_reason(out.reason);
    }
    let refused = out.verdict == VERDICT_DROP || out.verdict == VERDICT_REJECT;
    if refused && out.service_id != 0 {
        stats::count_service_drop(out.service_id);
    }
    // Compares only, on every other packet: an established flow's reaches no helper and no map here.
    if refused || out.reason == reason::NEW_FLOW {
        let _ = events::tc(ctx, s);
    }
    if s.cfg.flags & CONFIG_FLAG_TRACE != 0
        && let Some(t) = LB_TRACE.get_ptr_mut(0)
    {
        // SAFETY: the single array slot is valid for the program run; only `lb-agent trace` runs this path.
        unsafe {
            let seq = (*t).seq.wrapping_add(1);
            t.write(TraceValue {
                verdict: out.verdict,
                reason: out.reason,
                service_id: out.service_id,
                backend_id: out.backend_id,
                snat: out.snat,
                seq,
            });
        }
    }
    out.action
}
