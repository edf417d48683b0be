//! One service's lookup table as bytes of the flat slot array (`LB_MAGLEV`'s inner array; the layout is described
//! once, on lb-common's `ServiceValue`): encoding for the reconciler, decoding for the CLI and for restarts.
//!
//! Maglev tables store each slot as an index into the table's own backend list, one byte wide while the service
//! has at most 256 backends (two bytes up to 65536): a 2039-slot table of 10 backends is 2079 bytes, not the 8156
//! of `u32` slots. Random selection stores the plain backend list (`u32` backend ids), as do Maglev tables of more
//! backends than a `u16` can index.

use lb_common::{LUT_BLOCK_BYTES, LUT_WIDTH_U8, LUT_WIDTH_U16, LUT_WIDTH_U32, ServiceValue};

/// Where a table is and how it is laid out: the fields of `ServiceValue` that locate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    /// `LUT_WIDTH_*`.
    pub width: u8,
    /// Backend ids in the region's list (`LUT_WIDTH_U8`/`U16`), or 0 (`LUT_WIDTH_U32`, which has none).
    pub list: u32,
    /// Slots.
    pub size: u32,
}

impl Layout {
    /// The layout an entry points at, `None` when it has no table or an unknown width.
    pub fn of(value: &ServiceValue) -> Option<Layout> {
        if value.table_size == 0 {
            return None;
        }
        let list = match value.slot_width {
            LUT_WIDTH_U8 | LUT_WIDTH_U16 => value.backend_count,
            LUT_WIDTH_U32 => 0,
            _ => return None,
        };
        Some(Layout {
            width: value.slot_width,
            list,
            size: value.table_size,
        })
    }

    /// Bytes the table occupies before rounding: the backend list, then the slots.
    pub fn bytes(&self) -> u64 {
        u64::from(self.list) * 4 + u64::from(self.size) * u64::from(self.width)
    }

    /// Bytes of its region: [`Layout::bytes`] rounded up to whole blocks.
    pub fn region_len(&self) -> u64 {
        self.bytes().div_ceil(u64::from(LUT_BLOCK_BYTES)) * u64::from(LUT_BLOCK_BYTES)
    }
}

/// A table ready to be written: its layout and the bytes of its whole region (zero-padded to blocks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub layout: Layout,
    pub bytes: Vec<u8>,
}

impl Encoded {
    /// A Maglev table: `ids` the table's backends, `slots[i]` the index into `ids` of slot i's backend.
    pub fn maglev(ids: &[u32], slots: &[u32]) -> Encoded {
        let width = if ids.len() <= 1 << 8 {
            LUT_WIDTH_U8
        } else if ids.len() <= 1 << 16 {
            LUT_WIDTH_U16
        } else {
            let direct: Vec<u32> = slots.iter().map(|&i| ids[i as usize]).collect();
            return Encoded::plain(&direct);
        };
        let layout = Layout {
            width,
            list: ids.len() as u32,
            size: slots.len() as u32,
        };
        let mut bytes = Vec::with_capacity(layout.region_len() as usize);
        for id in ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        for &s in slots {
            if width == LUT_WIDTH_U8 {
                bytes.push(s as u8);
            } else {
                bytes.extend_from_slice(&(s as u16).to_le_bytes());
            }
        }
        bytes.resize(layout.region_len() as usize, 0);
        Encoded { layout, bytes }
    }

    /// A table whose slots are backend ids (random selection's backend list).
    pub fn plain(ids: &[u32]) -> Encoded {
        let layout = Layout {
            width: LUT_WIDTH_U32,
            list: 0,
            size: ids.len() as u32,
        };
        let mut bytes = Vec::with_capacity(layout.region_len() as usize);
        for id in ids {
            bytes.extend_from_slice(&id.to_le_bytes());
        }
        bytes.resize(layout.region_len() as usize, 0);
        Encoded { layout, bytes }
    }

    /// The fingerprint stored in `ServiceValue::table_hash`.
    pub fn hash(&self, algorithm: u8) -> u64 {
        region_hash(algorithm, &self.layout, &self.bytes)
    }
}

