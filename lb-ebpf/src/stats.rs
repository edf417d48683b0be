//! Per-CPU counters in `LB_SVC_STATS` and `LB_BE_STATS`, indexed by service and backend id. An id past the array's
//! end (the agent sized the map smaller than its ids) is not counted.
//!
//! Plain increments, not atomics: each CPU has its own slot and the cgroup hooks run with migration disabled. Two
//! programs preempting each other on one CPU can lose a count, which is acceptable for statistics.

use crate::maps::{LB_BE_STATS, LB_DROP_STATS, LB_SOCK_STATS, LB_SVC_STATS};

/// A connection (or the first datagram of an unconnected UDP socket to a backend) was translated.
#[inline(always)]
pub fn count_connect(service_id: u32, backend_id: u32) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe { (*s).sock_connects = (*s).sock_connects.wrapping_add(1) };
    }
    if let Some(b) = LB_BE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*b).sock_connects = (*b).sock_connects.wrapping_add(1) };
    }
}

/// A `connect()` / `sendmsg()` was refused because the service had no usable backend.
#[inline(always)]
pub fn count_reject(service_id: u32) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe { (*s).sock_rejects = (*s).sock_rejects.wrapping_add(1) };
    }
}

/// A packet the tc datapath forwarded (new flow or conntrack hit) to `backend_id` of `service_id`.
#[inline(always)]
pub fn count_packet(service_id: u32, backend_id: u32, bytes: u32) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe {
            (*s).packets = (*s).packets.wrapping_add(1);
            (*s).bytes = (*s).bytes.wrapping_add(u64::from(bytes));
        }
    }
    if let Some(b) = LB_BE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*b).packets = (*b).packets.wrapping_add(1);
            (*b).bytes = (*b).bytes.wrapping_add(u64::from(bytes));
        }
    }
}

/// A packet of `service_id` the tc datapath dropped or rejected.
#[inline(always)]
pub fn count_service_drop(service_id: u32) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe { (*s).drops = (*s).drops.wrapping_add(1) };
    }
}

/// One more `connect()` / `sendmsg()` the socket LB refused, for `reason` (`lb_common::reason`).
#[inline(always)]
pub fn count_sock_refusal(reason: u32) {
    if let Some(c) = LB_SOCK_STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe { *c = (*c).wrapping_add(1) };
    }
}

/// One more packet handled for `reason` (`lb_common::reason`).
#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = LB_DROP_STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU array slot is valid for the program run and only this CPU writes it.
        unsafe { *c = (*c).wrapping_add(1) };
    }
}
