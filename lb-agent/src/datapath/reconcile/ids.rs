//! Service and backend ids: small integers that index the datapath's per-CPU counters and name a service's table.

use std::collections::BTreeSet;

/// Hands out ids in `1..limit`, lowest free after a moving cursor, so a just-freed id is not reused at once (a
/// lingering affinity or conntrack entry then cannot point at a newcomer).
#[derive(Debug, PartialEq)]
pub(super) struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl IdAllocator {
    pub(super) fn new(limit: u32) -> Self {
        Self {
            used: BTreeSet::new(),
            next: 1,
            limit,
        }
    }

    /// Marks an id found in the maps as taken.
    pub(super) fn mark(&mut self, id: u32) {
        self.used.insert(id);
    }

    /// The next free id, `None` when all of `1..limit` are taken.
    pub(super) fn allocate(&mut self) -> Option<u32> {
        if self.limit <= 1 || self.used.len() as u64 >= u64::from(self.limit - 1) {
            return None;
        }
        let mut id = self.next;
        loop {
            if id == 0 || id >= self.limit {
                id = 1;
            }
            if self.used.insert(id) {
                self.next = id + 1;
                return Some(id);
            }
            id += 1;
        }
    }

    pub(super) fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }

    /// How many ids can be handed out at all (`limit - 1`: id 0 means "none").
    pub(super) fn capacity(&self) -> u32 {
        self.limit.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::IdAllocator;

    #[test]
    fn id_allocator_does_not_reuse_a_freed_id_at_once() {
        let mut a = IdAllocator::new(5);
        assert_eq!((a.allocate(), a.allocate()), (Some(1), Some(2)));
        a.free(1);
        assert_eq!(a.allocate(), Some(3));
        assert_eq!(a.allocate(), Some(4));
        assert_eq!(a.allocate(), Some(1), "wraps around to the freed id");
        assert_eq!(a.allocate(), None);
    }
}