/// A stable 64-bit hash of a table (algorithm, layout, region bytes): what a restarted agent compares to know that a
/// table already holds what it would write. Stable across builds (it lives in the pinned maps), unlike std's
/// hashers; FxHash's word step with a murmur3 finaliser, which is plenty to tell tables apart.
pub fn region_hash(algorithm: u8, layout: &Layout, bytes: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let step = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(K);
    let mut h = step(
        0,
        u64::from(algorithm)
            | u64::from(layout.width) << 8
            | u64::from(layout.size) << 16
            | u64::from(layout.list) << 40,
    );
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = step(h, u64::from_le_bytes(w));
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = step(h, u64::from_le_bytes(tail) ^ (bytes.len() as u64) << 56);
    // fmix64: every input bit reaches every output bit.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The backend id of every slot of a table whose region bytes are `bytes` (at least `layout.bytes()` long).
pub fn decode_slots(layout: &Layout, bytes: &[u8]) -> Option<Vec<u32>> {
    if (bytes.len() as u64) < layout.bytes() {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let list = layout.list as usize;
    let slots_at = list * 4;
    (0..layout.size as usize)
        .map(|s| {
            let local = match layout.width {
                LUT_WIDTH_U32 => return Some(word(s * 4)),
                LUT_WIDTH_U8 => bytes[slots_at + s] as usize,
                LUT_WIDTH_U16 => {
                    u16::from_le_bytes([bytes[slots_at + 2 * s], bytes[slots_at + 2 * s + 1]])
                        as usize
                }
                _ => return None,
            };
            (local < list).then(|| word(local * 4))
        })
        .collect()
}

/// The distinct backend ids a table names (its list, or its slots), for departures after a restart.
pub fn backend_ids(layout: &Layout, bytes: &[u8]) -> Option<Vec<u32>> {
    let mut ids = if layout.width == LUT_WIDTH_U32 {
        decode_slots(layout, bytes)?
    } else {
        if (bytes.len() as u64) < layout.bytes() {
            return None;
        }
        bytes[..layout.list as usize * 4]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maglev_tables_round_trip_at_every_width() {
        for n in [1usize, 10, 256, 257, 1000] {
            let ids: Vec<u32> = (0..n as u32).map(|i| 70_000 + i * 3).collect();
            let slots: Vec<u32> = (0..2039u32).map(|s| (s * 7) % n as u32).collect();
            let t = Encoded::maglev(&ids, &slots);
            let expected_width = if n <= 256 {
                LUT_WIDTH_U8
            } else {
                LUT_WIDTH_U16
            };
            assert_eq!(t.layout.width, expected_width, "{n} backends");
            assert_eq!(t.bytes.len() as u64, t.layout.region_len());
            assert_eq!(t.bytes.len() % LUT_BLOCK_BYTES as usize, 0);
            let decoded = decode_slots(&t.layout, &t.bytes).expect("decodes");
            let direct: Vec<u32> = slots.iter().map(|&i| ids[i as usize]).collect();
            assert_eq!(decoded, direct, "{n} backends");
            let mut named: Vec<u32> = direct.clone();
            named.sort_unstable();
            named.dedup();
            assert_eq!(backend_ids(&t.layout, &t.bytes), Some(named));
        }
    }

    #[test]
    fn a_ten_backend_maglev_table_is_one_byte_per_slot() {
        let ids: Vec<u32> = (1..=10).collect();
        let slots: Vec<u32> = (0..2039u32).map(|s| s % 10).collect();
        let t = Encoded::maglev(&ids, &slots);
        assert_eq!(t.layout.bytes(), 40 + 2039);
        assert_eq!(t.layout.region_len(), 2112);
    }

    #[test]
    fn plain_tables_hold_backend_ids() {
        let t = Encoded::plain(&[5, 9, 5]);
        assert_eq!(t.layout.width, LUT_WIDTH_U32);
        assert_eq!(decode_slots(&t.layout, &t.bytes), Some(vec![5, 9, 5]));
        assert_eq!(backend_ids(&t.layout, &t.bytes), Some(vec![5, 9]));
    }

    const STABLE: u64 = 0x9221_f30b_c530_26ea;

    #[test]
    fn the_hash_tells_tables_apart_and_is_stable() {
        let a = Encoded::maglev(&[1, 2], &[0, 1, 1]);
        let b = Encoded::maglev(&[1, 2], &[0, 1, 0]);
        let c = Encoded::maglev(&[1, 3], &[0, 1, 1]);
        assert_ne!(a.hash(0), b.hash(0));
        assert_ne!(a.hash(0), c.hash(0));
        assert_ne!(a.hash(0), a.hash(1), "the algorithm is part of it");
        // Pinned maps hold it across agent builds: a change here would make every restarted agent rewrite every
        // table once (harmless, but not free).
        assert_eq!(a.hash(0), STABLE, "got {:#x}", a.hash(0));
    }

    #[test]
    fn a_value_without_a_table_has_no_layout() {
        assert_eq!(Layout::of(&ServiceValue::default()), None);
        let v = ServiceValue {
            table_size: 3,
            slot_width: 3,
            ..ServiceValue::default()
        };
        assert_eq!(Layout::of(&v), None, "unknown width");
    }
}
