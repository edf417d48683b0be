//! The flat slot array behind `LB_MAGLEV`: one `BPF_F_MMAPABLE` array holding every service's lookup table, written
//! through short-lived memory mappings with plain stores, and grown by swapping a larger copy into `LB_MAGLEV[0]`.
//!
//! The array is created, pinned (`LB_MAGLEV_SLOTS`) and grown by the agent: the programs reach it only through
//! `LB_MAGLEV`, so it can be any size, and growing it reloads nothing. A growth copies the used part into the new
//! array, pins it as `LB_MAGLEV_SLOTS:next`, installs it in `LB_MAGLEV` (one RCU grace period) and renames the pin;
//! an agent killed in between finds `:next` and finishes (or drops) the step when it opens the array.
//!
//! Writes go through mappings of the pages they touch, at most [`WINDOW`] bytes at a time, unmapped at once: a
//! mapped page counts in the agent's resident memory, and the array may be far larger than what one sync writes.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, IterableMap, Map, MapData, MapError};
use lb_common::{BPF_F_INNER_MAP, BPF_F_MMAPABLE, LUT_BLOCK_BYTES, SlotBlock, map_names};

use super::map_batch;
use super::map_error::MapsError;

/// The most the agent maps at once.
const WINDOW: u64 = 4 << 20;
/// Writes closer than this share a mapping rather than each getting its own.
const GAP: u64 = 64 << 10;
/// The largest slot array: offsets are `u32` in `ServiceValue`, and the kernel caps a map's value area at 4 GiB.
pub const MAX_BYTES: u64 = 2 << 30;

fn op(op: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op {
        map: map_names::MAGLEV_SLOTS,
        op,
        source,
    }
}

fn io_op(op: &'static str) -> impl FnOnce(io::Error) -> MapsError {
    move |io_error| MapsError::Op {
        map: map_names::MAGLEV_SLOTS,
        op,
        source: MapError::SyscallError(aya::sys::SyscallError { call: op, io_error }),
    }
}

/// The slot array currently installed in `LB_MAGLEV`, if any.
pub struct SlotArray {
    dir: PathBuf,
    current: Option<(Array<MapData, SlotBlock>, u64)>,
}

