//! bpf(2) commands issued directly because aya 0.14 lacks them or hides what they need: single-element lookups and
//! updates on a map-of-maps (whose values are map ids and fds), the creation of a map-of-maps with a given inner
//! template, and the raw entries of a map of a layout no type of this build describes.
//!
//! Every successful userspace update or delete of a map-of-maps waits for an RCU grace period
//! (`kernel/bpf/syscall.c` `maybe_wait_bpf_programs()` → `synchronize_rcu()`), ~13 ms on the machines we measured.
//! lb uses that wait on purpose as its RCU fence (`rcu_fence`), and keeps map-of-maps updates off the change path
//! otherwise (the slot array is swapped only to grow).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The element-command member of `union bpf_attr` (`BPF_MAP_LOOKUP_ELEM`, `_UPDATE_ELEM`, `_GET_NEXT_KEY`).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

/// The map-creation member of `union bpf_attr`, up to `map_name` (the rest zero).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `BPF_MAP_TYPE_ARRAY`.
pub const MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_ARRAY_OF_MAPS`.
pub const MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
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
        Ok(r)
    }
}

/// Creates a map with `u32` keys and values (`inner` is the template of a map-of-maps).
pub fn create_u32_map(
    map_type: u32,
    max_entries: u32,
    inner: Option<BorrowedFd<'_>>,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut attr = CreateAttr {
        map_type,
        key_size: 4,
        value_size: 4,
        max_entries,
        inner_map_fd: inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..CreateAttr::default()
    };
    let n = name.len().min(15);
    attr.map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets `key` to `value` in a map with `u32` keys and values (for a map-of-maps, `value` is the inner map's fd and
/// the call returns after an RCU grace period).
pub fn update_u32_elem(map: BorrowedFd<'_>, key: u32, value: u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        ..ElemAttr::default()
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// The value under `key` in a map with `u32` keys and values (a map-of-maps answers the inner map's id), `None`
/// when absent. Waits for no grace period.
pub fn lookup_u32(map: BorrowedFd<'_>, key: u32) -> io::Result<Option<u32>> {
    let mut value: u32 = 0;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &mut value as *mut u32 as u64,
        ..ElemAttr::default()
    };
    match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every (key, value) of a map, as bytes of the sizes given: for a pin of an older layout.
pub fn entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        let mut value = vec![0u8; value_size];
        let mut attr = ElemAttr {
            map_fd: map.as_raw_fd() as u32,
            key: next.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => out.push((next.clone(), value)),
            // Deleted meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        key = Some(next);
    }
}
