//! Backend selection for the socket LB: session affinity first, then the service's lookup table (cilium
//! `bpf/lib/lb.h`: `lb4_affinity_backend_id_by_netns` -> `lb4_select_backend_id` -> `lb4_lookup_backend`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use lb_common::{
    ALG_MAGLEV, AffinityKey, AffinityValue, BackendValue, LUT_BLOCK_BYTES, LUT_BLOCK_WORDS,
    LUT_WIDTH_U8, LUT_WIDTH_U16, LUT_WIDTH_U32, ServiceValue,
};

use crate::maps::{LB_AFFINITY, LB_BACKENDS, LB_MAGLEV, SlotArray};

const NS_PER_SEC: u64 = 1_000_000_000;

/// A backend the forward core may translate to: its id (for stats) and a copy of its `LB_BACKENDS` value.
#[derive(Clone, Copy)]
pub struct Backend {
    pub id: u32,
    pub value: BackendValue,
}

/// Picks the backend for one `connect()` / `sendmsg()` to `svc`, or `None` when the service has no usable backend
/// right now (the caller rejects: a missing table, slot or backend is never forwarded to).
///
/// With ClientIP affinity (`affinity_timeout > 0`) a client keeps its backend while it is used at least once per
/// timeout and still exists; the entry is refreshed (or created) on every pick.
#[inline(always)]
pub fn select_backend(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<Backend> {
    if svc.affinity_timeout == 0 {
        return select_from_table(ctx, svc);
    }
    // The socket LB has no client address at connect() time; one pod is one network namespace, so the namespace
    // cookie names the client (lb-common `AffinityKey`).
    // SAFETY: bpf_get_netns_cookie takes the program's own context; it is allowed for cgroup sock_addr programs
    // (kernel 5.7+) and has no other precondition.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = AffinityKey {
        netns_cookie,
        client_addr: [0; 16],
        service_id: svc.service_id,
        _pad: 0,
    };
    // SAFETY: takes no argument, no precondition.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(svc.affinity_timeout) * NS_PER_SEC;

    let remembered = LB_AFFINITY
        .get_ptr(key)
        // SAFETY: the pointer comes from a successful lookup and is read at once, by value. An LRU entry can be
        // evicted and its slot reused concurrently; the worst outcome is one stale or foreign (backend id, time)
        // pair, which the checks below treat like any other entry.
        .map(|p| unsafe { p.read() })
        // Another CPU may have refreshed the entry after `now` was taken: saturate to "just used".
        .filter(|v| now.saturating_sub(v.last_used_ns) < timeout_ns)
        .and_then(|v| lookup_backend(v.backend_id));
    let backend = match remembered {
        Some(b) => b,
        None => select_from_table(ctx, svc)?,
    };
    let value = AffinityValue {
        backend_id: backend.id,
        _pad: 0,
        last_used_ns: now,
    };
    // A full update rather than a write through the lookup pointer, which could land in an entry that LRU eviction
    // just handed to another key. A failed update only loses affinity for the next connection, never this one.
    let _ = LB_AFFINITY.insert(key, value, 0);
    Some(backend)
}

/// One pick from the service's lookup table for a `connect()` / `sendmsg()`.
#[inline(always)]
fn select_from_table(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<Backend> {
    let key = if svc.algorithm == ALG_MAGLEV {
        // SAFETY: bpf_get_socket_cookie takes the program's own context; allowed for cgroup sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // The flow key is the socket cookie, not a 5-tuple: a connect()ing socket has no source port yet. The
        // cookie is stable for the socket's whole life, so an unconnected UDP socket keeps its backend across
        // sendmsg() calls (and, Maglev being consistent, mostly across backend changes), and it differs per
        // socket, so connections spread over the backends.
        mix64(cookie)
    } else {
        // ALG_RANDOM: the agent wrote the plain backend list, so a uniform slot is a uniform backend.
        // SAFETY: takes no argument, no precondition.
        unsafe { bpf_get_prandom_u32() }
    };
    pick_from_table(svc, key)
}

/// One pick from the service's lookup table with a caller-given key (a hash of the flow or socket, or a random
/// number for `ALG_RANDOM`): slot `key % table_size` of the table at `table_offset` in the slot array (lb-common
/// `ServiceValue` describes the layout). `None` when the service has no table or a read misses, so the caller
/// rejects: a missing slot or backend is never forwarded to.
///
/// Everything that locates the table comes from the one `ServiceValue` the caller copied, which the agent replaces
/// whole, so offset, size, width and backend count always belong together.
#[inline(always)]
pub fn pick_from_table(svc: &ServiceValue, key: u32) -> Option<Backend> {
    let size = svc.table_size;
    if size == 0 {
        return None;
    }
    let slots = LB_MAGLEV.get(0)?;
    let slot = key % size;
    let base = svc.table_offset;
    let backend_id = if svc.slot_width == LUT_WIDTH_U32 {
        word(slots, base.wrapping_add(slot.wrapping_mul(4)))?
    } else {
        let n = svc.backend_count;
        let slots_at = base.wrapping_add(n.wrapping_mul(4));
        let local = if svc.slot_width == LUT_WIDTH_U8 {
            let byte = slots_at.wrapping_add(slot);
            (word(slots, byte)? >> ((byte & 3) * 8)) & 0xff
        } else if svc.slot_width == LUT_WIDTH_U16 {
            let byte = slots_at.wrapping_add(slot.wrapping_mul(2));
            (word(slots, byte)? >> ((byte & 2) * 8)) & 0xffff
        } else {
            return None;
        };
        // Always below n by construction; checked so that nothing else could ever be read as an id.
        if local >= n {
            return None;
        }
        word(slots, base.wrapping_add(local.wrapping_mul(4)))?
    };
    lookup_backend(backend_id)
}

/// The little-endian `u32` word holding byte `byte` of the slot array.
#[inline(always)]
fn word(slots: &SlotArray, byte: u32) -> Option<u32> {
    // The array's size is checked at run time by the lookup (an inner map of any size, `SlotArray`).
    let block = slots.get(byte / LUT_BLOCK_BYTES)?;
    Some(block[(byte / 4) as usize % LUT_BLOCK_WORDS])
}

/// Copies a backend out of `LB_BACKENDS`.
#[inline(always)]
pub fn lookup_backend(id: u32) -> Option<Backend> {
    // SAFETY: the pointer comes from a successful lookup and is read at once, by value; LB_BACKENDS is created with
    // BPF_F_NO_PREALLOC, so its memory is not reused before the program run ends.
    let value = LB_BACKENDS.get_ptr(id).map(|p| unsafe { p.read() })?;
    Some(Backend { id, value })
}

/// Murmur3's 64-bit finaliser (`fmix64`), folded to 32 bits. Socket cookies are handed out by a counter, so
/// consecutive sockets differ in a few low bits; this spreads every input bit over the whole result before the
/// modulo by the table size.
#[inline(always)]
pub fn mix64(mut h: u64) -> u32 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h ^ (h >> 32)) as u32
}
