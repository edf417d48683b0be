//! `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` on `LB_MAGLEV` and on its inner tables (array maps, filled in
//! one batch each), issued with bpf(2) directly because aya 0.14 has no batch operations.
//!
//! Why: every userspace update or delete of a map-of-maps waits for an RCU grace period
//! (`kernel/bpf/syscall.c` `maybe_wait_bpf_programs()` → `synchronize_rcu()`), ~13 ms each on the machines we
//! measured, so swapping one table per frontend made 1k services take 26 s to program. Since Linux 6.7 (commit
//! "bpf: Call maybe_wait_bpf_programs() only once for generic_map_update_batch()") a batch command waits once for
//! the whole batch. On kernels 5.6-6.6 a batch is still correct (one wait per element); older kernels answer
//! EINVAL for the unknown command, and the caller falls back to single-element updates.
//!
//! The generic batch implementations (`generic_map_update_batch`, `generic_map_delete_batch`) apply elements in
//! order, stop at the first failing one and write back in `count` how many were applied before it; the callers use
//! that to attribute a failure to one element and continue with the rest.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `ENOTSUPP` (kernel-internal, 524): what some map types answer for an operation they lack.
pub const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The element-command member of `union bpf_attr` (`BPF_MAP_LOOKUP_ELEM`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A failed batch: how many elements were applied before the failing one, and the error of that one.
#[derive(Debug)]
pub struct BatchFailure {
    pub applied: usize,
    pub error: io::Error,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a live, exclusively borrowed `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, and its size
    // is passed, so the kernel reads and writes only within it (it zero-checks nothing beyond `size`). Every pointer
    // inside it was set by the caller to memory that outlives this call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Updates `keys[i]` → `values[i]` in one `BPF_MAP_UPDATE_BATCH` (for a map-of-maps the values are inner map fds;
/// for an array the keys are indices).
pub fn update_u32(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> Result<(), BatchFailure> {
    debug_assert_eq!(keys.len(), values.len());
    let n = keys.len().min(values.len());
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(n).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    run_batch(BPF_MAP_UPDATE_BATCH, &mut attr, n)
}

/// Deletes `keys` in one `BPF_MAP_DELETE_BATCH`. A missing key fails the batch at that key (ENOENT).
pub fn delete_u32(map: BorrowedFd<'_>, keys: &[u32]) -> Result<(), BatchFailure> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    run_batch(BPF_MAP_DELETE_BATCH, &mut attr, keys.len())
}

fn run_batch(cmd: libc::c_long, attr: &mut BatchAttr, n: usize) -> Result<(), BatchFailure> {
    if n == 0 {
        return Ok(());
    }
    sys_bpf(cmd, attr).map_err(|error| BatchFailure {
        // The kernel writes back how many elements it applied; never trust it past what was asked.
        applied: (attr.count as usize).min(n),
        error,
    })
}

/// Whether `key` is present in a map with u32 keys and u32 values (a map-of-maps answers the inner map's id, so
/// this opens nothing). Unlike an update, a lookup waits for no grace period.
pub fn contains_u32(map: BorrowedFd<'_>, key: u32) -> io::Result<bool> {
    let mut value: u32 = 0;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &mut value as *mut u32 as u64,
        ..ElemAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The errors that mean "this kernel cannot do the batch command on this map", not "this element is bad".
pub fn means_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP)
    )
}
