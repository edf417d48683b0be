//! Regions of the slot array: which bytes hold a live table, which are free, and which wait for an RCU grace
//! period before they may be reused.
//!
//! Best fit over a coalescing free list, in whole blocks (`LUT_BLOCK_BYTES`). Table sizes come in a few classes
//! (Maglev's prime sizes times one or two bytes per slot, plus the backend list), but which classes a cluster needs
//! shifts over time (services scale up and down), so freed neighbours merge back into larger free regions instead of
//! staying in per-class lists.
//!
//! **Invariant (no reuse before a grace period):** a region an entry pointed at goes to quarantine tagged with the
//! number of fences started when it was freed, and returns to the free list only once a fence with a higher number
//! has completed (`rcu_fence`); a region no entry ever pointed at (a table whose entry write failed) is free at once.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::LUT_BLOCK_BYTES;

#[derive(Debug, Default, PartialEq)]
pub(super) struct Regions {
    capacity: u64,
    /// Free regions, offset → length, never adjacent to each other (merged).
    free: BTreeMap<u64, u64>,
    /// The same regions by (length, offset), for best fit.
    by_len: BTreeSet<(u64, u64)>,
    /// Freed regions waiting for a fence: (fences started when freed, offset, length), in the order freed.
    quarantine: Vec<(u64, u64, u64)>,
    /// Bytes in live regions.
    live: u64,
}

impl Regions {
    /// Everything outside `live` (offset, length) regions of an array of `capacity` bytes is unknown: it may have
    /// been freed by an agent that was killed before its fence, so it is quarantined under `epoch` (the fences
    /// started so far), not free.
    pub(super) fn restore(capacity: u64, live: &[(u64, u64)], epoch: u64) -> Self {
        let mut sorted: Vec<(u64, u64)> = live.to_vec();
        sorted.sort_unstable();
        let mut r = Regions {
            capacity,
            ..Regions::default()
        };
        let mut at = 0;
        for (offset, len) in sorted {
            if offset > at {
                r.quarantine.push((epoch, at, offset - at));
            }
            let end = offset + len;
            if end > at {
                // Overlapping claims (which a consistent state never has) count once.
                r.live += end - offset.max(at);
                at = end;
            }
        }
        if capacity > at {
            r.quarantine.push((epoch, at, capacity - at));
        }
        r
    }

    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(super) fn live(&self) -> u64 {
        self.live
    }

    pub(super) fn quarantined(&self) -> u64 {
        self.quarantine.iter().map(|(_, _, len)| len).sum()
    }

    pub(super) fn has_quarantine(&self) -> bool {
        !self.quarantine.is_empty()
    }

    /// The fence that must complete before every quarantined region is free (`None` when none waits).
    pub(super) fn fence_needed(&self) -> Option<u64> {
        self.quarantine.iter().map(|(epoch, _, _)| epoch + 1).max()
    }

    /// The end of the last byte not free (live or quarantined): what a growth must copy.
    pub(super) fn high_water(&self) -> u64 {
        match self.free.last_key_value() {
            Some((offset, len)) if offset + len == self.capacity => *offset,
            _ => self.capacity,
        }
    }

    /// A region of at least `len` bytes (rounded up to blocks), best fit; `None` when none is free.
    pub(super) fn allocate(&mut self, len: u64) -> Option<u64> {
        let len = round(len);
        let &(found, offset) = self.by_len.range((len, 0)..).next()?;
        self.take_free(offset);
        if found > len {
            self.put_free(offset + len, found - len);
        }
        self.live += len;
        Some(offset)
    }

    /// A region no entry ever pointed at: free at once.
    pub(super) fn free_now(&mut self, offset: u64, len: u64) {
        let len = round(len);
        self.live -= len.min(self.live);
        self.insert_free(offset, len);
    }

    /// A region an entry pointed at until now: free once a fence started after `epoch` has completed.
    pub(super) fn free_after_fence(&mut self, offset: u64, len: u64, epoch: u64) {
        let len = round(len);
        self.live -= len.min(self.live);
        self.quarantine.push((epoch, offset, len));
    }

