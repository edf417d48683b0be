//! `lb-agent monitor`'s events: one function per event source, each called only where a program has already decided
//! on a new flow, a drop or a reject (cilium's `send_drop_notify` / `send_trace_notify` in `bpf/lib/drop.h`,
//! `trace.h`). An established flow's packets never get here, so they pay nothing, not even the gate's map read.
//!
//! Every event first passes [`admit`]: `LB_MONITOR` must hold a live lease (a monitor reads the ring buffer) that
//! wants this kind, and this CPU's token bucket (`LB_MONITOR_RATE`, refilled from `bpf_jiffies64`, which the
//! verifier inlines) must hold a token. The record is then reserved in `LB_EVENTS`, filled in place (no stack copy)
//! and submitted without a wakeup: the monitor polls the ring every 100 ms, so a burst of events costs no wakeup
//! per event.
//!
//! Each function is `#[inline(never)]` (the event code stays out of the callers' frames and registers) and returns
//! 0 (see tc/mod.rs for why a subprogram must not return `()`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_RB_NO_WAKEUP,
    helpers::bpf_get_netns_cookie,
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::{
    BackendValue, EVENT_DROP, EVENT_NEW_FLOW, EVENT_REJECT, MonitorBucket, MonitorEvent,
    NETNS_HAS_V4, NETNS_HAS_V6, PATH_SOCK, PATH_TC, PATH_XDP, ServiceKey, VERDICT_REJECT,
    is_v4_mapped, reason,
};

use crate::ct;
use crate::maps::{LB_EVENTS, LB_MONITOR, LB_MONITOR_RATE, LB_NETNS_ADDRS};
use crate::scratch::{TcScratch, XdpScratch};

/// The most idle time the token bucket refills for (seconds), which also keeps `elapsed * rate` far from overflow.
const MAX_REFILL_S: u64 = 60;

