//! How full each pinned map is: entries against `max_entries`, for `lb-agent stats`, `lb-agent status` and the
//! `lb_map_entries` / `lb_map_capacity` metrics. Read from the pins alone (agent running or not), for every map
//! that fills up: the hash, LRU and LPM maps. Arrays (config, counters, the trace record) always hold
//! `max_entries` and are left out, but for the Maglev slot array, whose fill is the blocks its tables occupy.
//!
//! Counting walks the keys: `BPF_MAP_LOOKUP_BATCH` for the (LRU) hash maps, thousands per syscall, so the 262k
//! conntrack and socket maps cost milliseconds per scrape; `BPF_MAP_GET_NEXT_KEY` for the others (LPM tries and
//! maps of maps have no batch lookup), which are small. Maps that programs change while they are counted (LRU
//! conntrack) give a count that was true during the walk; a gauge needs no more.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use std::collections::BTreeMap;

use aya::maps::{MapData, MapType};
use lb_common::map_names;

use super::lut::Layout;
use super::maps::{MapsRead, PinnedMaps};

/// One map's fill.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

impl MapFill {
    /// Entries as a share of the capacity, 0.0 to 1.0.
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// Every countable map pinned under `dir`, in `map_names::ALL` order then the agent's own; maps not pinned (an
/// older object, a map migration in progress) are left out.
pub fn map_fill(dir: &Path) -> Vec<MapFill> {
    map_names::ALL
        .iter()
        .chain(map_names::AGENT_CREATED.iter())
        .filter_map(|name| {
            let map = MapData::from_pin(dir.join(name)).ok()?;
            let info = map.info().ok()?;
            if *name == map_names::MAGLEV_SLOTS {
                return Some(MapFill {
                    map: (*name).to_owned(),
                    entries: slot_blocks_used(dir),
                    capacity: u64::from(info.max_entries()),
                });
            }
            let batch = match info.map_type().ok()? {
                MapType::Hash | MapType::LruHash => true,
                MapType::LpmTrie | MapType::HashOfMaps | MapType::PerCpuHash => false,
                _ => return None,
            };
            let fd = map.fd().as_fd();
            let entries = if batch {
                count_batched(fd, info.key_size(), info.value_size())
                    .or_else(|_| count_keys(fd, info.key_size()))
            } else {
                count_keys(fd, info.key_size())
            }
            .ok()?;
            Some(MapFill {
                map: (*name).to_owned(),
                entries,
                capacity: u64::from(info.max_entries()),
            })
        })
        .collect()
}

/// The slot array is an array (always "full"): its fill is the blocks the distinct tables occupy, from the service
/// entries that point at them.
fn slot_blocks_used(dir: &Path) -> u64 {
    let Ok(maps) = PinnedMaps::open(dir) else {
        return 0;
    };
    let regions: BTreeMap<u32, u64> = maps
        .services()
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, v)| Some((v.table_offset, Layout::of(v)?.region_len())))
        .collect();
    regions.values().sum::<u64>() / u64::from(lb_common::LUT_BLOCK_BYTES)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per batch; must be at least the largest hash bucket, which is never near this.
const BATCH: u32 = 4096;

/// The element-command member of `union bpf_attr` (`BPF_MAP_GET_NEXT_KEY`: `value` is the next key).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
    flags: u64,
}

/// The `batch` member of `union bpf_attr`.
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

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a live, exclusively borrowed `#[repr(C)]` prefix of `union bpf_attr` for `cmd` and its size
    // is passed, so the kernel reads and writes within it; every pointer in it was set by the caller to a buffer
    // that outlives the call and is as large as the command writes (count x key or value size).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Counts keys one `BPF_MAP_GET_NEXT_KEY` at a time.
fn count_keys(fd: BorrowedFd<'_>, key_size: u32) -> io::Result<u64> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            ..ElemAttr::default()
        };
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {
                n += 1;
                first = false;
                std::mem::swap(&mut key, &mut next);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}

/// Counts entries with `BPF_MAP_LOOKUP_BATCH`, [`BATCH`] at a time.
fn count_batched(fd: BorrowedFd<'_>, key_size: u32, value_size: u32) -> io::Result<u64> {
    let mut keys = vec![0u8; (key_size * BATCH) as usize];
    let mut values = vec![0u8; (value_size * BATCH) as usize];
    // The position token is a bucket index for hash maps; room for any key.
    let mut token_in = vec![0u8; key_size.max(8) as usize];
    let mut token_out = vec![0u8; key_size.max(8) as usize];
    let mut n = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        n += u64::from(attr.count);
        match result {
            Ok(()) => {
                first = false;
                std::mem::swap(&mut token_in, &mut token_out);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
}