    /// Frees every quarantined region whose fence has completed (`completed` fences known done).
    pub(super) fn release(&mut self, completed: u64) {
        let ready: Vec<(u64, u64)> = self
            .quarantine
            .iter()
            .filter(|(epoch, _, _)| *epoch < completed)
            .map(|(_, offset, len)| (*offset, *len))
            .collect();
        if ready.is_empty() {
            return;
        }
        self.quarantine.retain(|(epoch, _, _)| *epoch >= completed);
        for (offset, len) in ready {
            self.insert_free(offset, len);
        }
    }

    /// The array grew to `capacity` bytes (the old bytes kept at their offsets): the new ones are free.
    pub(super) fn grow(&mut self, capacity: u64) {
        if capacity > self.capacity {
            let old = self.capacity;
            self.capacity = capacity;
            self.insert_free(old, capacity - old);
        }
    }

    fn insert_free(&mut self, mut offset: u64, mut len: u64) {
        // Merge with the free neighbours on both sides.
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.take_free(prev);
            offset = prev;
            len += prev_len;
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.take_free(offset + len);
            len += next_len;
        }
        self.put_free(offset, len);
    }

    fn put_free(&mut self, offset: u64, len: u64) {
        self.free.insert(offset, len);
        self.by_len.insert((len, offset));
    }

    fn take_free(&mut self, offset: u64) {
        if let Some(len) = self.free.remove(&offset) {
            self.by_len.remove(&(len, offset));
        }
    }
}

fn round(len: u64) -> u64 {
    len.div_ceil(u64::from(LUT_BLOCK_BYTES)) * u64::from(LUT_BLOCK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = LUT_BLOCK_BYTES as u64;

    #[test]
    fn best_fit_and_freed_neighbours_merge() {
        let mut r = Regions::default();
        r.grow(10 * B);
        let a = r.allocate(2 * B).expect("a");
        let b = r.allocate(3 * B).expect("b");
        let c = r.allocate(1).expect("c, rounded up to a block");
        assert_eq!((a, b, c), (0, 2 * B, 5 * B));
        assert_eq!(r.live(), 6 * B);
        r.free_now(a, 2 * B);
        // A one-block request takes the smallest hole that fits (the two blocks at 0), not the tail.
        assert_eq!(r.allocate(B), Some(0));
        r.free_now(0, B);
        r.free_now(b, 3 * B);
        // 0..5 is one free region again.
        assert_eq!(r.allocate(5 * B), Some(0));
        assert_eq!(
            r.allocate(5 * B),
            None,
            "blocks 5 (c) and 6..10 (4 free) do not fit 5"
        );
        assert_eq!(r.allocate(4 * B), Some(6 * B));
    }

    #[test]
    fn a_region_is_not_reused_before_a_later_fence_completes() {
        let mut r = Regions::default();
        r.grow(2 * B);
        let a = r.allocate(2 * B).expect("a");
        // Freed when 3 fences had started: fence 4 must complete.
        r.free_after_fence(a, 2 * B, 3);
        assert_eq!(r.allocate(B), None);
        assert_eq!(r.fence_needed(), Some(4));
        r.release(3);
        assert_eq!(
            r.allocate(B),
            None,
            "fence 3 began before the region was freed"
        );
        r.release(4);
        assert_eq!(r.allocate(2 * B), Some(0));
        assert!(!r.has_quarantine());
    }

    #[test]
    fn restore_quarantines_what_no_entry_holds() {
        let mut r = Regions::restore(8 * B, &[(2 * B, B), (5 * B, 2 * B)], 7);
        assert_eq!(r.live(), 3 * B);
        assert_eq!(r.quarantined(), 5 * B);
        assert_eq!(r.allocate(B), None);
        r.release(8);
        assert_eq!(r.allocate(2 * B), Some(0));
        assert_eq!(r.allocate(2 * B), Some(3 * B));
        assert_eq!(r.allocate(B), Some(7 * B));
        assert_eq!(r.high_water(), 8 * B);
    }

    #[test]
    fn growth_adds_free_space_after_the_old_end() {
        let mut r = Regions::default();
        r.grow(2 * B);
        r.allocate(B).expect("a");
        assert_eq!(r.high_water(), B);
        r.grow(4 * B);
        assert_eq!(
            r.allocate(3 * B),
            Some(B),
            "the old free tail merged with the new space"
        );
    }
}