/// Whether an event of `kind` goes out now: a monitor holds the lease and wants the kind, and this CPU's token
/// bucket has a token (else the event is counted as suppressed). Returns the bucket, for [`count_lost`].
#[inline(always)]
fn admit(kind: u8, now: u64) -> Option<*mut MonitorBucket> {
    let cfg = LB_MONITOR.get_ptr(0)?;
    // SAFETY: an array slot is valid for the program run. Fields are read one by one, not copied as a whole: the
    // XDP entry's frame leaves this code a few bytes of the 512-byte stack. A torn read while the monitor renews the
    // lease mixes two settings of one reader for one event, which is harmless.
    let (until, kinds, hz, rate, burst) = unsafe {
        (
            (*cfg).until_jiffies,
            (*cfg).kinds,
            (*cfg).hz,
            (*cfg).rate,
            (*cfg).burst,
        )
    };
    if now >= until || kinds & (1 << kind) == 0 {
        return None;
    }
    let ptr = LB_MONITOR_RATE.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array slot is valid for the program run; only this CPU writes it (see stats.rs on the rare
    // lost update between programs preempting each other).
    let b = unsafe { &mut *ptr };
    let hz = u64::from(hz).max(1);
    let elapsed = now.wrapping_sub(b.last_jiffies).min(MAX_REFILL_S * hz);
    b.last_jiffies = now;
    b.tokens = (b.tokens + elapsed * u64::from(rate)).min(u64::from(burst) * hz);
    if b.tokens < hz {
        b.suppressed = b.suppressed.wrapping_add(1);
        return None;
    }
    b.tokens -= hz;
    Some(ptr)
}

/// The ring buffer was full: the monitor reads too slowly.
#[inline(always)]
fn count_lost(b: *mut MonitorBucket) {
    // SAFETY: `b` is this CPU's bucket from `admit`, valid for the program run.
    unsafe { (*b).lost = (*b).lost.wrapping_add(1) };
}

/// Zeroes the reserved record `ev` (in place: no 112-byte copy through the stack) and stamps `kind`, `path` and
/// `now`.
///
/// # Safety
/// `ev` must be a reserved, not yet submitted `LB_EVENTS` record.
#[inline(always)]
unsafe fn base(ev: *mut MonitorEvent, kind: u8, path: u8, now: u64) {
    // SAFETY: the caller's contract; every bit pattern is a valid `MonitorEvent`.
    unsafe {
        core::ptr::write_bytes(ev, 0, 1);
        (*ev).kind = kind;
        (*ev).path = path;
        (*ev).jiffies = now;
    }
}

/// A tc verdict: a new flow (`s.key` is its client -> VIP tuple, `s.ct` its forward entry; the packet itself is
/// already rewritten), a drop or a reject (the packet as it arrived). The caller checks the verdict.
#[inline(never)]
pub fn tc(ctx: &TcContext, s: &TcScratch) -> u32 {
    let out = &s.out;
    let kind = if out.reason == reason::NEW_FLOW {
        EVENT_NEW_FLOW
    } else if out.verdict == VERDICT_REJECT {
        EVENT_REJECT
    } else {
        EVENT_DROP
    };
    let now = ct::now();
    let Some(bucket) = admit(kind, now) else {
        return 0;
    };
    let Some(mut entry) = LB_EVENTS.reserve(0) else {
        count_lost(bucket);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, valid and exclusively ours until submitted; `ctx.skb.skb` is the
    // program's context.
    unsafe {
        base(ev, kind, PATH_TC, now);
        if kind == EVENT_NEW_FLOW {
            (*ev).saddr = s.key.saddr;
            (*ev).daddr = s.key.daddr;
            (*ev).sport = s.key.sport;
            (*ev).dport = s.key.dport;
            (*ev).backend = s.ct.new_daddr;
            (*ev).backend_port = s.ct.new_dport;
            (*ev).snat = out.snat as u8;
        } else {
            (*ev).saddr = s.pkt.saddr;
            (*ev).daddr = s.pkt.daddr;
            (*ev).sport = s.pkt.sport;
            (*ev).dport = s.pkt.dport;
        }
        (*ev).proto = s.pkt.proto;
        (*ev).reason = out.reason;
        (*ev).service_id = out.service_id;
        (*ev).backend_id = out.backend_id;
        (*ev).ifindex = (*ctx.skb.skb).ifindex;
    }
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    0
}

/// XDP dropped a packet outside the source ranges of its service (rule 9; `s.range` holds the service id it
/// checked). Two arguments and a small frame: it is called from the XDP entry, whose own frame is large.
#[inline(never)]
pub fn xdp_source_range_drop(ctx: &XdpContext, s: &XdpScratch) -> u32 {
    let now = ct::now();
    let Some(bucket) = admit(EVENT_DROP, now) else {
        return 0;
    };
    let Some(mut entry) = LB_EVENTS.reserve(0) else {
        count_lost(bucket);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in `tc`; `ctx.ctx` is the program's context.
    unsafe {
        base(ev, EVENT_DROP, PATH_XDP, now);
        (*ev).saddr = s.pkt.saddr;
        (*ev).daddr = s.pkt.daddr;
        (*ev).sport = s.pkt.sport;
        (*ev).dport = s.pkt.dport;
        (*ev).proto = s.pkt.proto;
        (*ev).reason = reason::SOURCE_RANGE;
        (*ev).service_id = u32::from_be_bytes(s.range.service_id);
        (*ev).ifindex = (*ctx.ctx).ingress_ifindex;
    }
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    0
}

/// The socket LB refused a `connect()` / `sendmsg()` to `key` for `why`: `kind` `EVENT_DROP` (`EPERM`) or
/// `EVENT_REJECT` (`ECONNREFUSED`).
#[inline(never)]
pub fn sock_refused(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    kind: u8,
    why: u32,
    service_id: u32,
) -> u32 {
    let now = ct::now();
    let Some(bucket) = admit(kind, now) else {
        return 0;
    };
    let Some(mut entry) = LB_EVENTS.reserve(0) else {
        count_lost(bucket);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in `tc`.
    unsafe {
        base(ev, kind, PATH_SOCK, now);
        (*ev).reason = why;
        (*ev).service_id = service_id;
    }
    sock_common(ctx, key, ev);
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    0
}

/// The socket LB translated a socket's first `connect()` / `sendmsg()` to `key` into `backend`.
#[inline(never)]
pub fn sock_new_flow(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    service_id: u32,
    backend_id: u32,
    backend: &BackendValue,
) -> u32 {
    let now = ct::now();
    let Some(bucket) = admit(EVENT_NEW_FLOW, now) else {
        return 0;
    };
    let Some(mut entry) = LB_EVENTS.reserve(0) else {
        count_lost(bucket);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in `tc`.
    unsafe {
        base(ev, EVENT_NEW_FLOW, PATH_SOCK, now);
        (*ev).reason = reason::NEW_FLOW;
        (*ev).service_id = service_id;
        (*ev).backend_id = backend_id;
        (*ev).backend = backend.addr;
        (*ev).backend_port = backend.port;
    }
    sock_common(ctx, key, ev);
    entry.submit(u64::from(BPF_RB_NO_WAKEUP));
    0
}

/// What every socket event carries: destination, protocol, the caller's network namespace and that namespace's
/// address of the destination's family (the client, as far as one is known before the kernel picks a source
/// address). Not the calling process: `bpf_get_current_pid_tgid` and `bpf_get_current_comm` need CAP_PERFMON in
/// these hooks on kernel 6.18, which would make a load without it fail with EINVAL instead of the kernel's EPERM.
#[inline(always)]
fn sock_common(ctx: &SockAddrContext, key: &ServiceKey, ev: *mut MonitorEvent) {
    // SAFETY: bpf_get_netns_cookie takes the program's own context; `ev` is the caller's reserved record.
    unsafe {
        let cookie = bpf_get_netns_cookie(ctx.as_ptr());
        (*ev).daddr = key.addr;
        (*ev).dport = key.port;
        (*ev).proto = key.proto;
        (*ev).netns_cookie = cookie;
        if let Some(a) = LB_NETNS_ADDRS.get_ptr(cookie) {
            if is_v4_mapped(&key.addr) {
                if (*a).flags & NETNS_HAS_V4 != 0 {
                    (*ev).saddr = (*a).v4;
                }
            } else if (*a).flags & NETNS_HAS_V6 != 0 {
                (*ev).saddr = (*a).v6;
            }
        }
    }
}
