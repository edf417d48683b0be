//! `test/e2e/network/topology.go`.

use crate::Case;

pub fn cases() -> Vec<Case> {
    Vec::new()
}