impl SlotArray {
    /// Adopts the slot array installed in `outer` (`LB_MAGLEV`) from its pin under `dir`, finishing or dropping an
    /// interrupted growth. None installed (a fresh datapath) is fine: the first table creates it.
    pub fn open(dir: &Path, outer: BorrowedFd<'_>) -> Result<Self, MapsError> {
        let pin = dir.join(map_names::MAGLEV_SLOTS);
        let next = next_pin(dir);
        let installed = map_batch::lookup_u32(outer, 0).map_err(io_op("bpf_map_lookup_elem"))?;
        if next.exists() {
            let next_id = MapData::from_pin(&next)
                .ok()
                .and_then(|m| m.info().ok())
                .map(|i| i.id());
            if next_id.is_some() && next_id == installed {
                // Killed after installing a grown array, before renaming its pin.
                std::fs::rename(&next, &pin).map_err(io_op("rename"))?;
            } else {
                let _ = std::fs::remove_file(&next);
            }
        }
        let mut array = Self {
            dir: dir.to_path_buf(),
            current: None,
        };
        if !pin.exists() {
            return Ok(array);
        }
        let data = MapData::from_pin(&pin).map_err(|source| MapsError::Open {
            path: pin.display().to_string(),
            source,
        })?;
        let info = data.info().map_err(op("info"))?;
        let data = Map::from_map_data(data)
            .and_then(Array::<MapData, SlotBlock>::try_from)
            .map_err(|source| MapsError::Layout {
                map: map_names::MAGLEV_SLOTS,
                source,
            })?;
        if installed.is_some_and(|id| id != info.id()) {
            return Err(MapsError::Op {
                map: map_names::MAGLEV,
                op: "adopt",
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "LB_MAGLEV holds another slot array than the pinned LB_MAGLEV_SLOTS (remove the pins with `lb-agent cleanup`)",
                    io_error: io::Error::from_raw_os_error(libc::EEXIST),
                }),
            });
        }
        let bytes = u64::from(info.max_entries()) * u64::from(LUT_BLOCK_BYTES);
        if installed.is_none() {
            // The pin outlived an `LB_MAGLEV` that was replaced: install it again, it is what the entries point at.
            map_batch::update_u32_elem(outer, 0, data.map().fd().as_fd().as_raw_fd() as u32)
                .map_err(io_op("bpf_map_update_elem"))?;
        }
        array.current = Some((data, bytes));
        Ok(array)
    }

    /// Bytes the array holds; 0 before it exists.
    pub fn capacity(&self) -> u64 {
        self.current.as_ref().map_or(0, |(_, b)| *b)
    }

    /// Installs a new array of `bytes` (rounded up to whole pages) holding the first `keep` bytes of the current
    /// one. Returns after an RCU grace period (the `LB_MAGLEV` update), so no program still reads the old array.
    pub fn grow(&mut self, outer: BorrowedFd<'_>, bytes: u64, keep: u64) -> Result<(), MapsError> {
        let bytes = bytes.div_ceil(page_size()) * page_size();
        if bytes > MAX_BYTES {
            return Err(io_op("grow")(io::Error::from_raw_os_error(libc::E2BIG)));
        }
        let blocks = (bytes / u64::from(LUT_BLOCK_BYTES)) as u32;
        let new = Array::<MapData, SlotBlock>::create(blocks, BPF_F_INNER_MAP | BPF_F_MMAPABLE)
            .map_err(op("create"))?;
        if let Some((old, _)) = &self.current {
            let keep = keep.min(self.capacity()).min(bytes);
            let mut at = 0;
            while at < keep {
                let len = WINDOW.min(keep - at);
                let from =
                    Window::map(old.map().fd().as_fd(), at, len, false).map_err(io_op("mmap"))?;
                let mut to =
                    Window::map(new.map().fd().as_fd(), at, len, true).map_err(io_op("mmap"))?;
                to.bytes_mut().copy_from_slice(from.bytes());
                at += len;
            }
        }
        let next = next_pin(&self.dir);
        let _ = std::fs::remove_file(&next);
        new.map().pin(&next).map_err(|error| MapsError::Op {
            map: map_names::MAGLEV_SLOTS,
            op: "pin",
            source: MapError::PinError {
                name: Some(map_names::MAGLEV_SLOTS.to_owned()),
                error,
            },
        })?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Err(e) =
            map_batch::update_u32_elem(outer, 0, new.map().fd().as_fd().as_raw_fd() as u32)
        {
            let _ = std::fs::remove_file(&next);
            return Err(io_op("bpf_map_update_elem")(e));
        }
        std::fs::rename(&next, self.dir.join(map_names::MAGLEV_SLOTS)).map_err(io_op("rename"))?;
        self.current = Some((new, bytes));
        Ok(())
    }

    /// Writes each `(offset, bytes)`. The caller writes only regions no entry points at.
    pub fn write(&mut self, writes: &[(u64, &[u8])]) -> Result<(), MapsError> {
        let Some((map, capacity)) = &self.current else {
            return Err(io_op("write")(io::Error::from_raw_os_error(libc::ENOENT)));
        };
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_unstable_by_key(|&i| writes[i].0);
        let mut i = 0;
        while i < order.len() {
            // One mapping for a run of writes that are close together and fit a window.
            let start = writes[order[i]].0;
            let mut end = start + writes[order[i]].1.len() as u64;
            let mut j = i + 1;
            while j < order.len() {
                let (o, b) = writes[order[j]];
                let e = o + b.len() as u64;
                if o > end + GAP || e - start > WINDOW {
                    break;
                }
                end = end.max(e);
                j += 1;
            }
            if end > *capacity {
                return Err(io_op("write")(io::Error::from_raw_os_error(libc::ERANGE)));
            }
            let mut window = Window::map(map.map().fd().as_fd(), start, end - start, true)
                .map_err(io_op("mmap"))?;
            let base = window.offset;
            let dst = window.bytes_mut();
            for &k in &order[i..j] {
                let (o, b) = writes[k];
                let at = (o - base) as usize;
                dst[at..at + b.len()].copy_from_slice(b);
            }
            i = j;
        }
        // The stores are visible before the entry updates that follow (a syscall, whose release store publishes
        // the entry); the fence says so explicitly for the compiler and weakly ordered CPUs.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, MapsError> {
        let Some((map, capacity)) = &self.current else {
            return Err(io_op("read")(io::Error::from_raw_os_error(libc::ENOENT)));
        };
        if offset + len > *capacity {
            return Err(io_op("read")(io::Error::from_raw_os_error(libc::ERANGE)));
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut at = offset;
        while at < offset + len {
            let n = WINDOW.min(offset + len - at);
            let window =
                Window::map(map.map().fd().as_fd(), at, n, false).map_err(io_op("mmap"))?;
            out.extend_from_slice(window.bytes());
            at += n;
        }
        Ok(out)
    }
}

fn next_pin(dir: &Path) -> PathBuf {
    dir.join(format!("{}:next", map_names::MAGLEV_SLOTS))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

/// A shared mapping of part of the array, unmapped on drop. `offset..offset + len` is what the caller asked for;
/// the mapping covers the whole pages around it.
struct Window {
    base: *mut u8,
    map_len: usize,
    /// Byte offset in the array of `bytes()[0]`.
    offset: u64,
    len: usize,
    /// Bytes between the mapping's start and `offset`.
    skip: usize,
}

impl Window {
    fn map(fd: BorrowedFd<'_>, offset: u64, len: u64, write: bool) -> io::Result<Window> {
        let page = page_size();
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        let map_len = (end - start) as usize;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the map's value area (the kernel checks the range against the array's
        // size); nothing else refers to the returned address, which `Drop` unmaps.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window {
            base: base.cast(),
            map_len,
            offset,
            len: len as usize,
            skip: (offset - start) as usize,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `skip + len <= map_len` by construction, the mapping is readable and lives as long as `self`.
        // Programs only read the array; other writers are this agent's own, which never write the region of a
        // live table, so the bytes do not change under a reader of a region it owns.
        unsafe { std::slice::from_raw_parts(self.base.add(self.skip), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, mapped writable by the constructor's caller (`write: true`), and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(self.skip), self.len) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created; no slice borrowed from it outlives `self`.
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
        }
    }
}
